"""EqDiff's mechanisms (RRA, MGDP, FDTE, the Custom Diffusion cross-attention) against their equations."""
from __future__ import annotations

import math

import pytest
import torch

from model_patches import eqdiff_mask, eqdiff_rra, eqdiff_tokens
from model_patches.eqdiff import EqDiffPatch, EqDiffSettings, EqDiffWeights, build_patch


class Kit:
    def __init__(self, nodes):
        self.nodes = nodes
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]

    def weights(self, seed=None, scale=0.05):
        slots = eqdiff_rra.rra_slots(self.model)
        modules = eqdiff_rra.RRAModules.for_model(self.model, slots)
        if seed is not None:  # a "trained" head: nonzero fusion
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in modules.values():
                    m.fusion.weight.copy_(torch.randn(m.fusion.weight.shape, generator=g) * scale)
                    m.fusion.bias.copy_(torch.randn(m.fusion.bias.shape, generator=g) * scale + 0.3)
        return EqDiffWeights("test", modules, [s.name for s in slots], {})

    def reference(self, seed=3):
        return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))

    def patched(self, weights=None, **settings):
        model = self.model.clone()
        build_patch(model, weights or self.weights(), self.reference(), EqDiffSettings(**settings)).install(model)
        return model

    def sample(self, model, seed=1, cfg=5.0, steps=3):
        pos = self.nodes.CLIPTextEncode().encode(self.clip, "a photo of sks cat")[0]
        neg = self.nodes.CLIPTextEncode().encode(self.clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return self.nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]["samples"]


@pytest.fixture(scope="module")
def kit(comfy):
    return Kit(comfy)


# ---- RRA --------------------------------------------------------------------------------------------------------

def test_zero_initialised_fusion_is_exactly_the_unpatched_model(kit):
    base = kit.sample(kit.model)
    recorded = kit.patched(record=True)
    assert torch.equal(kit.sample(recorded), base)
    recorder = recorded.get_attachment("subject_customization.eqdiff").recorder
    # the reference pass and the fusion really ran on every middle/decoder layer, with m = 0 everywhere
    assert sorted(recorder.per_layer) == sorted(s.name for s in eqdiff_rra.rra_slots(kit.model))
    assert all(m == 0.0 for values in recorder.per_layer.values() for _, m in values)


def test_strength_zero_is_exactly_the_unpatched_model_with_trained_weights(kit):
    base = kit.sample(kit.model)
    trained = kit.weights(seed=0)
    assert torch.equal(kit.sample(kit.patched(trained, strength=0.0)), base)
    changed = kit.sample(kit.patched(trained))
    assert torch.isfinite(changed).all() and (changed - base).abs().max() > 1e-4


def test_rra_is_limited_to_middle_and_decoder_self_attention(kit):
    slots = eqdiff_rra.rra_slots(kit.model)
    assert {s.block for s in slots} == {"middle", "output"} and len(slots) == 5  # tiny UNet: 1 middle + 4 decoder


def test_patching_leaves_the_input_model_alone(kit):
    before = kit.sample(kit.model)
    kit.sample(kit.patched(kit.weights(seed=1)))
    assert torch.equal(kit.sample(kit.model), before)
    assert "attn1" not in kit.model.model_options.get("transformer_options", {}).get("patches_replace", {})


def test_rra_layers_are_loaded_and_offloaded_by_comfy_model_management(kit):
    from comfy import model_management

    weights = kit.weights(seed=4)
    patched = kit.patched(weights)
    extra = patched.get_additional_models_with_key("subject_customization.eqdiff")
    assert len(extra) == 1 and extra[0].model is weights.modules and extra[0] in patched.get_nested_additional_models()
    assert kit.model.get_additional_models_with_key("subject_customization.eqdiff") == []
    assert kit.model.get_nested_additional_models() == []
    assert extra[0].load_device == patched.load_device and extra[0].offload_device == patched.offload_device
    before = kit.sample(kit.model)
    # ComfyUI's own sampling path (prepare_sampling → load_models_gpu with the nested additional models) loads
    # the RRA holder beside the UNet; the clone's holder is a clone of the patcher set at install time
    changed = kit.sample(patched)
    loaded = model_management.loaded_models()
    assert any(m.model is weights.modules for m in loaded), "the RRA layers were not loaded with the MODEL"
    model_management.load_models_gpu([patched], force_full_load=True)
    assert any(m.model is weights.modules for m in model_management.loaded_models())
    assert all(p.device == patched.load_device for p in weights.modules.parameters())
    assert not torch.equal(changed, before)
    assert torch.equal(kit.sample(kit.model), before)  # the original MODEL samples as before


