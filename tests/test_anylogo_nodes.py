"""AnyLogo nodes in ComfyUI: training-free and trained modes, region insertion, diagnostics, coexistence, errors."""
import math

import pytest
import torch

from image_ops.hierarchical_embeds import HierarchicalEmbeds
from image_ops.vision_features import CLIP, DINOV2
from model_patches.image_context import ImageContextPatch, ImageProjection, group_of_slots, group_tokens
from model_patches.unet_layout import transformer_slots
from standalone import tiny_models

STEPS = 3


@pytest.fixture
def kit(anylogo_kit):
    return anylogo_kit


def dino_embeds(groups=4, tokens=5, width=1024, background=True, kind=DINOV2):
    g = torch.Generator().manual_seed(7)
    layers = tuple(range(6, 6 * groups + 1, 6))
    return HierarchicalEmbeds(kind, layers, tuple(torch.randn(1, tokens, width, generator=g) for _ in layers),
                              (224, 224), {}, torch.randn(1, groups, width, generator=g) if background else None)


@pytest.fixture(scope="module")
def anylogo_weights(comfy, tiny_cache_dir):
    from model_patches.anylogo_weights import load_anylogo_weights

    return load_anylogo_weights(tiny_models.build_anylogo_weights(tiny_cache_dir / "anylogo" / "w.safetensors"))


def test_region_insertion_keeps_the_scene_outside_the_mask_and_changes_the_region(kit):
    scene_latent = kit.vae.encode(torch.full((1, 64, 64, 3), 0.6))
    kit.assert_scene_outside(kit.sample(kit.apply()), scene_latent, kit.sample(kit.model))  # Eq. 2


@pytest.mark.parametrize("concat", ["known", "unknown"])
def test_the_subject_pass_gets_the_chosen_inpainting_channels(kit, concat):
    """A pre-hook on the UNet: one subject pass per step, input = [noisy subject scaled as the sampler scales
    its input, mask, masked-image latent] with known = (0, clean subject latent), unknown = (1, the latent
    ComfyUI uses for a blank image: 0.8223, -0.6876, 0.6364, 0.1380 per channel)."""
    from model_patches.extra_pass import seeded_noise

    model = kit.apply(subject_concat=concat, seed=4)
    subject = model.get_attachment("subject_customization.anylogo").subject
    seen, _ = kit.subject_passes(model)
    assert len(seen) == kit.steps
    for sigma, x in seen:
        assert x.shape == (1, 9) + subject.shape[-2:]
        noisy = (subject + sigma * seeded_noise(subject.shape, 4, sigma, "cpu")) / (sigma ** 2 + 1) ** 0.5  # eps
        torch.testing.assert_close(x[:, :4], noisy, rtol=1e-6, atol=1e-6)
        if concat == "known":
            assert torch.equal(x[:, 4], torch.zeros_like(x[:, 4])) and torch.equal(x[:, 5:], subject)
        else:
            grey = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).view(1, 4, 1, 1).expand_as(subject)
            assert torch.equal(x[:, 4], torch.ones_like(x[:, 4])) and torch.equal(x[:, 5:], grey)
    assert len({s for s, _ in seen}) == kit.steps


def _percent_to_sigma(sigmas, percent):
    """ComfyUI's percent → sigma for a discrete schedule, by hand in float64: the sigma at timestep
    (1 - percent)·999, log-linearly interpolated between the two neighbouring training sigmas."""
    import numpy as np

    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    t = (1.0 - percent) * 999.0
    lo, w = int(np.floor(t)), t - np.floor(t)
    log = np.log(sigmas.double().numpy())
    return float(np.exp((1 - w) * log[lo] + w * log[min(lo + 1, 999)]))


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.23, 0.67), (0.0, 0.33), (0.55, 1.0)])
def test_subject_passes_run_exactly_inside_the_start_end_window(kit, start, end):
    """Through the node's percent inputs, 10 steps: the subject pass runs at exactly the schedule's sigmas inside
    [sigma(end), sigma(start)] (one pass each), computed here from the schedule by hand; the percents are chosen
    away from the schedule's own sigmas so rounding cannot move a boundary."""
    import comfy.samplers

    sampling = kit.model.get_model_object("model_sampling")
    schedule = [float(s) for s in comfy.samplers.calculate_sigmas(sampling, "normal", 10)[:-1]]
    hi, lo = _percent_to_sigma(sampling.sigmas, start), _percent_to_sigma(sampling.sigmas, end)
    assert all(min(abs(s - hi), abs(s - lo)) > 1e-3 * s for s in schedule)
    seen, _ = kit.subject_passes(kit.apply(start_percent=start, end_percent=end), steps=10)
    expected = [s for s in schedule if lo <= s <= hi]
    assert [s for s, _ in seen] == expected and 0 < len(expected)
    if (start, end) != (0.0, 1.0):
        assert len(expected) < len(schedule)


