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
