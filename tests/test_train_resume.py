"""Recovery: a run killed by SIGKILL resumes to the uninterrupted run's exact weights; a NaN stops the run
before the bad update and leaves the last good checkpoint loadable and resumable.

All runs: tiny SD1.5, 64 px, 6 steps of batch 2, checkpoints every 2 steps, one CPU process.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, load_checkpoint

STEPS = 6


def _args(cfg, out, *extra):
    return ["-m", "train.finetune", "--config", cfg, "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, finetune_config):
    root = tmp_path_factory.mktemp("resume")
    return finetune_config(root / "cfg.yaml", steps=STEPS, checkpoint_every=2, keep_checkpoints=3,
                           caption_dropout=0.3)


@pytest.fixture(scope="module")
def uninterrupted(cfg, trainer):
    out = cfg.parent / "uninterrupted"
    trainer.run(_args(cfg, out))
    return out


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _assert_same_final_state(out: Path, reference: Path):
    a = load_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}.pt")
    b = load_checkpoint(reference / "checkpoints" / f"step_{STEPS:08d}.pt")
    for name in b["trainable_names"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name      # exact, not approximate
    for i, sb in b["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][i][key], sb[key])
    assert a["scheduler"] == b["scheduler"]
    ea, eb = load_file(out / "finetune.safetensors"), load_file(reference / "finetune.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in eb)
    assert _losses(out) == _losses(reference)          # the log reads as one run: steps 1..6 once each


def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(cfg, uninterrupted, trainer):
    out = cfg.parent / "killed"
    trainer.kill_when_written(_args(cfg, out), out / "checkpoints" / "step_00000002.pt")
    saved = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert saved and saved[-1] < STEPS and not (out / "finetune.safetensors").exists()

    resumed = trainer.run(_args(cfg, out))
    assert f"resuming from {out / 'checkpoints' / f'step_{saved[-1]:08d}.pt'} (step {saved[-1]})" in resumed.stderr
    _assert_same_final_state(out, uninterrupted)


def test_nan_stops_before_the_update_and_the_last_good_checkpoint_resumes(cfg, uninterrupted, trainer):
    out = cfg.parent / "nan"
    stopped = trainer.run(_args(cfg, out, "--set", "debug_nan_at_step=4"), check=False)
    assert stopped.returncode == 3
    good = out / "checkpoints" / "step_00000002.pt"
    assert "non-finite training signal at step 4 (loss=nan" in stopped.stderr
    assert f"The last good checkpoint is {good}; the same command resumes from it." in stopped.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]      # step 3 ran, step 4 was refused
    assert not (out / "finetune.safetensors").exists()
    state = load_checkpoint(good, method="finetune")
    reference = load_checkpoint(uninterrupted / "checkpoints" / "step_00000002.pt")
    for name in state["trainable_names"]:
        assert torch.isfinite(state["trainable"][name]).all()
        assert torch.equal(state["trainable"][name], reference["trainable"][name])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "stopped" and [r["step"] for r in log if "loss" in r] == [1, 2, 3]

    trainer.run(_args(cfg, out, "--set", "debug_nan_at_step=null"))
    _assert_same_final_state(out, uninterrupted)
