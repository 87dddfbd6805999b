"""Engine pieces: global data order, per-sample randomness, LR schedule, checkpoints, gradient checkpointing."""
import math
import random

import numpy as np
import pytest
import torch

from train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.distributed import DistInfo, GlobalOrder, mix_seed
from train.optim import lr_factor
from train.randomness import SampleRandom, capture_rng_state, restore_rng_state


def _stream(world, micro, batch, steps, start=0, size=5, seed=3):
    """{(step, position j): dataset index} over all ranks of a run."""
    out = {}
    for rank in range(world):
        order = GlobalOrder(size, batch, micro, DistInfo(rank=rank, world_size=world), seed)
        for step, _, js, idx in order.micro_batches(start, steps):
            for j, i in zip(js, idx):
                assert (step, j) not in out, "two ranks were given the same sample position"
                out[(step, j)] = i
    return out


def test_global_order_is_independent_of_the_split():
    single = _stream(world=1, micro=4, batch=4, steps=6)
    assert _stream(world=2, micro=2, batch=4, steps=6) == single
    assert _stream(world=2, micro=1, batch=4, steps=6) == single     # 2 ranks x 2 accumulation steps
    assert _stream(world=4, micro=1, batch=4, steps=6) == single
    # every epoch is a permutation of the dataset (5 samples; 24 positions = 4 full epochs + 4)
    flat = [single[(s, j)] for s in range(6) for j in range(4)]
    for e in range(4):
        assert sorted(flat[5 * e:5 * e + 5]) == [0, 1, 2, 3, 4]
    assert flat[:5] != flat[5:10], "epochs should be shuffled differently"
    # resuming at step 4 continues the very same stream
    assert _stream(world=2, micro=1, batch=4, steps=6, start=4) == {k: v for k, v in single.items() if k[0] >= 4}


def test_weighted_order_is_independent_of_the_split_and_follows_the_weights():
    weights = [3.0, 1.0, 0.0, 0.0, 4.0]

    def stream(world, micro, steps=50, start=0):
        out = {}
        for rank in range(world):
            order = GlobalOrder(5, 4, micro, DistInfo(rank=rank, world_size=world), 3, weights=weights)
            out.update({(s, j): i for s, _, js, idx in order.micro_batches(start, steps) for j, i in zip(js, idx)})
        return out

    single = stream(1, 4)
    assert stream(2, 1) == single and stream(4, 1) == single
    assert stream(2, 2, start=30) == {k: v for k, v in single.items() if k[0] >= 30}
    counts = np.bincount(list(single.values()), minlength=5) / len(single)
    assert counts[2] == counts[3] == 0                              # zero weight: never drawn
    np.testing.assert_allclose(counts, np.array(weights) / 8, atol=0.06)  # 200 draws: 3 sd of a share ~ 0.1
    for bad, message in (([1.0, 1.0], "2 sample weights for a dataset of 5 rows"),
                         ([0.0] * 5, "not all zero"), ([1, 1, 1, 1, float("nan")], "finite")):
        with pytest.raises(ValueError, match=message):
            GlobalOrder(5, 4, 4, DistInfo(), 0, weights=bad)


def test_global_order_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple of micro_batch_size 1 x 2 processes"):
        GlobalOrder(10, 3, 1, DistInfo(rank=0, world_size=2), 0)


