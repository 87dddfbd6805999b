"""AnyLogo recycling inside real ComfyUI sampling on the tiny SD1.5 models."""
import gc
import math

import pytest
import torch

from model_patches.anylogo import RecyclingSettings, build_patch
from model_patches.unet_layout import DECODER, ENCODER, MIDDLE, diffusion_model_of, transformer_slots

STEPS = 4


@pytest.fixture(scope="module")
def sd15(comfy):
    model, clip = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = comfy.CLIPTextEncode().encode(clip, "a red logo on a mug")[0]
    negative = comfy.CLIPTextEncode().encode(clip, "blurry")[0]
    return model, positive, negative


def sample(model, positive, negative, *, side=8, batch=1, seed=3, cfg=5.0, steps=STEPS):
    import comfy.sample

    latent = torch.zeros(batch, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)


def recycled(model, settings=RecyclingSettings(), subject=None):
    patched = model.clone()
    subject = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) if subject is None else subject
    patch = build_patch(patched, subject, settings)
    patch.install(patched)
    return patched, patch


def test_slots_are_derived_from_the_model(sd15):
    slots = transformer_slots(sd15[0])
    assert [s.name for s in slots] == ["input1.0", "input3.0", "middle0.0", "output0.0", "output1.0", "output2.0",
                                       "output3.0"]
    assert [s.level for s in slots] == [0, 1, 1, 1, 1, 0, 0]


def test_slots_of_a_full_size_sd15_unet_are_the_papers_layers():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
                     channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768, use_spatial_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                     transformer_depth_middle=1, legacy=False, use_linear_in_transformer=False,
                     device="meta", operations=comfy.ops.disable_weight_init)
    slots = transformer_slots(unet)
    by_block = {b: [(s.block_id, s.level, s.channels) for s in slots if s.block == b] for b in (ENCODER, MIDDLE,
                                                                                             DECODER)}
    assert by_block[ENCODER] == [(1, 0, 320), (2, 0, 320), (4, 1, 640), (5, 1, 640), (7, 2, 1280), (8, 2, 1280)]
    assert by_block[MIDDLE] == [(0, 3, 1280)]
    assert by_block[DECODER] == [(3, 2, 1280), (4, 2, 1280), (5, 2, 1280), (6, 1, 640), (7, 1, 640), (8, 1, 640),
                                 (9, 0, 320), (10, 0, 320), (11, 0, 320)]


@pytest.mark.parametrize("settings", [RecyclingSettings(threshold=0.0), RecyclingSettings(strength=0.0),
                                      RecyclingSettings(sigma_start=1e-3, sigma_end=1e-4)],
                         ids=["blocked-flow", "strength-0", "outside-start-end"])
def test_inactive_recycling_is_exactly_the_unpatched_model(sd15, settings):
    model, positive, negative = sd15
    patched, _ = recycled(model, settings)
    assert torch.equal(sample(patched, positive, negative), sample(model, positive, negative))


def test_recycling_changes_the_image_and_a_partial_range_is_in_between(sd15):
    model, positive, negative = sd15
    base = sample(model, positive, negative)
    full = sample(recycled(model)[0], positive, negative)
    sigmas = model.get_model_object("model_sampling")
    first_half = RecyclingSettings(sigma_start=math.inf, sigma_end=float(sigmas.percent_to_sigma(0.5)))
    half = sample(recycled(model, first_half)[0], positive, negative)
    assert (full - base).abs().max() > 1e-2
    assert (half - base).abs().max() > 1e-2 and (half - full).abs().max() > 1e-2


def _first_step_predictions(model, positive, negative):
    seen = {}

    def record(args):
        if not seen:
            seen["cond"], seen["uncond"] = args["cond_denoised"].clone(), args["uncond_denoised"].clone()
        return args["denoised"]

    m = model.clone()
    m.set_model_sampler_post_cfg_function(record)
    sample(m, positive, negative)
    return seen


def test_the_unconditional_prediction_never_sees_the_subject(sd15):
    """Eq. 7 end to end: at the first step (same input), only the conditional prediction changes."""
    model, positive, negative = sd15
    plain = _first_step_predictions(model, positive, negative)
    patched = _first_step_predictions(recycled(model)[0], positive, negative)
    assert torch.equal(patched["uncond"], plain["uncond"])
    assert (patched["cond"] - plain["cond"]).abs().max() > 1e-3


