"""The CustomContrast trainer under torchrun and after a SIGKILL, for what only this trainer has: the
subject-grouped order split over ranks, CSCL and MACL over the global batch (features gathered across ranks with
gradients), L_loc through the shared attention recorder, per-row S+ text encodes.

One module fixture runs the tiny trainer (``tests/customcontrast_tiny.py``: the trainer with a 2-block text
encoder) three ways, 2 AdamW steps of global batch 4 (2 subjects x 2 views), checkpoints every step:
1 process x micro-batch 4, ``torchrun --nproc_per_node=2`` (gloo) x micro-batch 2 — each rank then holds one
subject's two views, so without the global gather each rank's contrastive terms would have no negatives and the
run would differ by order 1 — and 1 process killed after its first checkpoint and resumed.
"""
import json
from pathlib import Path

import pytest
import torch

from train.checkpoint import list_checkpoints, load_checkpoint

STEPS = 2
SCRIPT = Path(__file__).resolve().parent / "customcontrast_tiny.py"


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final(out: Path) -> dict:
    return load_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs, trainer):
    import sys

    sys.path.append(str(SCRIPT.parent))
    from customcontrast_tiny import write_config, write_files

    root = tmp_path_factory.mktemp("cc_parallel")
    files = write_files(root / "data")
    # τ = 1 rather than 0.07: at 0.07 the positives dominate MACL's softmax on these inputs (MACL ≈ 1e-6, below
    # what a comparison can see); at 1 it is of order 1, so a missing gather of S+ would show
    cfg = write_config(root / "cfg.yaml", model_dirs, files, steps=STEPS, checkpoint_every=1, temperature=1.0,
                       method="customcontrast")
    single = [SCRIPT, "--config", cfg, "--output_dir"]
    trainer.run(single + [root / "single"])
    trainer.run_torchrun(2, single + [root / "ddp"])

    killed = root / "killed"
    trainer.kill_when_written(single + [killed], killed / "checkpoints" / "step_00000001.pt")
    saved = [s for s, _ in list_checkpoints(killed / "checkpoints")]
    assert saved and saved[-1] < STEPS and not (killed / "customcontrast.safetensors").exists()
    resumed = trainer.run(single + [killed])
    assert f"(step {saved[-1]})" in resumed.stderr
    return {"single": root / "single", "ddp": root / "ddp", "killed": killed}


def test_two_processes_equal_one_process_including_the_contrastive_terms(runs):
    """The logged terms of every step (L_LDM, CSCL, MACL, L_loc as rank 0 logs them: CSCL and MACL are global
    numbers, L_LDM and L_loc averaged over ranks) and the final states agree. Tolerance: the two splits differ
    only in float summation order (batch-4 vs batch-2 matmuls in the UNet, the text encoder per row either way,
    then one all-reduce), so the losses agree to rtol 1e-5; AdamW at lr 1e-3 divides by sqrt(second moment), so
    a last-bit difference on a near-zero gradient entry can move that weight by up to lr per step: the weights
    are compared at STEPS x lr with 98 % of entries within 1e-7, and the final first moment (the averaged
    gradients, linear in them) at 1e-4 of its largest entry. A missing gather (each rank's CSCL/MACL over its own
    subject only), a summed instead of averaged gradient or a lost rank moves these by order 1."""
    a, b = _final(runs["ddp"]), _final(runs["single"])
    assert a["trainable_names"] == b["trainable_names"]
    log_a = [r for r in _log(runs["ddp"]) if "loss" in r]
    log_b = [r for r in _log(runs["single"]) if "loss" in r]
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(log_a, log_b):
        assert ra["sigma_mean"] == pytest.approx(rb["sigma_mean"], rel=1e-6)
        for key in ("loss", "ldm", "cscl", "macl", "loc"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
        assert rb["cscl"] > 1 and rb["macl"] > 0.1 and rb["loc"] != 0
    m_a = torch.cat([a["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    m_b = torch.cat([b["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    worst, scale = float((m_a - m_b).abs().max()), float(m_b.abs().max())
    diff = torch.cat([(a["trainable"][n] - b["trainable"][n]).abs().flatten() for n in b["trainable_names"]])
    print(f"first moment max |diff| {worst:.3g} of {scale:.3g}; weights max |diff| {float(diff.max()):.3g}, "
          f"{float((diff <= 1e-7).float().mean()):.4f} within 1e-7")
    assert scale > 0 and worst <= 1e-4 * scale
    assert float(diff.max()) <= STEPS * 1e-3 and float((diff <= 1e-7).float().mean()) >= 0.98
    events = [r for r in _log(runs["ddp"]) if r.get("event") == "checkpoint"]
    assert all(len(e["rank_digests"]) == 2 and len(set(e["rank_digests"])) == 1 for e in events)  # same weights


def test_sigkill_then_resume_equals_the_uninterrupted_run_exactly(runs):
    a, b = _final(runs["killed"]), _final(runs["single"])
    for name in b["trainable_names"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    for i, sb in b["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][i][key], sb[key])
    assert a["scheduler"] == b["scheduler"]
    steps = lambda out: [(r["step"], r["loss"], r["macl"]) for r in _log(out) if "loss" in r]  # noqa
    assert steps(runs["killed"]) == steps(runs["single"])           # the log reads as one run
    from safetensors.torch import load_file

    name = "customcontrast.safetensors"
    ea, eb = load_file(runs["killed"] / name), load_file(runs["single"] / name)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in eb)
