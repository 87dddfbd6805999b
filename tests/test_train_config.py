"""Trainer configuration: file + overrides, types, and errors that name the key, the value and its source."""
import json

import pytest

from train.config import ConfigError, TrainConfig, parse_command_line
from train.finetune import FinetuneConfig, FinetuneMethod, main as finetune_main

REQUIRED = ["--set", "base_checkpoint=b.safetensors", "--set", "manifest=m.jsonl", "--set", "output_dir=out"]


def test_precedence_defaults_file_set_flag(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 10\nlearning_rate: 2.0e-4\nbatch_size: 4\nvalidation_prompts: [a cat]\n")
    config, print_only = parse_command_line(
        FinetuneConfig, ["--config", str(cfg_file), *REQUIRED, "--set", "steps=20", "--steps", "30",
                         "--set", "caption_dropout=0.25", "--shuffle", "false",
                         "--set", "validation_prompts=[a dog, 'a cat, sitting']"])
    assert not print_only
    assert config.steps == 30                          # --key beats --set beats the file
    assert config.learning_rate == 2e-4                # from the file
    assert config.batch_size == 4
    assert config.caption_dropout == 0.25 and isinstance(config.caption_dropout, float)
    assert config.shuffle is False
    assert config.validation_prompts == ["a dog", "a cat, sitting"]
    assert config.seed == 0 and config.train_layers == "attention"   # dataclass defaults


def test_string_options_are_verbatim_and_ints_widen_to_float(tmp_path):
    config, _ = parse_command_line(FinetuneConfig, [*REQUIRED, "--set", "export_name=0012", "--learning-rate", "1"])
    assert config.export_name == "0012"                # not parsed as the number 12
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)


def test_json_config_file(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"base_checkpoint": "b", "manifest": "m", "output_dir": "o", "seed": 7,
                                    "micro_batch_size": None}))
    config, _ = parse_command_line(TrainConfig, ["--config", str(cfg_file)])
    assert config.seed == 7 and config.micro_batch_size is None


def test_every_problem_is_reported_with_its_source(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lerning_rate: 0.1\nsteps: many\n")
    with pytest.raises(ConfigError) as err:
        parse_command_line(FinetuneConfig, ["--config", str(cfg_file), *REQUIRED, "--set", "train_layers=mlp",
                                            "--set", "steps=0", "--set", "shuffle=maybe"])
    text = str(err.value)
    assert f"unknown option 'lerning_rate' (in {cfg_file}); did you mean 'learning_rate'?" in text
    assert "steps must be an integer, got 'many'" in text
    assert "train_layers must be one of ['attention', 'cross_attention', 'full'], got 'mlp' (--set train_layers)" \
        in text
    assert "steps must be >= 1, got 0 (--set steps)" in text
    assert "shuffle must be true/false, got 'maybe' (--set shuffle)" in text


def test_required_and_cross_field_checks():
    with pytest.raises(ConfigError) as err:
        parse_command_line(FinetuneConfig, ["--set", "resolution=100", "--set", "caption_dropout=1.5"])
    text = str(err.value)
    for expected in ("base_checkpoint is required", "manifest is required", "output_dir is required",
                     "resolution must be a multiple of 8, got 100", "caption_dropout must be <= 1, got 1.5"):
        assert expected in text


def test_unreadable_files_and_malformed_set(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        parse_command_line(TrainConfig, ["--config", str(bad)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- steps\n")
    with pytest.raises(ConfigError, match="must hold a mapping of option: value, got list"):
        parse_command_line(TrainConfig, ["--config", str(listing)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_command_line(TrainConfig, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE, got 'steps'"):
        parse_command_line(TrainConfig, ["--set", "steps"])


def test_trainer_refuses_another_methods_config_and_prints_resolved(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: anylogo\nbase_checkpoint: b\nmanifest: m\noutput_dir: o\n")
    assert finetune_main(["--config", str(cfg_file)]) == 2
    assert "the config is for the 'anylogo' trainer, not 'finetune'" in capsys.readouterr().err
    assert finetune_main([*REQUIRED, "--steps", "5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "method: finetune\n" in printed and "steps: 5\n" in printed
    assert FinetuneMethod.config_class is FinetuneConfig


@pytest.mark.parametrize("name", ["anylogo_sd15", "finetune_sd15"])
def test_shipped_example_configs_parse_with_their_trainer(name):
    """The configs in train/configs are read by the trainer they name, every key known and every value valid."""
    from pathlib import Path

    from train.anylogo import AnyLogoConfig

    path = Path(__file__).resolve().parents[1] / "train" / "configs" / f"{name}.yaml"
    config_class = {"anylogo": AnyLogoConfig, "finetune": FinetuneConfig}[name.split("_")[0]]
    config, _ = parse_command_line(config_class, ["--config", str(path)])
    assert config.method == name.split("_")[0]
    assert config.base_checkpoint.endswith(".safetensors") and config.manifest.endswith(".jsonl")