def _split(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def test_eq8_eq9_computed_explicitly_equals_the_hooks():
    """One layer on small tensors: the three hooks against Eq. 8–9 written out with an explicit softmax."""
    torch.manual_seed(0)
    c, heads, lq, lr, rows = 16, 2, 6, 5, 3
    slot = eqdiff_rra.TransformerSlot("output", 3, 0, 0, c, heads)
    module = eqdiff_rra.ResidualReferenceAttention(c)
    with torch.no_grad():
        module.fusion.weight.normal_(0, 0.3)
        module.fusion.bias.normal_(0.3, 0.3)
    modules = eqdiff_rra.RRAModules({"output3_0": module})
    q, k, v = (torch.randn(rows, lq, c, dtype=torch.float64) for _ in range(3))
    reference = torch.randn(1, lr, c, dtype=torch.float64)
    to_out = torch.nn.Linear(c, c).double()
    bank = eqdiff_rra.ReferenceBank({slot.key: reference})
    status = eqdiff_rra.Read(bank, modules.double(), strength=0.7)
    extra = {"n_heads": heads, "block": ("output", 3), "block_index": 0, eqdiff_rra.STATUS_KEY: status}
    sa_hook = eqdiff_rra.RRAAttention(slot)(q, k, v, extra)
    out = eqdiff_rra.RRAOutput([slot])(to_out(sa_hook), extra)

    def attention(qq, kk, vv):
        p = torch.softmax(_split(qq, heads) @ _split(kk, heads).transpose(-1, -2) / math.sqrt(c // heads), -1)
        return (p @ _split(vv, heads)).transpose(1, 2).reshape(qq.shape)

    f = reference.expand(rows, -1, -1)
    ra = attention(q, f @ module.to_k_res.weight.T, f @ module.to_v_res.weight.T)
    sa = attention(q, k, v)
    fi = torch.cat([ra, sa], -1) @ module.fusion.weight.T + module.fusion.bias
    r, m = fi[..., :c], 0.7 * fi[..., c:].clamp(0, 1)
    h = to_out(sa)
    torch.testing.assert_close(sa_hook, sa, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, h * (1 - m) + r * m, rtol=1e-10, atol=1e-12)
    assert 0 < float((m > 0).double().mean()) < 1  # the clamp is exercised on both sides


def test_reference_projections_start_as_the_layer_own():
    from comfy.ldm.modules.attention import CrossAttention

    attn = CrossAttention(32, heads=2, dim_head=16)
    for p in attn.parameters():  # ComfyUI's layers start uninitialised
        torch.nn.init.normal_(p)
    module = eqdiff_rra.ResidualReferenceAttention.from_layer(attn)
    assert torch.equal(module.to_k_res.weight, attn.to_k.weight) and torch.equal(module.to_v_res.weight,
                                                                                 attn.to_v.weight)
    assert not module.fusion.weight.any() and not module.fusion.bias.any()


def test_foreground_mass_is_eq10_first_term():
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    fg = (torch.rand(2, 6) > 0.5).float()
    got = eqdiff_rra.foreground_mass(q, k, fg, heads=2)
    want = torch.stack([torch.stack([(torch.softmax(q[b, :, h * 4:(h + 1) * 4] @ k[b, :, h * 4:(h + 1) * 4].T / 2, -1)
                                      @ fg[b]) for h in range(2)]).mean(0) for b in range(2)])
    torch.testing.assert_close(got, want)


def test_reference_input_modes(kit):
    base = kit.model.model
    latent, noise = kit.reference(), torch.randn(1, 4, 8, 8)
    sigma = base.model_sampling.sigmas[500:501].float()
    x, s = eqdiff_rra.reference_input(base, latent, sigma, "clean")
    # the UNet's own input (after c_in) is the clean latent, as the official pipeline feeds it
    torch.testing.assert_close(base.model_sampling.calculate_input(s, x), latent)
    x, s = eqdiff_rra.reference_input(base, latent, sigma, "noised", noise=noise)
    torch.testing.assert_close(x, latent + sigma * noise)
    x, s = eqdiff_rra.reference_input(base, latent, sigma, "training", noise=noise)
    torch.testing.assert_close(s, base.model_sampling.sigmas[498:499].float(), rtol=1e-5, atol=0)
    _, s0 = eqdiff_rra.reference_input(base, latent, base.model_sampling.sigmas[1:2].float(), "training", noise=noise)
    torch.testing.assert_close(s0, base.model_sampling.sigmas[0:1].float(), rtol=1e-5, atol=0)  # floored at t = 0


def test_a_reference_mask_removes_reference_tokens_outside_it():
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1
    bias = eqdiff_rra.reference_key_bias(mask, (8, 8), 2)
    assert set(bias) == {64, 16}
    grid = bias[64].view(8, 8)
    assert (grid[:4, :4] == 0).all() and torch.isneginf(grid[4:]).all() and torch.isneginf(grid[:, 4:]).all()


def test_a_second_eqdiff_on_the_same_model_is_refused(kit):
    model = kit.patched()
    with pytest.raises(ValueError, match="already has EqDiff applied"):
        build_patch(model, kit.weights(), kit.reference(), EqDiffSettings()).install(model)


# ---- MGDP -------------------------------------------------------------------------------------------------------

def test_dilation_is_iterated_5x5_max_pooling():
    m = torch.zeros(1, 1, 21, 21)
    m[..., 10, 10] = 1
    once, five = eqdiff_mask.dilate(m, 1), eqdiff_mask.dilate(m, 5)
    assert int(once.sum()) == 25 and bool(once[..., 8:13, 8:13].all())
    assert int(five.sum()) == 21 * 21  # 5 iterations grow the point by 10 cells on each side: 21x21


def test_mgdp_input_and_area_normalised_loss_by_hand():
    x_t, x0 = torch.full((2, 4, 2, 2), 3.0), torch.full((2, 4, 2, 2), -1.0)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask[1] = 1
    z = eqdiff_mask.mgdp_input(x_t, x0, mask)
    assert z[0, :, 0, 0].eq(3).all() and z[0, :, 1, 1].eq(-1).all() and z[1].eq(3).all()
    pred, target = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    pred[0, :, 0, 0], pred[0, :, 1, 1] = 2.0, 100.0  # the error outside the mask is ignored
    pred[1] = 1.0
    loss = eqdiff_mask.masked_loss(pred, target, mask)
    torch.testing.assert_close(loss, torch.tensor([4.0, 1.0]))  # (4 channels x 2²) / (4 channels x 1 cell)
    with pytest.raises(ValueError, match="empty"):
        eqdiff_mask.masked_loss(pred, target, torch.zeros_like(mask))


def test_latent_mask_keeps_thin_subjects():
    m = torch.zeros(1, 64, 64)
    m[:, 10, 10:12] = 1
    lm = eqdiff_mask.latent_mask(m, (8, 8))
    assert lm.shape == (1, 1, 8, 8) and int(lm.sum()) == 1 and lm[0, 0, 1, 1] == 1


# ---- FDTE -------------------------------------------------------------------------------------------------------

def test_band_draws_follow_01_01_08():
    """20 000 draws over 20 000 seeds: each frequency within 0.012 of p (> 4 standard errors: sqrt(.09/2e4) =
    0.0021 for p = 0.1, 0.0028 for p = 0.8)."""
    n = 20000
    counts = torch.zeros(3)
    for seed in range(n):
        counts[eqdiff_tokens.draw_band(torch.Generator().manual_seed(seed))] += 1
    freq = counts / n
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.1, 0.8]), rtol=0, atol=0.012)
    assert eqdiff_tokens.draw_band(torch.Generator().manual_seed(0), (0.0, 0.0, 1.0)) == eqdiff_tokens.ORIGINAL


