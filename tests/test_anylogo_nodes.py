"""AnyLogo nodes in ComfyUI: training-free and trained modes, region insertion, diagnostics, coexistence, errors."""
import pytest
import torch

from image_ops.hierarchical_embeds import HierarchicalEmbeds
from image_ops.vision_features import CLIP, DINOV2
from model_patches.image_context import ImageContextPatch, ImageProjection, group_of_slots, group_tokens
from model_patches.unet_layout import transformer_slots
from standalone import tiny_models

STEPS = 3


@pytest.fixture(scope="module")
def tiny(comfy):
    model, clip, vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15_inpainting.safetensors")[:3]
    text = lambda s: comfy.CLIPTextEncode().encode(clip, s)[0]  # noqa: E731
    return {"model": model, "clip": clip, "vae": vae, "text": text, "nodes": comfy}


@pytest.fixture(scope="module")
def subject():
    image = torch.ones(1, 40, 72, 3)
    image[:, 10:30, 20:50] = torch.tensor([0.1, 0.2, 0.8])
    return image


def apply(tiny, subject, **kwargs):
    args = dict(positions="decoder", threshold=1.0, strength=1.0, start_percent=0.0, end_percent=1.0, seed=0,
                subject_size=64)
    args.update(kwargs)
    return tiny["nodes"].NODE_CLASS_MAPPINGS["SC_AnyLogoApply"]().apply(tiny["model"] if "model" not in kwargs
                                                                         else args.pop("model"), tiny["vae"],
                                                                         subject, **args)[0]


