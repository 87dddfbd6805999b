"""CustomContrast's losses against hand computations (loops over the paper's sums), and over 2 gloo ranks."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_patches.customcontrast_losses import (appearance_factors, cscl_loss, location_loss,
                                                 macl_loss)


def cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def test_cscl_equals_eq4_by_hand():
    torch.manual_seed(0)
    v, t = torch.randn(4, 6), torch.randn(4, 6)
    n = 4
    a = [[cos(v[i], t[j]) for j in range(n)] for i in range(n)]
    want = 0.0
    for i in range(n):
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[j][i]) for j in range(n) if j != i))
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[i][j]) for j in range(n) if j != i))
    assert float(cscl_loss(v, t)) == pytest.approx(want, rel=1e-5)


def test_cscl_over_other_subjects_leaves_a_subjects_other_views_out_of_the_denominators():
    torch.manual_seed(3)
    v, t = torch.randn(5, 6), torch.randn(5, 6)
    ids = torch.tensor([7, 7, 2, 2, 9])
    a = [[cos(v[i], t[j]) for j in range(5)] for i in range(5)]
    want = 0.0
    for i in range(5):
        others = [j for j in range(5) if ids[j] != ids[i]]
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[j][i]) for j in others))
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[i][j]) for j in others))
    assert float(cscl_loss(v, t, ids)) == pytest.approx(want, rel=1e-5)
    # the option changes the loss only where a subject has several views; unique ids give Eq. 4 as printed
    assert float(cscl_loss(v, t, torch.arange(5))) == pytest.approx(float(cscl_loss(v, t)), rel=1e-6)
    assert abs(float(cscl_loss(v, t, ids)) - float(cscl_loss(v, t))) > 0.1
    with pytest.raises(ValueError, match="two subjects"):
        cscl_loss(v, t, torch.zeros(5, dtype=torch.long))


def test_macl_equals_eq7_by_hand():
    torch.manual_seed(1)
    n, layers, tau = 5, 3, 0.2
    s = torch.randn(n, layers, 8)
    embeds = torch.randn(n, 6) + 2.0  # positive similarities, as CLIP embeddings of subjects have
    ids = torch.tensor([0, 0, 1, 1, 1])
    r = [[cos(embeds[i], embeds[j]) for j in range(n)] for i in range(n)]
    alpha = appearance_factors(embeds)
    assert float(alpha[0, 1]) == pytest.approx(1 / r[0][1], rel=1e-5)
    terms = []
    for i in range(n):
        for j in range(n):
            if i == j or ids[i] != ids[j]:
                continue
            total = 0.0
            for a in range(layers):
                num = math.exp(alpha[i, j] * cos(s[i, a], s[j, a]) / tau)
                den = sum(math.exp(alpha[i, k] * cos(s[i, a], s[k, a]) / tau) for k in range(n) if k != i)
                total -= math.log(num / den)
            terms.append(total)
    assert float(macl_loss(s, alpha, ids, temperature=tau)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    with pytest.raises(ValueError, match="two views"):
        macl_loss(s, alpha, torch.arange(n))


def test_location_loss_by_hand_and_its_minimum():
    attention = torch.tensor([[[0.9, 0.1], [0.2, 0.6]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    want = (0.1 + 0.2) / 4 - (0.9 + 0.6) / 4
    assert float(location_loss(attention, mask)) == pytest.approx(want)
    # attention exactly on the mask is the minimum; attention everywhere is not
    assert float(location_loss(mask, mask)) < float(location_loss(torch.ones_like(mask), mask))


RANK_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.getcwd())  # the pack root (torchrun runs from it)
from model_patches.customcontrast_losses import appearance_factors, cscl_loss, gather_global, macl_loss

out_dir = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
v, t, s, embeds, ids = torch.load(os.path.join(out_dir, "inputs.pt"))
rows = slice(rank * 3, (rank + 1) * 3)
v_local, t_local, s_local = (x[rows].clone().requires_grad_(True) for x in (v, t, s))
loss = (cscl_loss(gather_global(v_local), gather_global(t_local))
        + macl_loss(gather_global(s_local), appearance_factors(embeds), ids))
loss.backward()
# the gather's backward sums the W ranks' identical gradients of these rows; gradient averaging divides by W
torch.save({"loss": loss.detach(), "grads": [x.grad / world for x in (v_local, t_local, s_local)]},
           os.path.join(out_dir, f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path, trainer):
    """Losses over gathered features: the same value on every rank as in one process, and each rank's rows get
    the one-process gradients once divided by the world size (float32; rtol 1e-6, atol 1e-7)."""
    torch.manual_seed(2)
    v, t, s = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 4, 8)
    embeds, ids = torch.randn(6, 5) + 2.0, torch.tensor([0, 1, 2, 0, 1, 2])  # each subject's views on both ranks
    torch.save((v, t, s, embeds, ids), tmp_path / "inputs.pt")
    refs = [x.clone().requires_grad_(True) for x in (v, t, s)]
    loss = cscl_loss(refs[0], refs[1]) + macl_loss(refs[2], appearance_factors(embeds), ids)
    loss.backward()
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    trainer.run_torchrun(2, [script, tmp_path])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=0)
    for index, ref in enumerate(refs):
        torch.testing.assert_close(torch.cat([r["grads"][index] for r in ranks]), ref.grad, rtol=1e-6, atol=1e-7)
