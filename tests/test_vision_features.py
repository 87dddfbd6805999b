"""vision_features: model description, layer choice, and multi-layer states equal to ComfyUI's own forward.

Tolerance: float32 on CPU, the same modules in the same order; 1e-5 absolute and relative.
"""
import numpy as np
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


def numpy_dinov2_position_grid(grid: np.ndarray, out_h: int, out_w: int, offset: float = 0.1) -> np.ndarray:
    """The position-embedding resize of the DINOv2 code base AnyDoor vendors (and AnyLogo's pipeline builds on):
    ``interpolate(..., scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), mode="bicubic")`` on the M x M grid, written
    out with numpy: Keys cubic convolution (a = -0.75, PyTorch's), half-pixel centres mapped with the *given*
    scale (src = (dst + 0.5) · M / (n + offset) − 0.5, not M / n), edge samples clamped. ``grid`` [M, M, D]."""
    def weights(n_out: int, n_in: int) -> np.ndarray:
        a, w = -0.75, np.zeros((n_out, n_in))
        for i in range(n_out):
            src = (i + 0.5) * n_in / (n_out + offset) - 0.5
            base = int(np.floor(src))
            t = src - base
            for k, d in zip(range(base - 1, base + 3), (t + 1, t, 1 - t, 2 - t)):
                d = abs(d)
                c = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
                w[i, min(max(k, 0), n_in - 1)] += c
        return w

    m = grid.shape[0]
    return np.einsum("ij,jkd,lk->ild", weights(out_h, m), grid.astype(np.float64), weights(out_w, m))


@pytest.mark.parametrize("grid_h, grid_w", [(16, 16), (12, 20)])
def test_dinov2_position_interpolation_is_the_dinov2_code_bases_convention(grid_h, grid_w):
    """The embedding step at 224 px (16x16 patches) against an independent numpy reference of the DINOv2 code
    base's rule (bicubic, scale factor (grid + 0.1) / 37, no antialias), on a random 37x37 grid: equal to 1e-5.
    An exact-size resize (what transformers' Dinov2 does now) differs by far more, so the test tells them apart."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1 + 37 * 37, 8, generator=g)
    ours = vf._resized_positions(pos, grid_h, grid_w)
    assert torch.equal(ours[0], pos[0])                                   # the class position is kept
    reference = numpy_dinov2_position_grid(pos[1:].reshape(37, 37, 8).numpy(), grid_h, grid_w)
    got = ours[1:].reshape(grid_h, grid_w, 8).numpy()
    assert np.abs(got - reference).max() < 1e-5
    exact = torch.nn.functional.interpolate(pos[1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(grid_h, grid_w),
                                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    print(f"max |ours - exact-size resize| = {np.abs(got - exact).max():.3f} on a unit-variance grid")
    assert np.abs(got - exact).max() > 0.1


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
