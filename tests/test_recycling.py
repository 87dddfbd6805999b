"""Model recycling (AnyLogo Eq. 4–7) as an attention replacement: equations on small tensors."""
import math

import pytest
import torch

from model_patches.attention_ops import appended_key_share
from model_patches.recycling import (STATUS_KEY, AttentionRecorder, Extraction, Generation, RecyclingAttention,
                                     SignatureBank, StopExtraction)
from model_patches.unet_layout import TransformerSlot

HEADS, DIM = 2, 4
SLOT = TransformerSlot("output", 3, 0, level=2, channels=HEADS * DIM, heads=HEADS)


def explicit_attention(q, k, v, subject_weight=None, k_sub=None, v_sub=None):
    """softmax(Q [K ; K_sub]^T / sqrt(d)) [V ; V_sub] per head, written out; subject columns scaled by weight."""
    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], HEADS, DIM).transpose(1, 2).double()

    qh, kh, vh = heads(q), heads(k), heads(v)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(DIM)
    weights = logits.exp()
    values = vh
    if k_sub is not None:
        ks, vs = heads(k_sub.expand(q.shape[0], -1, -1)), heads(v_sub.expand(q.shape[0], -1, -1))
        sub = (qh @ ks.transpose(-1, -2) / math.sqrt(DIM)).exp()
        if subject_weight is not None:
            sub = sub * subject_weight.double().view(-1, 1, 1, 1)
        weights = torch.cat([weights, sub], dim=-1)
        values = torch.cat([vh, vs], dim=2)
    out = (weights / weights.sum(-1, keepdim=True)) @ values
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], HEADS * DIM).float()


def options(cond_or_uncond, status=None):
    opts = {"n_heads": HEADS, "dim_head": DIM, "attn_precision": None, "cond_or_uncond": cond_or_uncond,
            "sigmas": torch.tensor([3.0])}
    if status is not None:
        opts[STATUS_KEY] = status
    return opts


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, HEADS * DIM, generator=g) for _ in range(3)]


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(2)
    b = SignatureBank()
    b.store(SLOT.key, torch.randn(1, 3, HEADS * DIM, generator=g), torch.randn(1, 3, HEADS * DIM, generator=g))
    return b


def test_generation_rows_attend_over_content_and_subject_as_eq4(qkv, bank):
    q, k, v = qkv
    out = RecyclingAttention(SLOT)(q, k, v, options([1, 0], Generation(bank, reading_cond=0)))
    uncond, cond = slice(0, 2), slice(2, 4)
    expected_cond = explicit_attention(q[cond], k[cond], v[cond], None, bank.keys[SLOT.key], bank.values[SLOT.key])
    torch.testing.assert_close(out[cond], expected_cond, atol=1e-5, rtol=1e-5)
    # Eq. 7: the unconditional rows see neither the subject nor anything else new
    torch.testing.assert_close(out[uncond], explicit_attention(q[uncond], k[uncond], v[uncond]), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(out[cond], explicit_attention(q[cond], k[cond], v[cond]), atol=1e-3)


def test_only_the_positive_conds_rows_read_whatever_their_position(qkv, bank):
    q, k, v = qkv
    # a call holding only the negative prompt (e.g. SAG's extra pass) where it is cond index 1
    out = RecyclingAttention(SLOT)(q, k, v, options([1, 1], Generation(bank, reading_cond=0)))
    torch.testing.assert_close(out, explicit_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # positive first, uncond second
    out = RecyclingAttention(SLOT)(q, k, v, options([0, 1], Generation(bank, reading_cond=0)))
    torch.testing.assert_close(out[2:], explicit_attention(q[2:], k[2:], v[2:]), atol=1e-5, rtol=1e-5)


def test_strength_and_sparse_drop_follow_the_key_bias(qkv, bank):
    q, k, v = qkv
    strength = torch.tensor([2.0, 0.0])  # row 0 doubles the subject's weight, row 1 dropped (Eq. 5: ∅)
    bias = lambda key, rows, device: torch.log(strength)  # noqa: E731
    out = RecyclingAttention(SLOT)(q[:2], k[:2], v[:2], options([0], Generation(bank, 0, key_bias=bias)))
    expected = explicit_attention(q[:2], k[:2], v[:2], strength, bank.keys[SLOT.key], bank.values[SLOT.key])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], explicit_attention(q[1:2], k[1:2], v[1:2])[0], atol=1e-5, rtol=1e-5)