def test_scene_batch_reads_one_subject_pass(sd15):
    model, positive, negative = sd15
    patched, patch = recycled(model)
    unet = diffusion_model_of(patched)
    batches = []
    handle = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        out = sample(patched, positive, negative, batch=3)
    finally:
        handle.remove()
    assert batches == [1, 6] * STEPS  # subject pass (1 row), then 3 scenes x (cond, uncond)
    single = sample(recycled(model)[0], positive, negative, batch=1)
    torch.testing.assert_close(out[:1], single, atol=1e-2, rtol=1e-2)  # batch-size-dependent kernels only


def test_encoder_recycling_stops_the_subject_pass_after_the_encoder(sd15):
    model, positive, negative = sd15
    patched, _ = recycled(model, RecyclingSettings(positions="encoder"))
    unet = diffusion_model_of(patched)
    calls = []
    hooks = [unet.output_blocks[0][0].register_forward_hook(lambda *a: calls.append("output")),
             unet.input_blocks[0][0].register_forward_hook(lambda *a: calls.append("input"))]
    try:
        sample(patched, positive, negative, steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["input", "input", "output"]  # subject pass never reached the decoder


def test_sparse_recycling_is_deterministic_per_seed(sd15):
    model, positive, negative = sd15
    half = [sample(recycled(model, RecyclingSettings(threshold=0.5, seed=s))[0], positive, negative)
            for s in (1, 1, 2)]
    assert torch.equal(half[0], half[1])
    assert not torch.equal(half[0], half[2])
    full = sample(recycled(model)[0], positive, negative)
    assert not torch.equal(half[0], full)


def test_the_original_model_is_untouched_and_nothing_is_left_behind(sd15):
    model, positive, negative = sd15
    before = sample(model, positive, negative)
    patched, patch = recycled(model)
    counts = []
    for run in range(10):
        sample(patched, positive, negative, steps=2)
        assert patch._runs == []
        if run in (1, 9):  # after warm-up caches exist, and at the end
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if type(o) is torch.Tensor))
    assert counts[1] <= counts[0], f"live tensors grew across eight runs: {counts}"
    assert torch.equal(sample(model, positive, negative), before)
    assert "attn1" not in model.model_options.get("transformer_options", {}).get("patches_replace", {})
    assert model.get_attachment("subject_customization.anylogo") is None


