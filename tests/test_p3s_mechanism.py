"""P3S mechanisms against the paper's equations: ε_t curves, RNGR (Eq. 4/5), Eq. 7/8 in the patched
self-attention (with the pack's per-layer gate: Eq. 8 at 1, the plain layer at 0), the copy's initialisation from
the base, L_ac (Eq. 11–13), identity at zero initialisation and where nothing is injected, the first training step
from zero initialisation."""
import math

import pytest
import torch

from model_patches.attention_ops import host_attention
from model_patches.p3s import (ConsistencyRecord, P3SSettings, attention_consistency_loss, build_patch,
                               gated_self_attention, widen_self_attention, with_map_recording)
from model_patches.p3s_copy import InjectionCopy, MapRecorder, copy_stages
from model_patches.p3s_rngr import RNGREncoder
from model_patches.p3s_schedule import timestep_fraction, timestep_weight
from model_patches.unet_layout import diffusion_model_of, transformer_slots


@pytest.fixture(scope="module")
def sd15(comfy):
    model, clip, vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
    return model


@pytest.fixture(scope="module")
def copy(sd15):
    return InjectionCopy(sd15)


def randomised(copy_module, seed=0, scale=0.05):
    """The copy with its zero-initialised projections and gates set to seeded random values (a 'trained' copy)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in (*copy_module.self_proj, *copy_module.cross_proj):
            for p in proj.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        copy_module.gates.copy_(0.5 + torch.rand(copy_module.gates.shape, generator=gen))
    return copy_module


def make_patch(model, copy_module, **settings):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    states = torch.randn(1, 17, 64, generator=torch.Generator().manual_seed(4))
    return build_patch(model, copy_module, RNGREncoder(clip_width=64), latent, states, P3SSettings(**settings))


def unet_out(model, options, sigma=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    sig = torch.full((2,), sigma)
    with torch.no_grad():
        return model.model.apply_model(x, sig, c_crossattn=context, transformer_options=options)


# ---- ε_t (Eq. 10, Table III) --------------------------------------------------------------------------------

def test_timestep_weight_values_per_curve():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(timestep_weight(u, "paper"), torch.tensor([1.2, 1.2 - 0.5 / 16, 1.075, 0.7]))
    torch.testing.assert_close(timestep_weight(u, "paper", alpha=1.0, beta=0.0, k=1.0), 1 - u)
    torch.testing.assert_close(timestep_weight(u, "fixed"), torch.ones(4))
    torch.testing.assert_close(timestep_weight(u, "increasing"), torch.tensor([1.0, 0.5625, 0.25, 0.0]))
    torch.testing.assert_close(timestep_weight(u, "decreasing"), torch.tensor([0.0, 0.0625, 0.25, 1.0]))
    for bad in (dict(curve="cubic"), dict(alpha=math.nan), dict(k=0.0)):
        with pytest.raises(ValueError):
            timestep_weight(u, **{"curve": "paper", **bad})


def test_t_over_T_comes_from_the_models_schedule(sd15):
    sampling = sd15.get_model_object("model_sampling")
    t = sampling.timestep(sampling.sigmas[[0, 499, 999]])
    torch.testing.assert_close(timestep_fraction(sampling, t), torch.tensor([0.0, 0.499, 0.999]))


# ---- RNGR (Eq. 4/5) -------------------------------------------------------------------------------------------

def test_rngr_is_the_identity_at_initialisation_and_eq4_otherwise():
    rngr = RNGREncoder(clip_width=32, width=16)
    latent, states = torch.randn(2, 4, 6, 5), torch.randn(1, 9, 32)
    assert torch.equal(rngr(latent, states), latent)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rngr.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    z = torch.einsum("oc,bchw->bohw", rngr.z.weight[:, :, 0, 0], latent) + rngr.z.bias.view(1, -1, 1, 1)
    q = z.flatten(2).transpose(1, 2) @ rngr.to_q.weight.T
    k, v = states @ rngr.to_k.weight.T, states @ rngr.to_v.weight.T
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1) @ v            # [2, 30, 4]
    expected = latent + attn.transpose(1, 2).reshape(2, 4, 6, 5)
    torch.testing.assert_close(rngr(latent, states), expected)


# ---- the copy --------------------------------------------------------------------------------------------------

def test_copy_has_one_resblock_per_level_run_and_one_transformer_per_slot(sd15, copy):
    slots = transformer_slots(sd15)
    assert copy.slots == slots and len(copy.transformers) == len(slots)
    stages = copy_stages(slots)
    assert [s.has_resblock for s in stages] == [True, True, True, True, False, True, False]
    assert [s.resample for s in stages] == [(), (1,), (), (), (), (-1,), ()]


def test_copy_starts_from_the_base_weights_and_zero_projections(sd15, copy):
    unet = diffusion_model_of(sd15)
    for index, slot in enumerate(copy.slots):
        block = {"input": unet.input_blocks, "output": unet.output_blocks}.get(slot.block)
        base_tf = block[slot.block_id][1] if block is not None else unet.middle_block[1]
        for (name, ours), (_, theirs) in zip(copy.transformers[index].state_dict().items(),
                                             base_tf.state_dict().items()):
            assert torch.equal(ours, theirs), f"{slot.name}.{name}"
        assert not any(p.abs().sum() for p in copy.self_proj[index].parameters())
        assert not any(p.abs().sum() for p in copy.cross_proj[index].parameters())
    # a decoder ResNet block keeps the weights that read h (ComfyUI concatenates [h ; skip])
    base_res = unet.output_blocks[0][0]
    ours = copy.resblocks[3]
    assert ours.channels == 640 and base_res.channels == 1280
    assert torch.equal(ours.in_layers[2].weight, base_res.in_layers[2].weight[:, :640])
    assert torch.equal(ours.in_layers[0].weight, base_res.in_layers[0].weight[:640])
    assert torch.equal(copy.conv_in.weight, unet.input_blocks[0][0].weight[:, :4])
    assert torch.equal(copy.time_embed[0].weight, unet.time_embed[0].weight)


# ---- Eq. 7/8 ---------------------------------------------------------------------------------------------------

def split_heads(t, heads):
    b, length, inner = t.shape
    return t.reshape(b, length, heads, inner // heads).transpose(1, 2)


def merge_heads(t):
    b, heads, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, heads * d)


def explicit_eq8(attn, z, wf, lam, heads):
    """Eq. 7/8 literally: one softmax over the keys W_K[z ; w f], values W_V[z + λ w f ; w f]."""
    q = split_heads(z @ attn.to_q.weight.T, heads)
    k = split_heads(torch.cat([z, wf], 1) @ attn.to_k.weight.T, heads)
    v = split_heads(torch.cat([z + lam * wf, wf], 1) @ attn.to_v.weight.T, heads)
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    return attn.to_out(merge_heads(out))


def explicit_gated(attn, z, wf, lam, heads, gate):
    """The gated form from exponential sums: (1 − γρ)·Attn(own) + γρ·Attn(appended), ρ = B/(A + B) with A, B the
    summed exp(logit) over the own and the appended keys."""
    q = split_heads(z @ attn.to_q.weight.T, heads)
    k_own, k_app = split_heads(z @ attn.to_k.weight.T, heads), split_heads(wf @ attn.to_k.weight.T, heads)
    v_own = split_heads((z + lam * wf) @ attn.to_v.weight.T, heads)
    v_app = split_heads(wf @ attn.to_v.weight.T, heads)
    e_own = (q @ k_own.transpose(-1, -2) / math.sqrt(q.shape[-1])).exp()
    e_app = (q @ k_app.transpose(-1, -2) / math.sqrt(q.shape[-1])).exp()
    a, b = e_own.sum(-1, keepdim=True), e_app.sum(-1, keepdim=True)
    rho = b / (a + b)
    out = (1 - gate * rho) * (e_own @ v_own / a) + gate * rho * (e_app @ v_app / b)
    return attn.to_out(merge_heads(out))


def gated_layer(attn, heads, z, f, weight, lam, gate):
    """The patched layer as the transformer block runs it: attn1_patch's widening, the block's frozen
    projections of the widened inputs, the gated replacement, to_out."""
    n, context, value = widen_self_attention(z, z, z, f, weight, lam)
    q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(value)
    out = gated_self_attention(q, k, v, f.shape[1], torch.tensor(gate), {"n_heads": heads})
    return attn.to_out(out)


@pytest.fixture(scope="module")
def layer(sd15):
    block = diffusion_model_of(sd15).output_blocks[0][1].transformer_blocks[0]
    gen = torch.Generator().manual_seed(0)
    z, f = torch.randn(2, 16, 640, generator=gen), torch.randn(2, 16, 640, generator=gen)
    return block.attn1, block.n_heads, z, f, torch.tensor([0.7, 1.2])


def test_gate_1_is_eq8(layer):
    attn, heads, z, f, weight = layer
    with torch.no_grad():
        patched = gated_layer(attn, heads, z, f, weight, 0.2, 1.0)
        expected = explicit_eq8(attn, z, f * weight.view(-1, 1, 1), 0.2, heads)
    # float32 softmax via log-sum-exps vs one softmax: rounding only
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [0.3, 1.7, -0.4])
def test_other_gates_mix_the_plain_and_the_appended_attention(layer, gate):
    attn, heads, z, f, weight = layer
    with torch.no_grad():
        patched = gated_layer(attn, heads, z, f, weight, 0.2, gate)
        expected = explicit_gated(attn, z, f * weight.view(-1, 1, 1), 0.2, heads, gate)
        eq8 = explicit_eq8(attn, z, f * weight.view(-1, 1, 1), 0.2, heads)
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5)  # float32 rounding only
    assert not torch.allclose(patched, eq8, atol=1e-4)


def test_gate_0_is_the_host_attention_over_the_own_keys_bit_for_bit(layer):
    attn, heads, z, f, weight = layer
    n, context, value = widen_self_attention(z, z, z, f, weight, 0.2)
    with torch.no_grad():
        q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(value)
        gated = gated_self_attention(q, k, v, 16, torch.tensor(0.0), {"n_heads": heads})
        assert torch.equal(gated, host_attention(q, k[:, :16], v[:, :16], {"n_heads": heads}))
        # and with f = 0 (zero-initialised projections) that is the stock layer itself
        zero = gated_layer(attn, heads, z, torch.zeros_like(f), weight, 0.2, 0.0)
        assert torch.equal(zero, attn(z))


def test_ungated_eq8_at_zero_features_would_damp_the_layer(layer):
    """Why the gate: Eq. 8 alone at f = 0 is not the identity. The L appended keys W_K·0 have logit 0 and value 0,
    so each head's output is the stock one times A/(A+L), A = Σ exp(q·k/√d) over the own keys."""
    attn, heads, z, f, weight = layer
    with torch.no_grad():
        q, k, v = split_heads(attn.to_q(z), heads), split_heads(attn.to_k(z), heads), split_heads(attn.to_v(z), heads)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        a = logits.exp().sum(-1, keepdim=True)
        damped = attn.to_out(merge_heads((torch.softmax(logits, -1) @ v) * a / (a + 16)))
        eq8 = gated_layer(attn, heads, z, torch.zeros_like(f), weight, 0.2, 1.0)
    torch.testing.assert_close(eq8, damped, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eq8, attn(z), atol=1e-4)


