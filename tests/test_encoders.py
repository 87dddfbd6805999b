"""Hierarchical DINOv2 / CLIP encoders: layer groups equal ComfyUI's own forward, one pass per batch, subject
preprocessing pixel by pixel, metadata, clear errors, and the nodes inside ComfyUI.

Tolerance for hidden states: float32 on CPU, same modules; 1e-5 absolute and relative (1e-4 where a row shares a
batch with other images, whose matmul blocking may differ).
"""
import pytest
import torch
import torch.nn.functional as F

from image_ops import vision_features as vf
from image_ops.hierarchical_encode import (clip_default_layers, encode_clip_hierarchical,
                                           encode_dinov2_hierarchical, resolve_layers)
from image_ops.subject_preprocess import SubjectPreprocessError, prepare_subject
from standalone import tiny_models
from standalone.vision_reference import BlockCalls, comfy_pixel_values, direct_layer, reference_dinov2_states

ATOL = RTOL = 1e-5


# --- layers -------------------------------------------------------------------------------------------------

def test_clip_default_layers_for_several_depths():
    assert clip_default_layers(24) == (6, 12, 18, 23, 24)
    assert clip_default_layers(32) == (8, 16, 24, 31, 32)
    assert clip_default_layers(12) == (3, 6, 9, 11, 12)
    assert clip_default_layers(6) == (2, 3, 5, 6)  # the third quarter point is the penultimate layer
    assert clip_default_layers(3) == (1, 2, 3)


def test_resolve_layers_parses_presets_and_lists():
    assert resolve_layers("quarters", 24, (1,)) == (6, 12, 18, 24)
    assert resolve_layers(" default ", 24, (7, 9)) == (7, 9)
    assert resolve_layers("", 24, (7, 9)) == (7, 9)
    assert resolve_layers("18, 6,-1", 24, ()) == (6, 18, 24)
    assert resolve_layers([-2], 24, ()) == (23,)
    with pytest.raises(vf.VisionModelError, match="comma list"):
        resolve_layers("six", 24, ())
    with pytest.raises(vf.VisionModelError, match=r"\[25\] do not exist"):
        resolve_layers("6,25", 24, ())
    with pytest.raises(vf.VisionModelError, match="more than once"):
        resolve_layers("6,6", 24, ())


# --- DINOv2 -------------------------------------------------------------------------------------------------

def test_dinov2_quarter_groups_of_a_24_layer_model_equal_comfyui_forward():
    model = tiny_models.tiny_dinov2(seed=1, num_hidden_layers=24)
    images = torch.rand(2, 3, 518, 518)
    embeds = encode_dinov2_hierarchical(model, images, size=518)
    assert embeds.layers == (6, 12, 18, 24)
    assert embeds.input_size == (518, 518)
    for layer, group in zip(embeds.layers, embeds.groups):
        assert group.shape == (2, 1370, 64)
        torch.testing.assert_close(group, direct_layer(model, images, layer), atol=ATOL, rtol=RTOL)


def test_dinov2_at_224_gives_257_tokens_of_the_reference_interpolation(tiny_dinov2):
    images = torch.rand(2, 3, 224, 224)
    embeds = encode_dinov2_hierarchical(tiny_dinov2, images)
    assert embeds.layers == (2, 4, 6, 8) and embeds.input_size == (224, 224)
    reference = reference_dinov2_states(tiny_dinov2, images, embeds.layers)
    for layer, group in zip(embeds.layers, embeds.groups):
        assert group.shape == (2, 257, 64)
        torch.testing.assert_close(group, reference[layer], atol=ATOL, rtol=RTOL)