def test_the_apply_node_leaves_the_incoming_model_alone(kit):
    before = kit.sample(kit.model)
    kit.sample(kit.apply())
    assert torch.equal(kit.sample(kit.model), before)


def test_trained_mode_replaces_text_by_the_subjects_dino_tokens(kit, anylogo_weights):
    model = kit.apply(anylogo=anylogo_weights, subject_embeds=dino_embeds())
    a = kit.sample(model, positive="a red mug", negative="blurry")
    b = kit.sample(model, positive="a castle at night", negative="")
    assert torch.equal(a, b)  # neither prompt reaches a cross-attention layer any more
    assert not torch.equal(a, kit.sample(kit.apply(), positive="a red mug", negative="blurry"))


def test_image_context_feeds_each_level_its_group_and_the_null_tokens_to_uncond():
    embeds = dino_embeds(groups=3, tokens=4, width=6)
    projection = ImageProjection(6, 8)
    tokens = group_tokens(embeds.groups, embeds.background)
    patch = ImageContextPatch(projection, tokens, {("input", 1, 0): 0, ("output", 5, 0): 2})
    n = torch.zeros(4, 9, 8)
    options = {"block": ("output", 5), "block_index": 0, "cond_or_uncond": [1, 0]}
    _, context, value = patch(n, torch.zeros(4, 77, 8), None, options)
    expected_cond = projection(torch.cat([embeds.groups[2], embeds.background[:, 2:3]], dim=1))
    torch.testing.assert_close(context[2:], expected_cond.expand(2, -1, -1))
    torch.testing.assert_close(context[:2], projection.proj.bias.expand(2, 5, -1))  # projection of zeros
    assert context is value
    untouched = torch.zeros(4, 77, 8)
    assert patch(n, untouched, untouched, {**options, "block": ("middle", 0)})[1] is untouched


def test_groups_map_to_levels_mirrored_with_the_middle_deepest():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(image_size=32, in_channels=9, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
                     channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768, use_spatial_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                     transformer_depth_middle=1, legacy=False, device="meta",
                     operations=comfy.ops.disable_weight_init)
    groups = {slot.name: g for slot in transformer_slots(unet)
              for key, g in group_of_slots(transformer_slots(unet), 4).items() if key == slot.key}
    assert groups == {"input1.0": 0, "input2.0": 0, "input4.0": 1, "input5.0": 1, "input7.0": 2, "input8.0": 2,
                      "middle0.0": 3, "output3.0": 2, "output4.0": 2, "output5.0": 2, "output6.0": 1,
                      "output7.0": 1, "output8.0": 1, "output9.0": 0, "output10.0": 0, "output11.0": 0}