# ---- identity, isolation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(strength=0.0), dict(sigma_start=1.0, sigma_end=0.5)],
                         ids=["strength_0", "outside_start_end"])
def test_no_injection_is_exactly_the_unpatched_model(sd15, copy, settings):
    patched = sd15.clone()
    make_patch(sd15, randomised(InjectionCopy(sd15)), **settings).install(patched)
    options = patched.model_options["transformer_options"]
    assert torch.equal(unet_out(sd15, options), unet_out(sd15, {}))


def test_zero_initialised_copy_is_exactly_the_unpatched_model(sd15):
    """Zero projections, zero gates, zero Z/W_V of the RNGR encoder, strength 1 and the paper's curve: every
    layer gets features (f = g = 0) and still computes the stock result, bit for bit."""
    patched = sd15.clone()
    make_patch(sd15, InjectionCopy(sd15)).install(patched)
    options = patched.model_options["transformer_options"]
    for sigma in (14.0, 3.0, 0.1):
        assert torch.equal(unet_out(sd15, options, sigma=sigma), unet_out(sd15, {}, sigma=sigma))


def test_one_step_from_zero_initialisation_moves_the_gates_and_the_projections(sd15):
    """The gradient reaches every gate (through ρ·(Attn(appended) − Attn(own))) and the projections (through the
    λ w f of the own values and the cross-attention residual) although all of them start at zero."""
    copy_module = InjectionCopy(sd15).requires_grad_(True)
    patched = sd15.clone()
    make_patch(sd15, copy_module).install(patched)
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen)
    target = torch.randn(1, 4, 8, 8, generator=gen)
    optimiser = torch.optim.Adam(copy_module.parameters(), lr=1e-3)
    out = sd15.model.apply_model(x, torch.full((1,), 3.0), c_crossattn=context,
                                 transformer_options=patched.model_options["transformer_options"])
    (out - target).square().mean().backward()
    optimiser.step()
    assert bool((copy_module.gates != 0).all()), copy_module.gates
    for index in range(len(copy_module.slots)):
        assert copy_module.self_proj[index].weight.abs().sum() > 0, index
        assert copy_module.cross_proj[index].weight.abs().sum() > 0, index


