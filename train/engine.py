"""The shared training loop. A method plugs in by subclassing ``train.method.TrainingMethod``.

Entry point of a method module ``train/<name>.py``::

    METHOD = MyMethod
    def main(argv=None) -> int:
        return run(MyMethod, argv)
    if __name__ == "__main__":
        sys.exit(main())

run as ``python -m train.<name> --config cfg.yaml [--set key=value] [--key value]`` or under
``torchrun --nproc_per_node=N -m train.<name> …`` (``--help`` lists every option with its default).

The method interface (all hooks get the same ``TrainContext``: config, dist info, device, the base model
loaded by ComfyUI as ``ctx.base`` — ``.patcher``/``.model``/``.unet``/``.clip``/``.vae`` — the output folder,
the completed step, ``ctx.autocast()``, ``ctx.save_export()``):

* ``name``, ``format_version``, ``config_class`` (a ``TrainConfig`` subclass), ``manifest_schema`` (which row
  fields are images/masks/files/text and which share a size), optional ``folder_layout``.
* ``build(ctx) -> {name: Parameter}``: attach trainable modules, return what trains (names key checkpoints).
* ``make_dataset(rows, ctx)``: map-style dataset over validated rows; items are pure functions of the index.
* ``collate(items)``: default stacks equal-shaped tensors, lists the rest.
* ``sample_weights(dataset, ctx)``: optional relative weight per row (weighted draws instead of a shuffle).
* ``sample_stream(dataset, ctx)``: optional object replacing the order (``index_at(position)``,
  ``check_split(batch, samples_per_micro_step)``), e.g. views grouped by subject for contrastive losses.
* ``training_loss(batch, ctx, rng) -> (loss, metrics)``: mean loss of the micro-batch; every random draw from
  ``rng`` (per-sample generators seeded by seed, step and the sample's position in the global batch).
* ``validation_samples(ctx, step, generator) -> [(name, image)]``: optional, first process, no_grad.
* ``export(path, ctx)``: write the file the nodes load through ``ctx.save_export`` (atomic, with metadata:
  method, format_version, base_architecture, base_hash, base_name, trained_steps, config).

What the engine does per optimizer step: ``batch_size`` samples in total, split over processes and
micro-batches (gradient accumulation); loss/accumulation backward; gradients averaged across processes by
explicit all-reduce; a non-finite loss or gradient norm stops the run *before* the update (exit code 3, message
naming the step and the last good checkpoint); clip; AdamW + LR schedule step. Then, at their intervals:
metrics line, validation images, interval export, checkpoint. At the end: checkpoint and export.
Exactness: 2 processes x micro-batch 1 equal 1 process x batch 2 up to float summation order, and a resumed run
equals the uninterrupted one, because data order and per-sample draws depend only on (seed, step, position).

Notes for methods: rows are dicts with absolute paths and ``_line``; the UNet runs with a method's attention
patches by passing a copy of a patched clone's ``model_options["transformer_options"]`` to
``ctx.base.model.apply_model``; a method that runs the UNet twice per step just calls it twice (gradients are
reduced once per step, parameters unused on a rank count as zero); with ``gradient_checkpointing`` patches run
again in backward (see train/grad_checkpoint.py). ``output_dir`` holds config.yaml, metrics.jsonl,
checkpoints/step_NNNNNNNN.pt, samples/step_NNNNNNNN/*.png, exports/<name>_step_NNNNNNNN.safetensors and the
final <name>.safetensors (plus manifest_report.json when rows were skipped).
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch

from . import distributed
from .base_model import BaseModelError, load_base
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, parse_command_line
from .grad_checkpoint import enable_gradient_checkpointing
from .manifest import ManifestError, read_manifest
from .method import TrainContext, TrainingMethod
from .metrics import MetricsLog, save_images
from .optim import build_optimizer
from .randomness import SampleRandom, capture_rng_state, restore_rng_state

EXIT_BAD_INPUT, EXIT_NON_FINITE = 2, 3
_USER_ERRORS = (ConfigError, ManifestError, BaseModelError, CheckpointError)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step was NaN/inf; the step was not applied."""


def _on_main(info, fn, share=lambda result: result):
    """Run ``fn`` on the first process; every process gets ``share(result)``, or the user-facing error ``fn``
    raised (so no process waits forever for a peer that failed). Returns (result or None, shared)."""
    result, shared, error = None, None, None
    if info.is_main:
        try:
            result = fn()
            shared = share(result)
        except _USER_ERRORS as e:
            error = (type(e).__name__, str(e))
    shared, error = distributed.broadcast_object(info, (shared, error))
    if error is not None:
        raise {cls.__name__: cls for cls in _USER_ERRORS}[error[0]](error[1])
    return result, shared