def inpaint_sample(tiny, model, positive="a logo", negative="", seed=1):
    nodes = tiny["nodes"]
    scene = torch.full((1, 64, 64, 3), 0.6)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    pos, neg, latent = nodes.InpaintModelConditioning().encode(tiny["text"](positive), tiny["text"](negative),
                                                               scene, tiny["vae"], mask, True)
    return nodes.common_ksampler(model, seed, STEPS, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def dino_embeds(groups=4, tokens=5, width=1024, background=True, kind=DINOV2):
    g = torch.Generator().manual_seed(7)
    layers = tuple(range(6, 6 * groups + 1, 6))
    return HierarchicalEmbeds(kind, layers, tuple(torch.randn(1, tokens, width, generator=g) for _ in layers),
                              (224, 224), {}, torch.randn(1, groups, width, generator=g) if background else None)


@pytest.fixture(scope="module")
def anylogo_weights(comfy, tiny_cache_dir):
    from model_patches.anylogo_weights import load_anylogo_weights

    return load_anylogo_weights(tiny_models.build_anylogo_weights(tiny_cache_dir / "anylogo" / "w.safetensors"))


def test_region_insertion_keeps_the_scene_outside_the_mask_and_changes_the_region(tiny, subject):
    base = inpaint_sample(tiny, tiny["model"])
    out = inpaint_sample(tiny, apply(tiny, subject))
    inside, outside = (slice(None), slice(None), slice(3, 5), slice(3, 5)), (slice(None), slice(None), 0, 0)
    assert (out[inside] - base[inside]).abs().max() > 1e-3
    torch.testing.assert_close(out[outside], base[outside])  # re-imposed scene latent (Eq. 2)


def test_subject_concat_choice_reaches_the_subject_pass(tiny, subject):
    known = inpaint_sample(tiny, apply(tiny, subject, subject_concat="known"))
    unknown = inpaint_sample(tiny, apply(tiny, subject, subject_concat="unknown"))
    assert not torch.equal(known, unknown)


def test_the_apply_node_leaves_the_incoming_model_alone(tiny, subject):
    before = inpaint_sample(tiny, tiny["model"])
    inpaint_sample(tiny, apply(tiny, subject))
    assert torch.equal(inpaint_sample(tiny, tiny["model"]), before)


def test_trained_mode_replaces_text_by_the_subjects_dino_tokens(tiny, subject, anylogo_weights):
    model = apply(tiny, subject, anylogo=anylogo_weights, subject_embeds=dino_embeds())
    a = inpaint_sample(tiny, model, positive="a red mug", negative="blurry")
    b = inpaint_sample(tiny, model, positive="a castle at night", negative="")
    assert torch.equal(a, b)  # neither prompt reaches a cross-attention layer any more
    assert not torch.equal(a, inpaint_sample(tiny, apply(tiny, subject), positive="a red mug", negative="blurry"))


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


def test_attention_report_describes_the_last_sampling(tiny, subject):
    model = apply(tiny, subject, record_attention=True)
    samples = inpaint_sample(tiny, model)
    report, heatmap = tiny["nodes"].NODE_CLASS_MAPPINGS["SC_AnyLogoAttentionReport"]().report(
        model, {"samples": samples}, 32, 48)
    for name in ("output2.0", "output3.0", "output0.0"):
        assert name in report
    assert heatmap.shape == (1, 48, 32, 3) and 0 <= float(heatmap.min()) and float(heatmap.max()) <= 1
    patch = model.get_attachment("subject_customization.anylogo")
    assert all(len(v) == STEPS for v in patch.recorder.per_layer.values())  # reset per run, one entry per step
    inpaint_sample(tiny, model)
    assert all(len(v) == STEPS for v in patch.recorder.per_layer.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_percent=0.8, end_percent=0.2), "must not be after"),
    (dict(subject_embeds=dino_embeds()), "used with AnyLogo weights only"),
])
def test_bad_settings_get_clear_errors(tiny, subject, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply(tiny, subject, **kwargs)


@pytest.mark.parametrize("embeds, message", [
    (None, "connect a DINOv2 Hierarchical Encode"),
    (dino_embeds(kind=CLIP), "needs DINOv2 embeds, but these come from a CLIP vision model"),
    (dino_embeds(background=False), "scene as background"),
    (dino_embeds(width=768), "768-wide"),
    (dino_embeds(groups=3), "trained on 4 DINOv2 layer groups"),
])
def test_trained_mode_refuses_the_wrong_embeds(tiny, subject, anylogo_weights, embeds, message):
    with pytest.raises(ValueError, match=message):
        apply(tiny, subject, anylogo=anylogo_weights, subject_embeds=embeds)


def test_an_empty_subject_mask_is_refused(tiny, subject):
    with pytest.raises(ValueError, match="subject mask 0 is empty"):
        apply(tiny, subject, subject_mask=torch.zeros(1, 40, 72))


def test_a_non_sd15_model_is_refused(comfy, subject, tiny):
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
        apply(tiny, subject, model=other)


def test_coexists_with_self_attention_guidance(tiny, subject):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    sag = lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0)[0]  # noqa: E731
    before = inpaint_sample(tiny, apply(tiny, subject, model=sag(tiny["model"])))
    after = inpaint_sample(tiny, sag(apply(tiny, subject)))
    plain = inpaint_sample(tiny, apply(tiny, subject))
    assert not torch.equal(before, plain) and not torch.equal(after, plain)  # SAG still acts
    middle = apply(tiny, subject, model=sag(tiny["model"]), include_middle=True)  # SAG's layer, chained
    assert not torch.equal(inpaint_sample(tiny, middle), plain)
    with pytest.raises(RuntimeError, match="Apply AnyLogo last"):
        inpaint_sample(tiny, sag(apply(tiny, subject, include_middle=True)))


def test_coexists_with_perturbed_attention_guidance(tiny, subject):
    """PAG replaces ('middle', 0) only inside its extra evaluation: there it takes the layer over, in any order."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    pag = lambda m: PerturbedAttentionGuidance.execute(m, 3.0)[0]  # noqa: E731
    plain = inpaint_sample(tiny, apply(tiny, subject, include_middle=True))
    after = inpaint_sample(tiny, pag(apply(tiny, subject, include_middle=True)))
    before = inpaint_sample(tiny, apply(tiny, subject, model=pag(tiny["model"]), include_middle=True))
    assert not torch.equal(after, plain) and torch.equal(before, after)
    default = apply(tiny, subject, model=pag(tiny["model"]))  # PAG's layer is not recycled by default
    assert not torch.equal(inpaint_sample(tiny, default), inpaint_sample(tiny, apply(tiny, subject)))