def test_sample_random_depends_only_on_seed_step_and_position():
    together = SampleRandom(seed=5, step=7, positions=[0, 1], device="cpu")
    apart = [SampleRandom(seed=5, step=7, positions=[j], device="cpu") for j in (0, 1)]
    n, u, t = together.randn(4, 2, 2), together.rand(3), together.randint(0, 1000)
    n_sep = torch.cat([r.randn(4, 2, 2) for r in apart])
    u_sep = torch.cat([r.rand(3) for r in apart])
    t_sep = torch.cat([r.randint(0, 1000) for r in apart])
    assert torch.equal(n, n_sep) and torch.equal(u, u_sep) and torch.equal(t, t_sep)
    other_step = SampleRandom(seed=5, step=8, positions=[0, 1], device="cpu").randn(4, 2, 2)
    assert not torch.equal(other_step, SampleRandom(seed=5, step=7, positions=[0, 1], device="cpu").randn(4, 2, 2))
    assert torch.equal(together.bernoulli(0.0), torch.tensor([False, False]))
    assert torch.equal(together.bernoulli(1.0), torch.tensor([True, True]))
    # pinned: a change here silently breaks resuming runs started with an older version
    assert mix_seed(0, "train", 0, 0) == mix_seed(0, "train", 0, 0) == 3128261062711602572


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    path = save_checkpoint(tmp_path, 1, {"method": "m", "rng": [state]}, keep=1)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_checkpoints_are_atomic_pruned_and_checked(tmp_path):
    (tmp_path / ".step_00000001.abc.tmp").write_bytes(b"half a file from a killed run")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"method": "finetune", "trainable": {"w": torch.full((2,), step * 1.0)}},
                        keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob("*.tmp"))
    state = load_checkpoint(tmp_path / "step_00000003.pt", method="finetune")
    assert state["step"] == 3 and torch.equal(state["trainable"]["w"], torch.tensor([3.0, 3.0]))
    with pytest.raises(CheckpointError, match="written by the 'finetune' trainer, not 'anylogo'"):
        load_checkpoint(tmp_path / "step_00000003.pt", method="anylogo")
    (tmp_path / "step_00000009.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="step_00000009.pt is not a readable training checkpoint"):
        load_checkpoint(tmp_path / "step_00000009.pt")


def test_lr_schedule_values():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == 1.0
    assert math.isclose(lr_factor(6, cfg), 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    cfg.lr_schedule = "linear"
    assert math.isclose(lr_factor(6, cfg), 0.5)
    cfg.lr_schedule = "constant"
    assert lr_factor(9, cfg) == 1.0


@pytest.fixture(scope="module")
def tiny_base(model_dirs):
    from train.base_model import load_base

    return load_base(model_dirs["checkpoints"] / "tiny_sd15.safetensors", "cpu", compute_hash=False)


def _loss_grads_and_blocks(base):
    """Loss, UNet gradients and the (block, block_index) every attn1 patch call saw, in call order."""
    model = base.model
    seen = []

    def recorder(n, context, value, extra):
        seen.append((extra["block"], extra["block_index"]))
        return n, context, value

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    sigma = model.model_sampling.sigmas[torch.tensor([100, 700])]
    model.zero_grad(set_to_none=True)
    out = model.apply_model(x, sigma, c_crossattn=context,
                            transformer_options={"patches": {"attn1_patch": [recorder]}})
    forward_calls = len(seen)
    loss = out.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.diffusion_model.named_parameters()}
    return loss.detach(), grads, seen[:forward_calls], seen[forward_calls:]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base):
    from train.grad_checkpoint import CheckpointedForward, enable_gradient_checkpointing

    unet = tiny_base.unet
    keys = list(unet.state_dict())
    unet.requires_grad_(True)
    try:
        loss, grads, forward_blocks, replayed = _loss_grads_and_blocks(tiny_base)
        assert replayed == []
        handle = enable_gradient_checkpointing(unet)
        assert len(handle.modules) == 8 + 7    # ResBlocks: 2 down, 2 middle, 4 up; 7 transformer blocks
        assert list(unet.state_dict()) == keys               # same parameter names
        loss_c, grads_c, forward_c, replayed_c = _loss_grads_and_blocks(tiny_base)
        handle.remove()
        assert not any(isinstance(m.__dict__.get("forward"), CheckpointedForward) for m in unet.modules())
    finally:
        unet.requires_grad_(False)
    assert torch.equal(loss, loss_c)
    for name in grads:                                       # recomputation is deterministic on the CPU: exact
        assert torch.equal(grads[name], grads_c[name]), name
    assert forward_c == forward_blocks
    # every transformer block ran again in backward, seeing its own block name (a snapshot of the options)
    assert sorted(replayed_c) == sorted(forward_blocks) and len(set(forward_blocks)) == 7