def test_band_token_sum_is_the_original():
    e = torch.randn(2, 768)
    assert torch.equal(eqdiff_tokens.band_token(e, eqdiff_tokens.ORIGINAL), e[0] + e[1])
    assert torch.equal(eqdiff_tokens.band_token(e, eqdiff_tokens.HIGH), e[1])
    files = eqdiff_tokens.embedding_files(e)
    assert {k: tuple(v["clip_l"].shape) for k, v in files.items()} == {"": (1, 768), "_low": (1, 768),
                                                                         "_high": (1, 768)}


def test_placeholder_is_found_by_token_id(kit):
    assert eqdiff_tokens.placeholder_id(kit.clip, "sks") == 48136
    vector = torch.randn(768)
    tokens = eqdiff_tokens.tokens_with_vector(kit.clip, "sks, a photo of a sks cat", "sks", vector)
    placed = [i for i, pair in enumerate(tokens["l"][0]) if torch.is_tensor(pair[0])]
    assert placed == [1, 7]  # after the start token, and as the 7th word piece (",": one token)
    with pytest.raises(eqdiff_tokens.PlaceholderError, match="does not contain the placeholder"):
        eqdiff_tokens.tokens_with_vector(kit.clip, "a photo of a cat", "sks", vector)
    with pytest.raises(eqdiff_tokens.PlaceholderError, match="tokens in CLIP's tokenizer"):
        eqdiff_tokens.placeholder_id(kit.clip, "qwertyzxcv")