def test_background_token_is_the_background_class_token_at_each_layer(tiny_dinov2):
    subjects, scenes = torch.rand(3, 3, 518, 518), torch.rand(3, 3, 518, 518)
    layers = (3, 5, 8)
    plain = encode_dinov2_hierarchical(tiny_dinov2, subjects, layers=layers, size=518)
    shared = encode_dinov2_hierarchical(tiny_dinov2, subjects, layers=layers, size=518, background_pixels=scenes[:1])
    paired = encode_dinov2_hierarchical(tiny_dinov2, subjects, layers=layers, size=518, background_pixels=scenes)
    assert shared.background.shape == paired.background.shape == (3, 3, 64)
    for k, layer in enumerate(layers):
        scene_cls = direct_layer(tiny_dinov2, scenes, layer)[:, 0]
        torch.testing.assert_close(shared.background[:, k], scene_cls[:1].expand(3, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(paired.background[:, k], scene_cls, atol=1e-4, rtol=1e-4)
        # the background rides in the subjects' pass without changing them
        torch.testing.assert_close(shared.groups[k], plain.groups[k], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(paired.groups[k], plain.groups[k], atol=1e-4, rtol=1e-4)
    assert shared.preprocessing["background"]["pairing"] == "broadcast"
    assert paired.preprocessing["background"]["pairing"] == "one per subject"
    assert plain.background is None


def test_background_batch_must_be_one_or_match(tiny_dinov2):
    with pytest.raises(vf.VisionModelError, match="2 background images for 3 subjects"):
        encode_dinov2_hierarchical(tiny_dinov2, torch.rand(3, 3, 224, 224),
                                   background_pixels=torch.rand(2, 3, 224, 224))


def test_background_of_another_size_is_resized_whole(tiny_dinov2):
    scene = torch.rand(1, 3, 300, 200)
    embeds = encode_dinov2_hierarchical(tiny_dinov2, torch.rand(1, 3, 224, 224), layers="8",
                                        background_pixels=scene)
    squashed = F.interpolate(scene, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    expected = reference_dinov2_states(tiny_dinov2, squashed, (8,))[8][:, 0]
    torch.testing.assert_close(embeds.background[:, 0], expected, atol=1e-4, rtol=1e-4)
    assert embeds.preprocessing["background"]["resized_from"] == [300, 200]


def test_each_block_runs_once_per_chunk(tiny_dinov2):
    with BlockCalls(tiny_dinov2) as calls:
        encode_dinov2_hierarchical(tiny_dinov2, torch.rand(3, 3, 224, 224), layers=(2, 6),
                                   background_pixels=torch.rand(1, 3, 224, 224))
    # one pass for three subjects and their background; blocks 7 and 8 are never needed
    assert calls.blocks == [1, 1, 1, 1, 1, 1, 0, 0] and calls.embeddings == 1
    progress = []
    with BlockCalls(tiny_dinov2) as calls:
        encode_dinov2_hierarchical(tiny_dinov2, torch.rand(5, 3, 224, 224), chunk_size=2,
                                   background_pixels=torch.rand(5, 3, 224, 224),
                                   progress=lambda done, total: progress.append((done, total)))
    assert calls.blocks == [3] * 8 and calls.embeddings == 3
    assert progress == [(2, 5), (4, 5), (5, 5)]


def test_final_norm_applies_the_models_layernorm(tiny_dinov2):
    images = torch.rand(1, 3, 518, 518)
    embeds = encode_dinov2_hierarchical(tiny_dinov2, images, layers=(4, 8), size=518, final_norm=True,
                                        background_pixels=images)
    with torch.no_grad():
        normed = tiny_dinov2.model.layernorm(direct_layer(tiny_dinov2, images, 4))
        out = tiny_dinov2.model(pixel_values=comfy_pixel_values(tiny_dinov2, images))
    torch.testing.assert_close(embeds.groups[0], normed, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(embeds.groups[1], out[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(embeds.background[:, 1], out[2], atol=1e-4, rtol=1e-4)  # DINOv2's pooled output
    assert embeds.preprocessing["final_norm"] is True


# --- CLIP ---------------------------------------------------------------------------------------------------

def test_clip_groups_equal_comfyui_forward_and_concatenate(tiny_clip_vision):
    images = torch.rand(2, 3, 224, 224)
    with BlockCalls(tiny_clip_vision) as calls:
        embeds = encode_clip_hierarchical(tiny_clip_vision, images)
    assert calls.blocks == [1] * 6
    assert embeds.kind == vf.CLIP and embeds.layers == (2, 3, 5, 6) and embeds.input_size == (224, 224)
    for layer, group in zip(embeds.layers, embeds.groups):
        torch.testing.assert_close(group, direct_layer(tiny_clip_vision, images, layer), atol=ATOL, rtol=RTOL)
    joined = embeds.concatenated()
    assert joined.shape == (2, 257, 4 * 64)
    torch.testing.assert_close(joined[..., 64:128], embeds.groups[1])


def test_clip_default_layers_of_a_24_layer_model():
    model = tiny_models.tiny_clip_vision(seed=2, num_hidden_layers=24, hidden_size=32, intermediate_size=64)
    images = torch.rand(1, 3, 224, 224)
    embeds = encode_clip_hierarchical(model, images)
    assert embeds.layers == (6, 12, 18, 23, 24)
    for layer, group in zip(embeds.layers, embeds.groups):
        torch.testing.assert_close(group, direct_layer(model, images, layer), atol=ATOL, rtol=RTOL)


# --- errors -------------------------------------------------------------------------------------------------

def test_wrong_model_kind_is_refused(tiny_dinov2, tiny_clip_vision):
    with pytest.raises(vf.VisionModelError, match="hierarchical DINOv2 encoding needs DINOv2.*CLIP ViT"):
        encode_dinov2_hierarchical(tiny_clip_vision, torch.rand(1, 3, 224, 224))
    with pytest.raises(vf.VisionModelError, match="hierarchical CLIP encoding needs CLIP ViT.*DINOv2"):
        encode_clip_hierarchical(tiny_dinov2, torch.rand(1, 3, 224, 224))


def test_embeds_require_refuses_the_wrong_kind(tiny_clip_vision):
    embeds = encode_clip_hierarchical(tiny_clip_vision, torch.rand(1, 3, 224, 224), layers="2,4,6")
    assert embeds.require(vf.CLIP, "Q-Former", groups=3) is embeds
    with pytest.raises(vf.VisionModelError, match="AnyLogo needs DINOv2 embeds.*CLIP vision model"):
        embeds.require(vf.DINOV2, "AnyLogo")
    with pytest.raises(vf.VisionModelError, match="needs 4 layer groups, these embeds have 3"):
        embeds.require(vf.CLIP, "Q-Former", groups=4)


# --- subject preprocessing ----------------------------------------------------------------------------------

def _subject_with_mask():
    """A 40x60 image and a mask over rows 10..19, columns 5..34 with one hole at (14, 20)."""
    image = torch.rand(1, 3, 40, 60)
    mask = torch.zeros(1, 40, 60)
    mask[:, 10:20, 5:35] = 1.0
    mask[:, 14, 20] = 0.0
    return image, mask


def test_mask_box_crop_fill_and_square_pad_pixelwise():
    image, mask = _subject_with_mask()
    fill = (0.2, 0.4, 0.6)
    out, info = prepare_subject(image, mask, size=30, fit="pad", fill=fill, margin=0.0)
    # box 10x30 → centred in a 30x30 square: rows 10..19 hold the subject, the rest is fill
    expected = torch.tensor(fill).view(3, 1, 1).repeat(1, 30, 30)
    expected[:, 10:20, :] = image[0, :, 10:20, 5:35]
    expected[:, 10 + 4, 20 - 5] = torch.tensor(fill)  # the hole in the mask shows the fill colour
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)
    assert info["boxes"] == [[10, 5, 20, 35]] and info["crops"] == [[10, 5, 20, 35]]
    assert info["masked"] is True and info["fit"] == "pad" and info["size"] == 30 and info["source_size"] == [40, 60]


def test_margin_grows_the_box_and_resize_is_bicubic():
    image, mask = _subject_with_mask()
    out, info = prepare_subject(image, mask, size=36, fit="pad", margin=0.1)
    # margin 0.1: one row (10 * 0.1) above and below, three columns (30 * 0.1) left and right → 12x36
    assert info["crops"] == [[9, 2, 21, 38]]
    white = torch.ones(3, 36, 36)
    expected = white.clone()
    expected[:, 12:24, :] = image[0, :, 9:21, 2:38] * mask[0, 9:21, 2:38] + (1 - mask[0, 9:21, 2:38])
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)
    small, _ = prepare_subject(image, mask, size=18, fit="pad", margin=0.1)
    resized = F.interpolate(expected[None], size=(18, 18), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(small, resized, atol=1e-6, rtol=0)


def test_box_past_the_image_edge_is_filled():
    image = torch.rand(1, 3, 20, 20)
    mask = torch.zeros(1, 20, 20)
    mask[:, 0:4, 12:20] = 1.0  # touches the top and right edges
    out, info = prepare_subject(image, mask, size=12, fit="pad", margin=0.25, fill=(0.0, 0.0, 0.0))
    assert info["crops"] == [[-1, 10, 5, 22]]  # 6x12, centred in 12x12 from row 3
    expected = torch.zeros(3, 12, 12)
    expected[:, 4:8, 2:10] = image[0, :, 0:4, 12:20]
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)


def test_unmasked_fits_match_comfyuis_clip_preprocessing():
    import comfy.clip_vision

    image = torch.rand(2, 3, 40, 60)
    for fit, crop in (("center_crop", True), ("squash", False)):
        out, info = prepare_subject(image, None, size=28, fit=fit)
        assert out.shape == (2, 3, 28, 28) and info["masked"] is False and info["boxes"] == [[0, 0, 40, 60]] * 2
        comfy_values = comfy.clip_vision.clip_preprocess(image.movedim(1, -1), size=28, crop=crop)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        ours = ((out * 255).round() / 255 - mean) / std
        torch.testing.assert_close(ours, comfy_values, atol=1e-5, rtol=0)


def test_one_mask_serves_a_batch_and_use_mask_off_ignores_it():
    image, mask = _subject_with_mask()
    images = torch.cat([image, image.flip(-1)])
    out, info = prepare_subject(images, mask, size=30)
    assert info["boxes"] == [[10, 5, 20, 35]] * 2
    whole, info = prepare_subject(images, mask, size=30, use_mask=False)
    assert info["masked"] is False and "mask_threshold" not in info
    torch.testing.assert_close(whole, prepare_subject(images, None, size=30)[0])


def test_preprocessing_errors_are_clear():
    image, mask = _subject_with_mask()
    with pytest.raises(SubjectPreprocessError, match="subject mask 1 is empty"):
        prepare_subject(torch.cat([image, image]), torch.cat([mask, torch.zeros_like(mask)]), size=28)
    with pytest.raises(SubjectPreprocessError, match="3 masks for 2 subject images"):
        prepare_subject(torch.cat([image, image]), mask.expand(3, -1, -1), size=28)
    with pytest.raises(SubjectPreprocessError, match="fit must be one of"):
        prepare_subject(image, None, size=28, fit="stretch")
    with pytest.raises(SubjectPreprocessError, match="three RGB values"):
        prepare_subject(image, None, size=28, fill=(255, 255, 255))


# --- nodes --------------------------------------------------------------------------------------------------

def test_dinov2_node_prepares_encodes_and_describes(pack_nodes, tiny_dinov2):
    image, mask = _subject_with_mask()
    scene = torch.rand(1, 50, 70, 3)
    embeds, preview = pack_nodes["SC_DINOv2HierarchicalEncode"]().encode(
        tiny_dinov2, image.movedim(1, -1), "224", "quarters", "pad", 0.1, 0xFF0000, True, False,
        subject_mask=mask, background=scene)
    prepared, info = prepare_subject(image, mask, size=224, fit="pad", fill=(1.0, 0.0, 0.0), margin=0.1)
    torch.testing.assert_close(preview, prepared.movedim(1, -1))
    expected = encode_dinov2_hierarchical(tiny_dinov2, prepared, background_pixels=scene.movedim(-1, 1))
    assert (embeds.kind, embeds.layers, embeds.input_size) == (vf.DINOV2, (2, 4, 6, 8), (224, 224))
    for group, reference in zip(embeds.groups, expected.groups):
        torch.testing.assert_close(group, reference, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(embeds.background, expected.background, atol=ATOL, rtol=RTOL)
    prep = embeds.preprocessing
    assert prep["boxes"] == [[10, 5, 20, 35]] and prep["fill"] == [1.0, 0.0, 0.0] and prep["margin"] == 0.1
    assert prep["background"] == {"images": 1, "resized_from": [50, 70], "pairing": "broadcast"}
    assert prep["final_norm"] is False and prep["subject_resized_from"] is None


def test_nodes_refuse_the_wrong_model_kind(pack_nodes, tiny_dinov2, tiny_clip_vision):
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match="DINOv2 Hierarchical Encode needs DINOv2"):
        pack_nodes["SC_DINOv2HierarchicalEncode"]().encode(tiny_clip_vision, image, "224", "quarters", "pad", 0.1,
                                                           0xFFFFFF, True, False)
    with pytest.raises(ValueError, match="CLIP Hierarchical Encode needs CLIP ViT"):
        pack_nodes["SC_CLIPHierarchicalEncode"]().encode(tiny_dinov2, image, "default", "center_crop", 0.0,
                                                         0xFFFFFF, True, False)


def test_clip_node_uses_the_models_size_and_layers(pack_nodes, tiny_clip_vision):
    image = torch.rand(2, 300, 200, 3)
    embeds, preview = pack_nodes["SC_CLIPHierarchicalEncode"]().encode(tiny_clip_vision, image, "2, 6", "squash",
                                                                       0.0, 0xFFFFFF, True, True)
    assert preview.shape == (2, 224, 224, 3) and embeds.layers == (2, 6) and embeds.preprocessing["fit"] == "squash"
    normed = tiny_clip_vision.model.vision_model.post_layernorm
    with torch.no_grad():
        for layer, group in zip((2, 6), embeds.groups):
            torch.testing.assert_close(group, normed(direct_layer(tiny_clip_vision, preview.movedim(-1, 1), layer)),
                                       atol=ATOL, rtol=RTOL)


def _cached_output(executor, node_id, index):
    return executor.caches.outputs.get(node_id)[index][0]


def test_dinov2_node_in_comfyui_with_the_stock_loader(comfy):
    from standalone.runner import make_executor, run_workflow

    prompt = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_dinov2_large.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 224, "height": 224, "batch_size": 1,
                                                     "color": 0x3366CC}},
        "3": {"class_type": "SC_DINOv2HierarchicalEncode",
              "inputs": {"clip_vision": ["1", 0], "subject": ["2", 0], "resolution": "224", "layers": "quarters",
                         "fit": "pad", "margin": 0.0, "fill_color": 0xFFFFFF, "use_mask": True,
                         "final_norm": False, "background": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    executor = make_executor()
    result = run_workflow(prompt, executor=executor)
    assert result["outputs"]["4"]["images"], "the preview of the prepared subject was not written"
    embeds = _cached_output(executor, "3", 0)
    assert (embeds.kind, embeds.layers, embeds.input_size) == (vf.DINOV2, (6, 12, 18, 24), (224, 224))
    assert [tuple(g.shape) for g in embeds.groups] == [(1, 257, 1024)] * 4
    # the background is the subject image itself: its global token is the subject's class token at each layer
    for k, group in enumerate(embeds.groups):
        torch.testing.assert_close(embeds.background[:, k], group[:, 0], atol=1e-4, rtol=1e-4)


def test_clip_node_in_comfyui_with_the_stock_loader(comfy):
    from standalone.runner import make_executor, run_workflow

    prompt = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_clip_vit_l.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 320, "height": 240, "batch_size": 1,
                                                     "color": 0xCC6633}},
        "3": {"class_type": "SC_CLIPHierarchicalEncode",
              "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "layers": "default", "fit": "center_crop",
                         "margin": 0.0, "fill_color": 0xFFFFFF, "use_mask": True, "final_norm": False}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    executor = make_executor()
    result = run_workflow(prompt, executor=executor)
    assert result["outputs"]["4"]["images"]
    embeds, preview = _cached_output(executor, "3", 0), _cached_output(executor, "3", 1)
    clip_vision = _cached_output(executor, "1", 0)
    assert embeds.layers == (6, 12, 18, 23, 24) and embeds.concatenated().shape == (1, 257, 5 * 1024)
    with torch.no_grad():  # every layer from ComfyUI's own forward in one call
        every = clip_vision.model(pixel_values=comfy_pixel_values(clip_vision, preview.movedim(-1, 1)),
                                  intermediate_output="all")[1]
    for layer, group in zip(embeds.layers, embeds.groups):
        torch.testing.assert_close(group, every[:, layer - 1], atol=1e-4, rtol=1e-4)