def test_injection_changes_the_output_and_leaves_the_original_model_alone(sd15, copy):
    before = unet_out(sd15, {})
    patched = sd15.clone()
    make_patch(sd15, randomised(InjectionCopy(sd15))).install(patched)
    out = unet_out(sd15, patched.model_options["transformer_options"])
    assert not torch.allclose(out, before, atol=1e-4)
    assert torch.equal(unet_out(sd15, sd15.model_options.get("transformer_options", {})), before)
    assert "attn1_patch" not in sd15.model_options.get("transformer_options", {}).get("patches", {})
    assert sd15.get_attachment("subject_customization.p3s") is None
    assert len(patched.get_additional_models_with_key("subject_customization.p3s")) == 1


def test_applying_twice_is_refused(sd15, copy):
    patched = sd15.clone()
    make_patch(sd15, copy).install(patched)
    with pytest.raises(ValueError, match="already has P3S applied"):
        make_patch(sd15, copy).install(patched.clone())


# ---- L_ac (Eq. 11–13) ------------------------------------------------------------------------------------------

def test_attention_consistency_loss_is_eq11_per_sample():
    gen = torch.Generator().manual_seed(0)
    mc = torch.softmax(torch.randn(3, 8, 16, 77, generator=gen), -1)
    mo = torch.softmax(torch.randn(3, 8, 16, 77, generator=gen), -1)
    per_sample = [((mc[b] - mo[b]) ** 2).mean() / ((mc[b].sum() + mo[b].sum()) / 2) for b in range(3)]
    torch.testing.assert_close(attention_consistency_loss(mc, mo), torch.stack(per_sample).mean())
    assert float(attention_consistency_loss(mc, mc)) == 0.0


