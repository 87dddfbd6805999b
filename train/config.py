"""Trainer configuration: a dataclass per method, filled from a YAML/JSON file and command-line overrides.

Precedence: dataclass defaults < ``--config FILE`` < ``--set key=value`` < ``--key value``. Values
given on the command line are parsed as YAML scalars/lists (``--set steps=100``, ``--set
validation_prompts='[a cat, a dog]'``) except for plain string options, which are taken verbatim. Every value is
checked against the field's type, its ``choices`` and ``minimum``; unknown keys are refused with a suggestion.
All problems are reported together in one ``ConfigError``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A configuration file or override is unreadable, unknown, of the wrong type or out of range."""


def option(default, help: str, *, choices=None, minimum=None):
    """A config field with its help text and the checks the parser applies to it."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    """Options every trainer shares; a method subclasses this and adds its own fields."""

    method: str = option("", "trainer this config belongs to (checked against the trainer that reads it)")
    base_checkpoint: str = option("", "SD1.5 checkpoint (.safetensors) the training starts from")
    manifest: str = option("", "JSONL manifest of training rows (paths relative to the manifest's folder)")
    output_dir: str = option("", "folder for checkpoints, exports, samples, metrics.jsonl")
    on_bad_row: str = option("stop", "a manifest row that fails validation stops the run or is skipped",
                             choices=("stop", "skip"))
    seed: int = option(0, "seed of the data order and of every per-sample random draw")
    steps: int = option(1000, "optimizer steps to train in total", minimum=1)
    batch_size: int = option(1, "global batch: samples per optimizer step over all processes", minimum=1)
    micro_batch_size: typing.Optional[int] = option(
        None, "samples per process per forward pass (default: batch_size / processes); smaller values "
              "accumulate gradients", minimum=1)
    shuffle: bool = option(True, "shuffle the data order each epoch (seeded)")
    learning_rate: float = option(1e-5, "peak learning rate of AdamW", minimum=0.0)
    lr_schedule: str = option("constant", "learning-rate schedule after warm-up",
                              choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "steps of linear warm-up from 0 to learning_rate", minimum=0)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", minimum=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1", minimum=0.0)
    adam_beta2: float = option(0.999, "AdamW beta2", minimum=0.0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon", minimum=0.0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this value (0 = no clipping)",
                                  minimum=0.0)
    mixed_precision: str = option("bf16", "autocast precision on CUDA (CPU always trains in fp32)",
                                  choices=("bf16", "no"))
    gradient_checkpointing: bool = option(False, "recompute UNet block activations in backward to save memory")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N steps (and at the end)", minimum=1)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", minimum=1)
    export_every: int = option(0, "also export the weights every N steps (0 = only at the end)", minimum=0)
    export_name: str = option("", "file name of the export without extension (default: the method name)")
    validation_every: int = option(0, "make seeded validation samples every N steps (0 = never)", minimum=0)
    validation_seed: int = option(1234, "seed of the validation samples (the same at every interval)")
    resume: str = option("auto", "'auto' = continue from the latest checkpoint in output_dir if any, 'never', "
                                 "or the path of a checkpoint file")
    log_every: int = option(1, "write a metrics line every N steps", minimum=1)
    num_workers: int = option(0, "data-loading worker processes per trainer process", minimum=0)
    progress: bool = option(True, "show a tqdm progress bar (first process only)")
    debug_nan_at_step: typing.Optional[int] = option(
        None, "testing aid: make the loss of this step (1-based) NaN to exercise the non-finite guard", minimum=1)

    def check(self) -> list[str]:
        """Cross-field problems; subclasses extend the list (call super().check())."""
        problems = []
        for name in ("base_checkpoint", "manifest", "output_dir"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_file():
            problems.append(f"resume must be 'auto', 'never' or an existing checkpoint file, got {self.resume!r}")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types(config_class) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value):
    """``value`` as type ``tp``, or raise TypeError. Ints are accepted for floats; nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner, value)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(typing.get_args(tp)[0], v) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise TypeError


def _parse_text(tp, text: str):
    """A command-line value: verbatim for string options, else a YAML scalar or flow list."""
    import yaml

    if tp is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError, both with the line and column
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(config_class, values: list[tuple[str, object, str]]):
    """A validated config from (key, value, source) triples applied in order; ``source`` names where each came
    from for error messages. Raises ConfigError listing every problem."""
    types_ = field_types(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    kwargs, problems = {}, []
    for key, value, source in values:
        name = key.replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, types_, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown option {key!r} ({source}){hint}")
            continue
        tp = types_[name]
        try:
            value = _coerce(tp, _parse_text(tp, value) if isinstance(value, str) and source.startswith("--")
                            else value)
        except TypeError:
            problems.append(f"{name} must be {_describe(tp)}, got {value!r} ({source})")
            continue
        meta = fields[name].metadata
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(f"{name} must be one of {list(meta['choices'])}, got {value!r} ({source})")
            continue
        minimum = meta.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            problems.append(f"{name} must be >= {minimum}, got {value!r} ({source})")
            continue
        kwargs[name] = value
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    config = config_class(**kwargs)
    problems = config.check()
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def _argument_parser(config_class, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(config_class.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of options")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option (repeatable); the same as --KEY VALUE")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in dataclasses.fields(config_class):
        flags = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        parser.add_argument(*sorted(flags), dest=f"opt_{f.name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f.metadata.get("help", ""))
    return parser


def parse_command_line(config_class, argv, prog: str = "train"):
    """(config, print_only) from a trainer's command line; ConfigError on any bad key or value."""
    parser = _argument_parser(config_class, prog)
    args = parser.parse_args(argv)
    values: list[tuple[str, object, str]] = []
    if args.config:
        values += [(k, v, f"in {args.config}") for k, v in read_config_file(args.config).items()]
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values.append((key.strip(), text, f"--set {key.strip()}"))
    for key, text in vars(args).items():
        if key.startswith("opt_"):
            values.append((key[4:], text, f"--{key[4:]}"))
    return build_config(config_class, values), args.print_config