def test_extraction_banks_the_subject_row_and_stops_after_the_last_layer(qkv):
    q, k, v = qkv
    other = TransformerSlot("output", 4, 0, 2, HEADS * DIM, HEADS)
    status = Extraction(SignatureBank(), (other.key, SLOT.key))
    out = RecyclingAttention(other)(q[:1], k[:1], v[:1], options([0], status))
    torch.testing.assert_close(out, explicit_attention(q[:1], k[:1], v[:1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(StopExtraction):
        RecyclingAttention(SLOT)(q[:1], k[:1] * 2, v[:1] * 3, options([0], status))
    assert torch.equal(status.bank.keys[SLOT.key], k[:1] * 2) and torch.equal(status.bank.values[other.key], v[:1])


def test_without_a_status_the_layer_is_the_stock_attention(qkv):
    import comfy.ldm.modules.attention as attention

    q, k, v = qkv
    out = RecyclingAttention(SLOT)(q, k, v, options([1, 0]))
    assert torch.equal(out, attention.optimized_attention(q, k, v, HEADS))


def test_a_previous_replacement_keeps_running_inside_recycling(qkv, bank):
    q, k, v = qkv
    seen = []

    def previous(q_, k_, v_, extra):
        seen.append((tuple(extra["cond_or_uncond"]), k_.shape[1]))
        return explicit_attention(q_, k_, v_)

    RecyclingAttention(SLOT, previous)(q, k, v, options([1, 0], Generation(bank, 0)))
    assert seen == [((1,), 6), ((0,), 9)]  # uncond chunk with its own keys, cond chunk with 6 + 3 subject keys


def test_recorded_share_is_the_attention_mass_on_subject_tokens(qkv, bank):
    q, k, v = qkv
    recorder = AttentionRecorder()
    RecyclingAttention(SLOT)(q, k, v, options([1, 0], Generation(bank, 0, recorder=recorder)))
    k_sub = bank.keys[SLOT.key].expand(2, -1, -1)
    qh = q[2:].reshape(2, 6, HEADS, DIM).transpose(1, 2)
    full = torch.cat([k[2:], k_sub], 1).reshape(2, 9, HEADS, DIM).transpose(1, 2)
    probs = torch.softmax(qh @ full.transpose(-1, -2) / math.sqrt(DIM), dim=-1)
    expected = probs[..., 6:].sum(-1).mean(1)  # [rows, queries]
    torch.testing.assert_close(recorder.maps[SLOT.name], expected, atol=1e-5, rtol=1e-5)
    assert recorder.per_layer[SLOT.name][0][0] == pytest.approx(3.0)
    # SLD (App. E) written out: |token mean of the delivered subject values - token mean of the cond rows' values|
    v_sub = bank.values[SLOT.key].expand(2, -1, -1)
    sld = (v_sub.mean(dim=1) - v[2:].mean(dim=1)).abs().mean()
    assert recorder.per_layer[SLOT.name][0][2] == pytest.approx(float(sld), rel=1e-5)
    assert float(sld) > 0


def test_appended_key_share_chunks_queries_without_changing_the_result(qkv, bank):
    q, k, _ = qkv
    k_sub = bank.keys[SLOT.key].expand(4, -1, -1)
    whole = appended_key_share(q, k, k_sub, HEADS, query_chunk=1024)
    torch.testing.assert_close(appended_key_share(q, k, k_sub, HEADS, query_chunk=2), whole)
    assert bool(((whole > 0) & (whole < 1)).all())


def test_one_banked_subject_per_row_is_read_by_its_own_row(qkv):
    """Training batches bank one subject per sample; row r must read subject r only."""
    q, k, v = qkv
    g = torch.Generator().manual_seed(3)
    bank = SignatureBank()
    bank.store(SLOT.key, torch.randn(4, 3, HEADS * DIM, generator=g), torch.randn(4, 3, HEADS * DIM, generator=g))
    keep = torch.tensor([0.0, -math.inf, 0.0, 0.0])  # row 1 dropped by sparse recycling
    out = RecyclingAttention(SLOT)(q, k, v, options([0], Generation(bank, 0, key_bias=lambda *a: keep)))
    for row in range(4):
        if row == 1:
            expected = explicit_attention(q[1:2], k[1:2], v[1:2])
        else:
            expected = explicit_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], None,
                                          bank.keys[SLOT.key][row:row + 1], bank.values[SLOT.key][row:row + 1])
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=1e-5)


def test_a_recomputed_layer_does_not_stop_a_complete_extraction(qkv):
    """Gradient checkpointing re-runs blocks during backward: storing into a complete bank must not raise."""
    q, k, v = qkv
    status = Extraction(SignatureBank(), (SLOT.key,))
    with pytest.raises(StopExtraction):
        RecyclingAttention(SLOT)(q[:1], k[:1], v[:1], options([0], status))
    RecyclingAttention(SLOT)(q[:1], k[:1], v[:1], options([0], status))  # the recomputation