def test_map_recorder_keeps_the_softmax_map_and_runs_the_layer(sd15):
    store = {}
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 77, 64, generator=gen), torch.randn(2, 77, 64)
    out = MapRecorder(store)(q, k, v, {"n_heads": 4})
    qh, kh = q.reshape(2, 16, 4, 16).transpose(1, 2), k.reshape(2, 77, 4, 16).transpose(1, 2)
    torch.testing.assert_close(store["map"], torch.softmax(qh @ kh.transpose(-1, -2) / 4.0, -1))
    vh = v.reshape(2, 77, 4, 16).transpose(1, 2)
    torch.testing.assert_close(out, (store["map"] @ vh).transpose(1, 2).reshape(2, 16, 64), rtol=1e-4, atol=1e-5)


def test_recording_the_maps_of_the_last_layer_changes_nothing_else(sd15):
    patched = sd15.clone()
    make_patch(sd15, randomised(InjectionCopy(sd15))).install(patched)
    options = patched.model_options["transformer_options"]
    last = transformer_slots(sd15)[-1].key
    record = ConsistencyRecord((last,))
    recorded = unet_out(sd15, with_map_recording(options, record))
    torch.testing.assert_close(recorded, unet_out(sd15, options), rtol=1e-5, atol=1e-5)
    assert record.copy_maps[last]["map"].shape == record.base_maps[last]["map"].shape == (2, 8, 64, 77)
    assert float(attention_consistency_loss(record.copy_maps[last]["map"], record.base_maps[last]["map"])) > 0
