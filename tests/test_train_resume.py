"""Recovery: a run killed by SIGKILL resumes to the uninterrupted run's exact weights; a NaN stops the run
before the bad update and leaves the last good checkpoint loadable and resumable.

All runs: tiny SD1.5, 64 px, 6 steps of batch 2, checkpoints every 2 steps, one CPU process.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, load_checkpoint

PACK_ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def _command(cfg, out, *extra):
    return [sys.executable, "-m", "train.finetune", "--config", str(cfg), "--output_dir", str(out), *extra]


def _run(cmd, env):
    return subprocess.run(cmd, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, finetune_config):
    root = tmp_path_factory.mktemp("resume")
    return finetune_config(root / "cfg.yaml", steps=STEPS, checkpoint_every=2, keep_checkpoints=3,
                           caption_dropout=0.3)


@pytest.fixture(scope="module")
def uninterrupted(cfg, trainer_env):
    out = cfg.parent / "uninterrupted"
    result = _run(_command(cfg, out), trainer_env)
    assert result.returncode == 0, result.stderr[-4000:]
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


def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(cfg, uninterrupted, trainer_env):
    out = cfg.parent / "killed"
    target = out / "checkpoints" / "step_00000002.pt"
    proc = subprocess.Popen(_command(cfg, out), cwd=PACK_ROOT, env=trainer_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill:\n{stderr[-3000:]}"
    saved = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert saved and saved[-1] < STEPS and not (out / "finetune.safetensors").exists()

    resumed = _run(_command(cfg, out), trainer_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{saved[-1]:08d}.pt'} (step {saved[-1]})" in resumed.stderr
    _assert_same_final_state(out, uninterrupted)


def test_nan_stops_before_the_update_and_the_last_good_checkpoint_resumes(cfg, uninterrupted, trainer_env):
    out = cfg.parent / "nan"
    stopped = _run(_command(cfg, out, "--set", "debug_nan_at_step=4"), trainer_env)
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

    resumed = _run(_command(cfg, out, "--set", "debug_nan_at_step=null"), trainer_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _assert_same_final_state(out, uninterrupted)