def test_an_exception_mid_sampling_leaves_no_stale_state(sd15):
    model, positive, negative = sd15
    patched, patch = recycled(model)
    clean = sample(patched, positive, negative)
    calls = []

    def explode(args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return args["denoised"]

    broken = patched.clone()
    broken.set_model_sampler_post_cfg_function(explode)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample(broken, positive, negative)
    assert patch._runs == []
    assert torch.equal(sample(patched, positive, negative), clean)


# ---- sparse recycling's keep draws (Eq. 5) ------------------------------------------------------------------

def _schedule_sigmas():
    """The 1000 training sigmas of SD1.5's schedule as the sampler hands them over (float32 → Python float)."""
    from comfy.model_sampling import ModelSamplingDiscrete

    return [float(s) for s in ModelSamplingDiscrete().sigmas.float()]


def _keeps(threshold, seed, sigmas, slots, rows):
    """[len(sigmas), slots, rows] keep decisions of keep_bias at every (sigma, slot)."""
    from model_patches.anylogo import keep_bias

    return torch.stack([torch.stack([torch.isfinite(keep_bias(threshold, 1.0, seed, s, i, rows, "cpu"))
                                     for i in range(slots)]) for s in sigmas])


@pytest.mark.parametrize("threshold", [0.3, 0.8])
def test_keep_rate_is_the_threshold_per_layer_and_draws_are_independent(comfy, threshold):
    """16,000 (sigma, slot) draws per row: the keep rate is Λ overall and in every layer, and rows, layers and
    neighbouring sigmas are uncorrelated. Binomial bounds: overall ±0.02 (≥ 4.3 sd at n = 16,000), per layer
    ±0.075 (≥ 5 sd at n = 1,000), correlations |r| < 0.06 (≥ 7 sd of r at n = 16,000; per-pair tests at n = 1,000
    use 0.16, 5 sd). An inverted comparison (u > Λ) gives 1 - Λ; the earlier linear seed formula gave per-layer
    rates from 0.00 to 0.54 at Λ = 0.3."""
    sigmas = _schedule_sigmas()
    keep = _keeps(threshold, 7, sigmas, 16, 4).float()          # [1000, 16, 4]
    assert abs(float(keep.mean()) - threshold) < 0.02
    per_layer = keep[..., 0].mean(dim=0)
    assert float((per_layer - threshold).abs().max()) < 0.075, per_layer

    def r(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    for j in range(1, 4):  # rows of one call
        assert abs(r(keep[..., 0], keep[..., j])) < 0.06
    joint = (keep[..., 0] * keep[..., 1]).mean()
    assert abs(float(joint) - threshold ** 2) < 0.02
    for i in range(1, 16):  # layers at the same sigma
        assert abs(r(keep[:, 0, 0], keep[:, i, 0])) < 0.16
    assert abs(r(keep[1:, :, 0], keep[:-1, :, 0])) < 0.06  # consecutive sigmas


def test_keep_draws_are_independent_of_the_subject_noise_and_of_each_other(comfy):
    """Every (stream, sigma) of one seed gets its own generator, counting only the low 32 bits that
    torch.Generator.manual_seed keeps on the CPU; and no layer's draw follows the subject noise's first value."""
    from model_patches import extra_pass

    sigmas = _schedule_sigmas()
    seeds = [extra_pass.step_seed(3, s, stream) for s in sigmas for stream in
             [extra_pass.NOISE_STREAM] + [("keep", i) for i in range(16)]]
    assert len({s & 0xFFFFFFFF for s in seeds}) == len(seeds) == 17_000
    g = torch.Generator().manual_seed(2 ** 40 + 5)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))

    noise = torch.stack([extra_pass.seeded_noise((1, 4, 8, 8), 3, s, "cpu").flatten()[0] for s in sigmas])
    keep = _keeps(0.5, 3, sigmas, 16, 1)[..., 0].float()
    for i in range(16):
        r = float(torch.corrcoef(torch.stack([noise, keep[:, i]]))[0, 1])
        assert abs(r) < 0.16, (i, r)  # 5 sd at n = 1,000; the earlier formula gave |r| = 0.85 on layer 0
    # the subject noise differs at every step (it repeated with period ~8 across the schedule before)
    firsts = {tuple(extra_pass.seeded_noise((4,), 3, s, "cpu").tolist()) for s in sigmas}
    assert len(firsts) == len(sigmas)


def test_sampling_applies_the_drawn_layers_exactly(sd15):
    """One step at Λ = 0.5: the image equals complete recycling restricted to the layers keep_bias keeps, and
    differs from the complement (what an inverted comparison would keep)."""
    import comfy.samplers

    from model_patches.anylogo import AnyLogoPatch, keep_bias

    model, positive, negative = sd15
    patched, patch = recycled(model, RecyclingSettings(threshold=0.5, seed=11))

    sigma = float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1)[0])
    kept = [s for i, s in enumerate(patch.slots) if torch.isfinite(keep_bias(0.5, 1.0, 11, sigma, i, 1, "cpu"))[0]]
    assert 0 < len(kept) < len(patch.slots), "pick another seed: this one keeps all or none"
    dropped = [s for s in patch.slots if s not in kept]

    def only(slots):
        m = model.clone()
        AnyLogoPatch(RecyclingSettings(seed=11), slots, patch.subject).install(m)  # same subject noise
        return sample(m, positive, negative, steps=1)

    sparse = sample(patched, positive, negative, steps=1)
    assert torch.equal(sparse, only(kept))
    assert not torch.equal(sparse, only(dropped))


def test_the_window_is_inclusive_at_both_schedule_sigmas(sd15):
    """sigma_start / sigma_end set to two of the schedule's own sigmas: the subject pass runs at exactly those
    and the ones between (Eq. 5 is off elsewhere), recorded per extraction."""
    import comfy.samplers

    model, positive, negative = sd15
    schedule = [float(s) for s in comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                                  "normal", 8)[:-1]]
    patched, patch = recycled(model, RecyclingSettings(sigma_start=schedule[2], sigma_end=schedule[5]))
    seen, extract = [], patch.extract
    patch.extract = lambda m, conds, t, options: (seen.append(float(t.flatten()[0])), extract(m, conds, t,
                                                                                               options))[1]
    sample(patched, positive, negative, steps=8)
    assert seen == schedule[2:6]
