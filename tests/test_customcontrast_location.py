"""CustomContrast's attention-map recorder and location masks (seed 003 §3.4), on small tensors and the tiny UNet."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_patches import customcontrast_location as location
from model_patches.customcontrast import CallState, DecoupledAttention, VisualKV
from model_patches.customcontrast_location import AttentionRecorder
from model_patches.unet_layout import TransformerSlot

HEADS, D = 2, 4
CHANNELS = HEADS * D


def explicit_probabilities(q, k):
    """softmax(QK^T/sqrt(d)) per head with a Python loop over heads: [B, heads, Lq, Lk]."""
    out = []
    for h in range(HEADS):
        qh, kh = q[..., h * D:(h + 1) * D], k[..., h * D:(h + 1) * D]
        out.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(D), dim=-1))
    return torch.stack(out, dim=1)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(3, 16, CHANNELS), torch.randn(3, 154, CHANNELS), torch.randn(3, 154, CHANNELS)


def test_placeholder_map_sums_every_occurrence_and_repeat_and_averages_heads(qkv):
    q, k, v = qkv
    positions = [5, 9]                            # the word twice in a 77-token prompt, context repeated twice
    indices = location.key_positions(154, 77, positions)
    assert indices == [5, 9, 82, 86]
    want = explicit_probabilities(q, k)[..., indices].sum(-1).mean(1)
    got = location.placeholder_map(location.placeholder_probabilities(q, k, HEADS, indices))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)   # float32 softmax, reordered sums
    with pytest.raises(ValueError, match="not a repeat"):
        location.key_positions(100, 77, positions)


def test_visual_map_is_the_visual_keys_share_of_one_joint_softmax(qkv):
    """Against an explicit softmax over [text keys; visual keys]; the decoupled visual softmax averaged over its
    tokens would be 1/m everywhere, which is why the share is recorded."""
    q, k, _ = qkv
    k_v = torch.randn(3, 4, CHANNELS)
    joint = explicit_probabilities(q, torch.cat([k, k_v], dim=1))
    want = joint[..., k.shape[1]:].sum(-1).mean(1)
    got = location.visual_map(q, k, k_v, HEADS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.std() > 1e-3                                            # it varies over pixels
    decoupled = explicit_probabilities(q, k_v).mean(-1).mean(1)
    torch.testing.assert_close(decoupled, torch.full_like(decoupled, 1 / 4))


def test_recorder_keeps_the_graph_only_when_asked(qkv):
    q, k, _ = qkv
    q = q.clone().requires_grad_(True)
    indices = [5]
    for keep_grad in (True, False):
        recorder = AttentionRecorder(keep_grad=keep_grad)
        p = location.placeholder_map(location.placeholder_probabilities(q, k, HEADS, indices))
        recorder.record("input1.0", 0, (4, 4), placeholder=p, visual=location.visual_map(q, k, k[:, :3], HEADS))
        agg = recorder.aggregated(0)
        assert agg.requires_grad == keep_grad
        if keep_grad:
            (grad,) = torch.autograd.grad(agg.sum(), q)
            assert grad.abs().max() > 0
    with pytest.raises(RuntimeError, match="recorded twice"):
        recorder.record("input1.0", 0, (4, 4), placeholder=p)
    with pytest.raises(ValueError, match=r"expected \[rows, 9\]"):
        recorder.record("input2.0", 0, (3, 3), placeholder=p)


def test_aggregation_averages_layers_and_both_maps_at_the_largest_layer():
    torch.manual_seed(1)
    recorder = AttentionRecorder()
    big_v, big_p = torch.rand(2, 16), torch.rand(2, 16)
    small_v, small_p = torch.rand(2, 4), torch.rand(2, 4)
    other = torch.rand(2, 16)
    recorder.record("input1.0", 0, (4, 4), visual=big_v, placeholder=big_p)
    recorder.record("middle0.0", 0, (2, 2), visual=small_v, placeholder=small_p)
    recorder.record("input1.0", 1, (4, 4), visual=other, placeholder=other)
    up = lambda m: F.interpolate(m.view(2, 1, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)  # noqa: E731
    want = (big_v.view(2, 4, 4) + big_p.view(2, 4, 4) + up(small_v)[:, 0] + up(small_p)[:, 0]) / 4
    torch.testing.assert_close(recorder.aggregated(0), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(recorder.aggregated(1), other.view(2, 4, 4))       # subjects kept apart
    torch.testing.assert_close(recorder.aggregated(0, size=(2, 2)).shape, torch.Size([2, 2, 2]))
    assert recorder.subjects() == [0, 1] and sorted(recorder.layers(0)) == ["input1.0", "middle0.0"]


def test_layer_size_follows_the_unets_rounding():
    assert location.layer_size(64 * 64, [2, 4, 64, 64]) == (64, 64)
    assert location.layer_size(16 * 8, [2, 4, 64, 32]) == (16, 8)
    assert location.layer_size(4 * 3, [1, 4, 13, 9]) == (4, 3)      # 13x9 → 7x5 → 4x3
    with pytest.raises(ValueError, match="no downsampling"):
        location.layer_size(10, [1, 4, 8, 8])


def test_location_mask_scales_each_row_and_a_flat_map_masks_nothing():
    maps = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0.3, 0.3], [0.3, 0.3]]])
    mask = location.location_mask(maps)
    torch.testing.assert_close(mask[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(mask[1], torch.ones(2, 2))


def test_masked_attention_equals_the_explicit_masked_probabilities(qkv):
    """mask_placeholder: the placeholder columns of softmax(QK^T) multiplied per pixel by the mask, others
    unchanged, times V; mask_visual: the visual probabilities multiplied per pixel."""
    q, k, v = qkv
    indices = location.key_positions(154, 77, [5])
    keep = torch.rand(3, 16)
    probs = explicit_probabilities(q, k)
    scaled = probs.clone()
    scaled[..., indices] *= keep[:, None, :, None]
    vh = v.view(3, 154, HEADS, D).transpose(1, 2)
    want = (scaled @ vh).transpose(1, 2).reshape(3, 16, CHANNELS)
    text = (probs @ vh).transpose(1, 2).reshape(3, 16, CHANNELS)
    got = location.mask_placeholder(text, location.placeholder_probabilities(q, k, HEADS, indices), v, indices,
                                    keep, HEADS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    k_v, v_v = torch.randn(3, 4, CHANNELS), torch.randn(3, 4, CHANNELS)
    pv = explicit_probabilities(q, k_v) * keep[:, None, :, None]
    want_v = (pv @ v_v.view(3, 4, HEADS, D).transpose(1, 2)).transpose(1, 2).reshape(3, 16, CHANNELS)
    visual = (explicit_probabilities(q, k_v) @ v_v.view(3, 4, HEADS, D).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(location.mask_visual(visual.reshape(3, 16, CHANNELS), keep), want_v, rtol=1e-5,
                               atol=1e-6)


def test_decoupled_attention_records_cond_rows_and_masks_only_what_it_is_told():
    """Recording changes nothing (torch.equal); a mask of ones changes nothing beyond rounding; the uncond rows are
    never masked; a subject's mask reaches only that subject's placeholder and visual term."""
    torch.manual_seed(2)
    slot = TransformerSlot("input", 1, 0, 0, CHANNELS, HEADS)
    kv = VisualKV(6, CHANNELS)
    for p in kv.parameters():
        torch.nn.init.normal_(p)
    q, k, v = torch.randn(2, 16, CHANNELS), torch.randn(2, 77, CHANNELS), torch.randn(2, 77, CHANNELS)
    base = {"n_heads": HEADS, "cond_or_uncond": [1, 0], "original_shape": [2, 4, 4, 4]}
    tokens = torch.randn(1, 3, 6)

    def run(**kw):
        state = CallState(None, tokens, 0.5, placeholder=[7], **kw)
        return DecoupledAttention(slot, kv)(q, k, v, {**base, "subject_customization.customcontrast": state}), state

    plain, _ = run()
    recorded, state = run(recorder=AttentionRecorder())
    assert torch.equal(recorded, plain)
    maps = state.recorder.maps[("input1.0", 0)]
    assert maps.visual.shape == (1, 16) and maps.placeholder.shape == (1, 16)
    want = explicit_probabilities(q[1:], k[1:])[..., [7]].sum(-1).mean(1)
    torch.testing.assert_close(maps.placeholder, want, rtol=1e-5, atol=1e-6)
    ones, _ = run(masks={0: torch.ones(1, 4, 4)})
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-6)  # float32: the correction term is 0·A·v
    half, _ = run(masks={0: torch.zeros(1, 4, 4)})
    assert torch.equal(half[0], plain[0]) and not torch.allclose(half[1], plain[1])
    other, _ = run(masks={1: torch.zeros(1, 4, 4)})                  # another subject's mask: not ours
    assert torch.equal(other, plain)
