"""The P3S trainer under torchrun and after a SIGKILL: what test_train_ddp / test_train_resume prove for finetune,
for the parts only this trainer has (one photo drawn for every sample of the global batch, condition dropout, the
reference's negatives removal and RNGR encoding done on every rank, the copy running inside the frozen UNet's
wrapper, the attention-consistency term, the per-layer gates).

One module fixture runs the tiny trainer three ways, 4 steps of global batch 2, checkpoints every 2 steps:
1 process x micro-batch 2, ``torchrun --nproc_per_node=2`` x micro-batch 1, and 1 process killed (SIGKILL) after
its first checkpoint and resumed.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, load_checkpoint

STEPS = 4


def _train_p3s_module():
    spec = importlib.util.spec_from_file_location("p3s_train_support", Path(__file__).parent / "test_train_p3s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P3S = _train_p3s_module()


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs, trainer):
    root = tmp_path_factory.mktemp("p3s_parallel")
    files = P3S.build_p3s_files(root)
    cfg = P3S.write_config(root / "cfg.yaml", model_dirs, files, steps=STEPS, batch_size=2, checkpoint_every=2,
                           condition_dropout=0.5)
    single = ["-m", "train.p3s", "--config", cfg, "--output_dir"]
    trainer.run(single + [root / "single"])
    trainer.run_torchrun(2, single + [root / "ddp"])

    killed = root / "killed"
    trainer.kill_when_written(single + [killed], killed / "checkpoints" / "step_00000002.pt")
    saved = [s for s, _ in list_checkpoints(killed / "checkpoints")]
    assert saved and saved[-1] < STEPS and not (killed / "p3s.safetensors").exists()
    resumed = trainer.run(single + [killed])
    assert f"(step {saved[-1]})" in resumed.stderr
    return {"single": root / "single", "ddp": root / "ddp", "killed": killed}


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    """Same per-sample draws on either split (dropout, timesteps, noises), so the logged draws are identical and
    the losses agree to 1e-5 (float summation order: batch-2 matmuls vs two batch-1 passes). The states agree to
    that order and its consequences: at lr 1e-3 AdamW turns a last-bit difference on a near-zero gradient entry
    into a weight difference of up to lr per step, and later gradients are taken at those weights. P3S has many
    such entries: copy weights reached only through the zero-initialised projections get exactly zero
    gradient at the first step and tiny ones after (the projections are then of order lr), which AdamW
    normalises to steps of order lr, rounding differences included. So the final first moment (the averaged
    gradients, linear in them) is compared at 1e-4 of its largest entry (measured 8e-6 and 2.8e-5 on two
    machines), the weights at STEPS·lr (measured 1.5e-4 and 3.2e-4) with 75 % within 1e-7 (measured 93.9 % and
    90.0 %: how many rounding differences AdamW amplifies depends on the CPU's kernels; AnyLogo's trainer, without
    zero-initialised branches, has 98.9 %). A gradient summed instead of averaged, or one rank's sample missing,
    moves the first moment by order 1 and every trained weight by far more than 1e-7."""
    a, b = _final(runs["ddp"]), _final(runs["single"])
    assert a["trainable_names"] == b["trainable_names"]
    assert "copy.gates" in b["trainable_names"] and any(n.startswith("rngr.") for n in b["trainable_names"])
    log_a = [r for r in _log(runs["ddp"]) if "loss" in r]
    log_b = [r for r in _log(runs["single"]) if "loss" in r]
    assert len(log_a) == len(log_b) == STEPS
    for ra, rb in zip(log_a, log_b):
        assert ra["condition_dropped"] == rb["condition_dropped"]
        assert ra["sigma_mean"] == pytest.approx(rb["sigma_mean"], rel=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    m_a = torch.cat([a["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    m_b = torch.cat([b["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    worst, scale = float((m_a - m_b).abs().max()), float(m_b.abs().max())
    diff = torch.cat([(a["trainable"][n] - b["trainable"][n]).abs().flatten() for n in b["trainable_names"]])
    print(f"first moment max |diff| {worst:.3g} of {scale:.3g}; weights max |diff| {float(diff.max()):.3g}, "
          f"{float((diff <= 1e-7).float().mean()):.4f} within 1e-7")
    assert scale > 0 and worst <= 1e-4 * scale
    assert float(diff.max()) <= STEPS * 1e-3 and float((diff <= 1e-7).float().mean()) >= 0.75  # lr 1e-3
    events = [r for r in _log(runs["ddp"]) if r.get("event") == "checkpoint"]
    assert [e["step"] for e in events] == [2, 4]
    assert all(len(e["rank_digests"]) == 2 and len(set(e["rank_digests"])) == 1 for e in events)  # same weights


def test_sigkill_then_resume_equals_the_uninterrupted_run_exactly(runs):
    a, b = _final(runs["killed"]), _final(runs["single"])
    for name in b["trainable_names"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    for i, sb in b["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][i][key], sb[key])
    steps = lambda out: [(r["step"], r["loss"], r["condition_dropped"]) for r in _log(out) if "loss" in r]  # noqa
    assert steps(runs["killed"]) == steps(runs["single"])           # the log reads as one run
    ea, eb = load_file(runs["killed"] / "p3s.safetensors"), load_file(runs["single"] / "p3s.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in eb)
