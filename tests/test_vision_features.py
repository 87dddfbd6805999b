"""vision_features: model description, layer choice, and multi-layer states equal to ComfyUI's own forward.

Tolerance: float32 on CPU, the same modules in the same order; 1e-5 absolute and relative.
"""
import pytest
import torch

from image_ops import vision_features as vf
from standalone import tiny_models
from standalone.vision_reference import BlockCalls, comfy_pixel_values, direct_layer, reference_dinov2_states

ATOL = RTOL = 1e-5


def test_describe_reads_kind_and_geometry(tiny_dinov2, tiny_clip_vision):
    dino = vf.describe(tiny_dinov2)
    assert (dino.kind, dino.depth, dino.width, dino.patch_size, dino.native_size) == (vf.DINOV2, 8, 64, 14, 518)
    assert dino.mean == (0.485, 0.456, 0.406)
    clip = vf.describe(tiny_clip_vision)
    assert (clip.kind, clip.depth, clip.width, clip.patch_size, clip.native_size) == (vf.CLIP, 6, 64, 14, 224)


def test_describe_refuses_siglip():
    siglip = tiny_models.vision_model_from_config({**tiny_models.TINY_CLIP_VISION_CONFIG,
                                                   "model_type": "siglip_vision_model"})
    with pytest.raises(vf.VisionModelError, match="SigLIP"):
        vf.describe(siglip)


def test_require_kind_names_both_kinds(tiny_dinov2, tiny_clip_vision):
    with pytest.raises(vf.VisionModelError, match="needs DINOv2.*input is CLIP ViT"):
        vf.require_kind(tiny_clip_vision, vf.DINOV2, "this node")
    with pytest.raises(vf.VisionModelError, match="needs CLIP ViT.*input is DINOv2"):
        vf.require_kind(tiny_dinov2, vf.CLIP, "this node")


def test_quarter_layers():
    assert vf.quarter_layers(24) == (6, 12, 18, 24)
    assert vf.quarter_layers(40) == (10, 20, 30, 40)
    assert vf.quarter_layers(8) == (2, 4, 6, 8)
    with pytest.raises(vf.VisionModelError, match="cannot pick 4"):
        vf.quarter_layers(3)


def test_check_layers_rejects_missing_layers():
    with pytest.raises(vf.VisionModelError, match=r"\[0, 9\] do not exist.*1\.\.8"):
        vf.check_layers([0, 4, 9], 8)
    with pytest.raises(vf.VisionModelError, match="no layer"):
        vf.check_layers([], 8)


def test_dinov2_states_at_518_equal_comfyui_forward(tiny_dinov2):
    images = torch.rand(2, 3, 518, 518)
    states = vf.layer_states(tiny_dinov2, images, (1, 4, 8))
    for layer in (1, 4, 8):
        assert states[layer].shape == (2, 1370, 64)
        torch.testing.assert_close(states[layer], direct_layer(tiny_dinov2, images, layer), atol=ATOL, rtol=RTOL)


def test_dinov2_states_at_224_follow_the_reference_interpolation(tiny_dinov2):
    images = torch.rand(2, 3, 224, 224)
    states = vf.layer_states(tiny_dinov2, images, (2, 8))
    reference = reference_dinov2_states(tiny_dinov2, images, (2, 8))
    for layer in (2, 8):
        assert states[layer].shape == (2, 257, 64)  # 16x16 patches + class token
        torch.testing.assert_close(states[layer], reference[layer], atol=ATOL, rtol=RTOL)


def test_clip_states_at_224_equal_comfyui_forward(tiny_clip_vision):
    images = torch.rand(3, 3, 224, 224)
    states = vf.layer_states(tiny_clip_vision, images, (2, 5, 6))
    for layer in (2, 5, 6):
        assert states[layer].shape == (3, 257, 64)
        torch.testing.assert_close(states[layer], direct_layer(tiny_clip_vision, images, layer), atol=ATOL,
                                   rtol=RTOL)


def test_final_norm_of_the_last_layer_is_the_models_output(tiny_dinov2, tiny_clip_vision):
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        clip_out = tiny_clip_vision.model(pixel_values=comfy_pixel_values(tiny_clip_vision, images))
    last = vf.layer_states(tiny_clip_vision, images, (6,))[6]
    # CLIP's image embedding is the projection of the post-layernormed class token of the last layer
    with torch.no_grad():
        projected = tiny_clip_vision.model.visual_projection(vf.final_norm(tiny_clip_vision, last)[:, 0])
    torch.testing.assert_close(projected, clip_out[2], atol=ATOL, rtol=RTOL)
    images = torch.rand(1, 3, 518, 518)
    with torch.no_grad():
        dino_out = tiny_dinov2.model(pixel_values=comfy_pixel_values(tiny_dinov2, images))
    last = vf.layer_states(tiny_dinov2, images, (8,))[8]
    torch.testing.assert_close(vf.final_norm(tiny_dinov2, last), dino_out[0], atol=ATOL, rtol=RTOL)


def test_layer_states_stops_after_the_deepest_layer(tiny_dinov2):
    with BlockCalls(tiny_dinov2) as calls:
        vf.layer_states(tiny_dinov2, torch.rand(2, 3, 224, 224), (2, 5))
    assert calls.blocks == [1, 1, 1, 1, 1, 0, 0, 0] and calls.embeddings == 1


def test_layer_states_rejects_bad_pixels(tiny_dinov2):
    with pytest.raises(vf.VisionModelError, match="multiple of the patch size 14"):
        vf.layer_states(tiny_dinov2, torch.rand(1, 3, 100, 100), (1,))
    with pytest.raises(vf.VisionModelError, match=r"\[B,3,H,W\]"):
        vf.layer_states(tiny_dinov2, torch.rand(1, 224, 224, 3), (1,))