def test_attention_report_describes_the_last_sampling(kit):
    model = kit.apply(record_attention=True)
    samples = kit.sample(model)
    report, heatmap = kit.nodes.NODE_CLASS_MAPPINGS["SC_AnyLogoAttentionReport"]().report(
        model, {"samples": samples}, 32, 48)
    for name in ("output2.0", "output3.0", "output0.0"):
        assert name in report
    assert "SLD" in report and "nan" not in report
    assert heatmap.shape == (1, 48, 32, 3) and 0 <= float(heatmap.min()) and float(heatmap.max()) <= 1
    patch = model.get_attachment("subject_customization.anylogo")
    assert all(len(v) == STEPS for v in patch.recorder.per_layer.values())  # reset per run, one entry per step
    kit.sample(model)
    assert all(len(v) == STEPS for v in patch.recorder.per_layer.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_percent=0.8, end_percent=0.2), "must not be after"),
    (dict(subject_embeds=dino_embeds()), "used with AnyLogo weights only"),
])
def test_bad_settings_get_clear_errors(kit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kit.apply(**kwargs)


@pytest.mark.parametrize("embeds, message", [
    (None, "connect a DINOv2 Hierarchical Encode"),
    (dino_embeds(kind=CLIP), "needs DINOv2 embeds, but these come from a CLIP vision model"),
    (dino_embeds(background=False), "scene as background"),
    (dino_embeds(width=768), "768-wide"),
    (dino_embeds(groups=3), "trained on 4 DINOv2 layer groups"),
])
def test_trained_mode_refuses_the_wrong_embeds(kit, anylogo_weights, embeds, message):
    with pytest.raises(ValueError, match=message):
        kit.apply(anylogo=anylogo_weights, subject_embeds=embeds)


def test_an_empty_subject_mask_is_refused(kit):
    with pytest.raises(ValueError, match="subject mask 0 is empty"):
        kit.apply(subject_mask=torch.zeros(1, 40, 72))


def test_a_non_sd15_model_is_refused(comfy, kit):
    """A UNet with 1024-wide text context (SD2-style) loaded by ComfyUI itself."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = {**tiny_models.TINY_UNET, "context_dim": 1024}
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                     use_linear_in_transformer=True, num_head_channels=64, num_heads=-1,
                     operations=comfy.ops.disable_weight_init, **{k: v for k, v in config.items()
                                                                   if k != "num_heads"})
    other = comfy.sd.load_diffusion_model_state_dict({k: torch.zeros_like(v) for k, v in unet.state_dict().items()})
    assert other is not None, "ComfyUI did not recognise the SD2-style test UNet"
    with pytest.raises(ValueError, match="context width 1024"):  # UnsupportedModel, from the pack's own import
        kit.apply(model=other)


def _report_rows(report: str) -> dict:
    """layer name -> (ASA mean, first, last, SLD mean, steps) parsed from the report text."""
    rows = {}
    for line in report.splitlines()[3:-1]:
        name, *values = line.split()
        rows[name] = tuple(float(v) for v in values[:4]) + (int(values[4]),)
    return rows


def test_attention_report_numbers_and_heatmap_layout_follow_the_recorder():
    """A recorder filled by hand on a non-square 3x2 grid: each report row is the mean of the recorded shares,
    first/last are the highest/lowest sigma whatever the recording order, and the heatmap (30 high, 20 wide)
    peaks inside the image block of the one cell given all the share (row 2, column 0), not a transposed one."""
    from model_patches.diagnostics import attention_heatmap, attention_report
    from model_patches.recycling import AttentionRecorder
    from model_patches.unet_layout import TransformerSlot

    slot = TransformerSlot("output", 3, 0, 0, 320, 8)
    recorder = AttentionRecorder()
    cell = torch.zeros(1, 6)
    cell[0, 2 * 2 + 0] = 1.0                                   # row-major [h=3, w=2]: row 2, column 0
    for sigma, scale, sld in [(2.0, 0.3, 0.1), (9.0, 0.5, 0.2), (0.5, 0.1, 0.3)]:  # not in sigma order
        recorder.add(slot, sigma, cell * scale * 6, (3, 2), sld)  # mean share of the map = scale
    (row,) = _report_rows(attention_report(recorder)).values()
    assert row == (0.3, 0.5, 0.1, 0.2, 3)
    heat = attention_heatmap(recorder, 30, 20)
    assert heat.shape == (1, 30, 20, 3)
    peak = divmod(int(heat[0, ..., 1].argmax()), 20)
    assert 20 <= peak[0] < 30 and 0 <= peak[1] < 10, peak
    assert float(heat[0, 25, 5, 1]) > 0.9 and float(heat[0, 5, 15, 1]) < 0.05


def test_attention_report_of_a_non_square_scene_is_the_recorded_numbers(kit):
    """A 96x64 (h x w) scene: every recycled layer recorded one entry per step at the latent grid of its level
    (12x8 at 1/8, 6x4 at 1/16); the report's rows are those entries' means, first and last step."""
    model = kit.apply(record_attention=True)
    scene = torch.full((1, 96, 64, 3), 0.6)
    mask = torch.zeros(1, 96, 64)
    mask[:, 24:72, 16:48] = 1
    pos, neg, latent = kit.nodes.InpaintModelConditioning().encode(kit.text("a logo"), kit.text(""), scene, kit.vae,
                                                                 mask, True)
    samples = kit.nodes.common_ksampler(model, 1, STEPS, 5.0, "euler", "normal", pos, neg, latent)[0]
    report, heatmap = kit.nodes.NODE_CLASS_MAPPINGS["SC_AnyLogoAttentionReport"]().report(model, samples, 64, 96)
    recorder = model.get_attachment("subject_customization.anylogo").recorder
    patch = model.get_attachment("subject_customization.anylogo")
    rows = _report_rows(report)
    assert set(rows) == {slot.name for slot in patch.slots} == set(recorder.per_layer)
    for slot in patch.slots:
        entries = sorted(recorder.per_layer[slot.name], key=lambda e: -e[0])
        shares = [e[1] for e in entries]
        assert len(entries) == STEPS and recorder.shapes[slot.name] == (1, 12 >> slot.level, 8 >> slot.level)
        expected = (sum(shares) / STEPS, shares[0], shares[-1], sum(e[2] for e in entries) / STEPS, STEPS)
        assert rows[slot.name][:4] == pytest.approx(expected[:4], abs=5e-5) and rows[slot.name][4] == STEPS
    assert heatmap.shape == (1, 96, 64, 3)