class Trainer:
    def __init__(self, method: TrainingMethod, info: distributed.DistInfo):
        self.method, self.info, self.cfg = method, info, method.config
        self.out = Path(self.cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.log = MetricsLog(self.out / "metrics.jsonl", info.is_main)
        self.start_step = 0

    # ---- setup -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, info = self.cfg, self.info
        if info.is_main:
            import yaml

            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _, report = _on_main(info, lambda: read_manifest(cfg.manifest, self.method.manifest_schema,
                                                         cfg.on_bad_row))
        if info.is_main and report.bad_rows:
            import json

            (self.out / "manifest_report.json").write_text(json.dumps(report.to_json(), indent=1))
            print(f"skipping bad manifest rows (listed in manifest_report.json):\n{report.summary()}",
                  file=sys.stderr)
        base, sha = _on_main(info, lambda: load_base(cfg.base_checkpoint, info.device), share=lambda b: b.sha256)
        if base is None:  # the other processes load their own copy; only the first one hashes the file
            base = load_base(cfg.base_checkpoint, info.device, compute_hash=False)
            base.sha256 = sha
        self.ctx = TrainContext(cfg, info, base, self.out, self.method.name, self.method.format_version)
        named = self.method.build(self.ctx)
        self.names, self.params = list(named), list(named.values())
        for p in self.params:
            p.requires_grad_(True)
        distributed.broadcast_parameters(info, self.params)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(base.unet)
        self.dataset = self.method.make_dataset(report.rows, self.ctx)
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // info.world_size)
        try:
            self.order = distributed.GlobalOrder(len(self.dataset), cfg.batch_size, micro, info, cfg.seed,
                                                 cfg.shuffle, self.method.sample_weights(self.dataset, self.ctx),
                                                 self.method.sample_stream(self.dataset, self.ctx))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg)
        self._resume()

    def _resume(self) -> None:
        cfg = self.cfg
        path = (None if cfg.resume == "never" else
                latest_checkpoint(self.ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume))
        if path is None:
            self.log.truncate_after(0)
            return
        state = load_checkpoint(path, method=self.method.name)
        if state["trainable_names"] != self.names:
            raise CheckpointError(f"{path.name} trains {len(state['trainable_names'])} tensors, this run "
                                  f"{len(self.names)}; was the checkpoint written with other options?")
        if state["base_hash"] != self.ctx.base.sha256:
            raise CheckpointError(f"{path.name} was trained from a base checkpoint with sha256 "
                                  f"{state['base_hash'][:12]}…, but {self.ctx.base.path.name} has "
                                  f"{self.ctx.base.sha256[:12]}…; resume with the same base_checkpoint")
        data = state["data"]
        if self.info.is_main and (data["dataset_size"], data["batch_size"], data["seed"]) != (
                len(self.dataset), cfg.batch_size, cfg.seed):
            print(f"note: resuming with a different dataset size/batch_size/seed than {path.name} was written "
                  "with; the run will not reproduce an uninterrupted one", file=sys.stderr)
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(state["trainable"][name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            restore_rng_state(rng[self.info.rank])
        self.start_step = self.ctx.step = state["step"]
        self.log.truncate_after(self.start_step)
        self.log.write({"event": "resume", "step": self.start_step, "path": str(path)})
        if self.info.is_main:
            print(f"resuming from {path} (step {self.start_step})", file=sys.stderr)

    # ---- the loop ----------------------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm import tqdm

        cfg, info, ctx = self.cfg, self.info, self.ctx
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=(idx for *_, idx in self.order.micro_batches(self.start_step, cfg.steps)),
            collate_fn=self.method.collate, num_workers=cfg.num_workers)
        schedule = zip(self.order.micro_batches(self.start_step, cfg.steps), loader)
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc=self.method.name, dynamic_ncols=True,
                   disable=not (info.is_main and cfg.progress))
        started, keys = time.perf_counter(), None
        for step in range(self.start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.zero_grad(set_to_none=True)
            sums = None
            for _ in range(self.order.accumulation):
                (_, _, positions, _), batch = next(schedule)
                rng = SampleRandom(cfg.seed, step, positions, info.device)
                with ctx.autocast():
                    loss, metrics = self.method.training_loss(batch, ctx, rng)
                if cfg.debug_nan_at_step == step + 1:
                    loss = loss * float("nan")
                (loss.float() / self.order.accumulation).backward()
                keys = keys or sorted(metrics)
                values = torch.tensor([float(loss.detach())] + [float(metrics[k]) for k in keys], dtype=torch.float64)
                sums = values if sums is None else sums + values
            distributed.average_gradients(info, self.params)
            means = distributed.all_reduce_mean(info, sums.to(info.device) / self.order.accumulation).cpu()
            grad_norm = self._clip()
            if not (torch.isfinite(means[0]) and torch.isfinite(grad_norm)):
                self._stop(step + 1, float(means[0]), float(grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            done = ctx.step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(means[0]):.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t0
                self.log.write({"step": done, "loss": float(means[0]), "lr": lr, "grad_norm": float(grad_norm),
                                "samples_per_s": cfg.batch_size / elapsed, "step_s": elapsed,
                                "elapsed_s": time.perf_counter() - started,
                                **{k: float(v) for k, v in zip(keys, means[1:])}})
            if cfg.validation_every and done % cfg.validation_every == 0:
                self._validate(done)
            if cfg.export_every and done % cfg.export_every == 0 and done != cfg.steps:
                self._export(self.out / "exports" / f"{self._export_stem()}_step_{done:08d}.safetensors")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self._checkpoint(done)
        bar.close()
        self._export(self.out / f"{self._export_stem()}.safetensors")

    def _clip(self) -> torch.Tensor:
        if self.cfg.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm).detach().cpu()
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]).detach().cpu()

    def _stop(self, step: int, loss: float, grad_norm: float) -> None:
        last = latest_checkpoint(self.ckpt_dir)
        where = (f"The last good checkpoint is {last}; the same command resumes from it." if last else
                 "No checkpoint was written yet.")
        message = (f"non-finite training signal at step {step} (loss={loss}, grad_norm={grad_norm}); the step was "
                   f"not applied and training stopped. {where}")
        self.log.write({"event": "stopped", "step": step - 1, "reason": message})
        raise NonFiniteLoss(message)

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for p in self.params:
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _checkpoint(self, step: int) -> None:
        """Save on the first process, after checking that every process holds bit-identical trainable values."""
        rng = distributed.gather_objects(self.info, capture_rng_state())
        digests = distributed.gather_objects(self.info, self._digest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"processes hold different trainable weights at step {step} (sha256 per rank: "
                               f"{digests}); the gradient reduction is not keeping them in sync")
        if not self.info.is_main:
            return
        state = {"method": self.method.name, "trainable_names": self.names,
                 "trainable": {n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "data": {"samples_seen": step * self.cfg.batch_size, "dataset_size": len(self.dataset),
                          "batch_size": self.cfg.batch_size, "seed": self.cfg.seed},
                 "base_hash": self.ctx.base.sha256, "config": self.cfg.to_dict()}
        path = save_checkpoint(self.ckpt_dir, step, state, keep=self.cfg.keep_checkpoints)
        self.log.write({"event": "checkpoint", "step": step, "path": str(path), "rank_digests": digests})

    def _validate(self, step: int) -> None:
        if not self.info.is_main:
            return
        generator = torch.Generator().manual_seed(self.cfg.validation_seed)
        with torch.no_grad():
            samples = self.method.validation_samples(self.ctx, step, generator)
        if samples:
            paths = save_images(self.out / "samples" / f"step_{step:08d}", samples)
            self.log.write({"event": "validation", "step": step, "images": [str(p) for p in paths]})

    def _export_stem(self) -> str:
        return self.cfg.export_name or self.method.name

    def _export(self, path: Path) -> None:
        if self.info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.method.export(path, self.ctx)
            self.log.write({"event": "export", "step": self.ctx.step, "path": str(path)})


def run(method_class: type[TrainingMethod], argv=None) -> int:
    """Parse the command line, train, export. Exit codes: 0 done, 2 bad input, 3 non-finite loss."""
    prog = f"python -m train.{method_class.name}"
    try:
        config, print_only = parse_command_line(method_class.config_class, argv, prog=prog)
        if config.method and config.method != method_class.name:
            raise ConfigError(f"the config is for the {config.method!r} trainer, not {method_class.name!r}")
        config.method = method_class.name
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if print_only:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    info = distributed.setup()
    try:
        trainer = Trainer(method_class(config), info)
        trainer.prepare()
        trainer.train()
        return 0
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    finally:
        distributed.teardown(info)