def fp32_clip():
    """The tiny checkpoint's CLIP in fp32, as the trainer loads it (on a CPU ComfyUI keeps CLIP in fp16, where a
    token's gradient underflows)."""
    import comfy.sd
    from standalone import tiny_models

    path = tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors"
    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_model=False,
                                                 te_model_options={"dtype": torch.float32})[1]


def test_the_token_conditioning_is_differentiable_in_the_vector():
    clip = fp32_clip()
    vector = eqdiff_tokens.init_vector(clip, "sks").requires_grad_(True)
    cond = eqdiff_tokens.encode_with_vector(clip, "a photo of sks cat", "sks", vector)
    (cond[0, 4:7] * torch.randn(3, 768, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    with torch.no_grad():  # the gradient is the conditioning's, values unchanged by the hooks
        plain = clip.encode_from_tokens(eqdiff_tokens.tokens_with_vector(clip, "a photo of sks cat", "sks", vector))
    assert torch.equal(cond.detach(), plain)
    # causal text attention: the positions before the placeholder do not see it
    other = eqdiff_tokens.encode_with_vector(clip, "a photo of sks cat", "sks", vector.detach() + 1)
    assert torch.equal(other[0, :4], plain[0, :4]) and not torch.equal(other[0, 4], plain[0, 4])


# ---- Custom Diffusion cross-attention ------------------------------------------------------------------------------

def test_cross_attention_kv_keeps_values_and_blocks_the_bos_gradient():
    from model_patches.custom_diffusion import CrossAttentionKV, TokenMapRecorder

    slot = eqdiff_rra.TransformerSlot("input", 1, 0, 0, 8, 2)
    q = torch.randn(2, 4, 8)
    k, v = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    recorder = TokenMapRecorder([3, None])
    extra = {"n_heads": 2, "subject_customization.custom_diffusion": recorder}
    from model_patches.attention_ops import host_attention

    out = CrossAttentionKV(slot)(q, k, v, extra)
    torch.testing.assert_close(out, host_attention(q, k, v, extra))
    out.sum().backward()
    assert not k.grad[:, 0].any() and not v.grad[:, 0].any() and k.grad[:, 1:].any() and v.grad[:, 1:].any()
    rows, probs = recorder.maps["input1.0"]
    p = torch.softmax(q[0].view(4, 2, 4).transpose(0, 1) @ k[0].detach().view(5, 2, 4).permute(1, 2, 0) / 2, -1)
    assert rows == [0]
    torch.testing.assert_close(probs[0], p[..., 3].mean(0))


def test_kv_parameter_names_cover_every_cross_attention(kit):
    from model_patches.custom_diffusion import kv_parameter_names

    names = kv_parameter_names(kit.model.model)
    assert len(names) == 2 * 7  # the tiny UNet: 2 encoder + 1 middle + 4 decoder transformers
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)


def test_a_zero_initialised_head_receives_a_gradient():
    """The mask head starts at m~ = 0, on clamp's lower bound: its gradient must pass there, or RRA never trains
    (this torch's clamp gives 0 at the bound)."""
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    y = eqdiff_rra.clamp_unit(x)
    assert torch.equal(y, x.detach().clamp(0, 1))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    module = eqdiff_rra.ResidualReferenceAttention(4)
    h, ra, sa = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    out, _ = module.fuse(h, ra, sa)
    assert torch.equal(out, h)
    out.pow(2).sum().backward()
    assert module.fusion.weight.grad[4].abs().sum() > 0  # the mask row learns first; r follows once m > 0
