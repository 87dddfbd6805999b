"""SC_PointsToMask end to end: on a CLIP model whose patch features are built on purpose, through the stock
CLIPVisionLoader headless, and with the wrong inputs.

The built model is ComfyUI's real CLIP vision class (tiny config) with chosen weights:
* the patch convolution writes ALPHA x (mean colour - 0.5) of each channel (with the position embedding adding
  the offset that undoes CLIP's input normalisation),
* the position embedding writes BETA x (cos wc, sin wc, cos wr, sin wr) for patch (r, c), so the cosine of two
  patches of one colour falls with their distance: same-coloured twins differ by where they are,
* every feature f is written twice, as [f, -f]: the embedding then has zero mean over channels and CLIP's
  pre-LayerNorm only rescales each token, which leaves cosine similarities unchanged,
* each transformer block is the identity (attention out-projection and MLP output zeroed; the residual stream
  passes through).
With ALPHA large against BETA, red objects on a teal background are dissimilar to it (clamped to 0) and
similar to each other, more so the closer they are.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from standalone import tiny_models
from standalone.runner import WorkflowFailed, run_workflow

ALPHA, BETA, OMEGA = 2.0, 0.7, math.pi / 8
RED, TEAL = (1.0, 0.1, 0.1), (0.1, 0.8, 0.8)
SIDE, PATCH_PX = 336, 21  # the 336-px image is squashed to 224: one 14-px encoder patch = 21 image pixels


def feature_clip():
    clip_vision = tiny_models.tiny_clip_vision(seed=0)
    vision = clip_vision.model.vision_model
    width, half = 64, 32
    kernel = vision.embeddings.patch_embedding.kernel_size[0]
    grid = 224 // kernel
    mean, std = torch.tensor(clip_vision.image_mean), torch.tensor(clip_vision.image_std)
    with torch.no_grad():
        conv = torch.zeros(width, 3, kernel, kernel)
        for channel in range(3):
            conv[channel, channel] = ALPHA * std[channel] / kernel ** 2
        conv[half:half + 3] = -conv[:3]
        vision.embeddings.patch_embedding.weight.copy_(conv)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        rows, cols = rows.flatten().float(), cols.flatten().float()
        feature = torch.zeros(grid * grid + 1, half)
        feature[1:, :3] = ALPHA * (mean - 0.5)
        feature[1:, 3:7] = BETA * torch.stack([torch.cos(OMEGA * cols), torch.sin(OMEGA * cols),
                                               torch.cos(OMEGA * rows), torch.sin(OMEGA * rows)], dim=1)
        feature[0, 7] = 1.0  # the class token: anything but zero
        vision.embeddings.position_embedding.weight.copy_(torch.cat([feature, -feature], dim=1))
        vision.embeddings.class_embedding.zero_()
        vision.pre_layrnorm.weight.fill_(1.0)
        vision.pre_layrnorm.bias.zero_()
        for block in vision.encoder.layers:
            for linear in (block.self_attn.out_proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return clip_vision


def scene(boxes, side=SIDE):
    """[1, H, W, 3] teal image with red boxes given in patch units (col0, row0, col1, row1)."""
    image = torch.tensor(TEAL).repeat(side, side, 1)
    for c0, r0, c1, r1 in boxes:
        image[r0 * PATCH_PX:r1 * PATCH_PX, c0 * PATCH_PX:c1 * PATCH_PX] = torch.tensor(RED)
    return image[None]


def box_mask(box, side=SIDE):
    c0, r0, c1, r1 = box
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[r0 * PATCH_PX:r1 * PATCH_PX, c0 * PATCH_PX:c1 * PATCH_PX] = True
    return mask


def centre(box):
    c0, r0, c1, r1 = box
    return round((c0 + c1) / 2 * PATCH_PX), round((r0 + r1) / 2 * PATCH_PX)


LEFT, RIGHT_APART = (2, 5, 6, 11), (10, 5, 14, 11)
LEFT_TOUCHING, RIGHT_TOUCHING = (2, 5, 8, 11), (8, 5, 14, 11)


def run(node, image, positive, negative="", **options):
    settings = dict(layer=-1, encoder_size=224, blur_sigma=1.0, dilation_px=0, coordinates="pixels")
    settings.update(options)
    return node.select(image, feature_clip(), positive, negative_points=negative, **settings)


def iou(mask, box):
    inside = box_mask(box)
    mask = mask.bool()
    return ((mask & inside).sum() / (mask | inside).sum()).item()


def covered(mask, box):
    inside = box_mask(box)
    return ((mask.bool() & inside).sum() / inside.sum()).item()


@pytest.fixture
def node(pack_nodes):
    return pack_nodes["SC_PointsToMask"]()


def test_built_features_survive_layernorm_and_blocks(comfy):
    from image_ops.point_features import patch_tokens

    tokens, grid = patch_tokens(feature_clip(), scene([(0, 0, 16, 16)]).movedim(-1, 1), -1, 224)
    assert grid == (16, 16)
    unit = torch.nn.functional.normalize(tokens[0], dim=-1)
    colour = ALPHA ** 2 * sum((c - 0.5) ** 2 for c in RED)
    for (r0, c0), (r1, c1) in [((0, 0), (0, 3)), ((2, 5), (9, 1)), ((7, 7), (7, 15))]:
        expected = (colour + BETA ** 2 * (math.cos(OMEGA * (c1 - c0)) + math.cos(OMEGA * (r1 - r0)))) / (
            colour + 2 * BETA ** 2)
        # 8-bit input quantisation moves the colour by < 1/255
        assert (unit[r0 * 16 + c0] @ unit[r1 * 16 + c1]).item() == pytest.approx(expected, abs=2e-3)


def test_a_twin_apart_is_dropped_by_the_connected_component_rule(node):
    mask, preview = run(node, scene([LEFT, RIGHT_APART]), "%d,%d" % centre(LEFT))
    assert mask.shape == (1, SIDE, SIDE) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert iou(mask[0], LEFT) >= 0.9 and covered(mask[0], RIGHT_APART) == 0.0
    x, y = centre(LEFT)
    assert torch.allclose(preview[0, y, x], torch.tensor([0.0, 1.0, 0.0]))


def test_a_touching_twin_needs_the_negative_point(node):
    image = scene([LEFT_TOUCHING, RIGHT_TOUCHING])
    positive = '[{"x": %d, "y": %d}]' % centre(LEFT_TOUCHING)
    both, _ = run(node, image, positive)
    assert covered(both[0], LEFT_TOUCHING) >= 0.9 and covered(both[0], RIGHT_TOUCHING) >= 0.9
    negative = '[{"x": %d, "y": %d}]' % centre(RIGHT_TOUCHING)
    one, preview = run(node, image, positive, negative)
    assert iou(one[0], LEFT_TOUCHING) >= 0.9 and covered(one[0], RIGHT_TOUCHING) <= 0.05
    x, y = centre(RIGHT_TOUCHING)
    assert torch.allclose(preview[0, y, x], torch.tensor([1.0, 0.0, 0.0]))


def test_per_image_points_select_per_image(node):
    image = scene([LEFT, RIGHT_APART]).repeat(2, 1, 1, 1)
    positive = "%d,%d | %d,%d" % (*centre(LEFT), *centre(RIGHT_APART))
    mask, preview = run(node, image, positive)
    assert mask.shape == (2, SIDE, SIDE) and preview.shape == (2, SIDE, SIDE, 3)
    assert iou(mask[0], LEFT) >= 0.9 and covered(mask[0], RIGHT_APART) == 0.0
    assert iou(mask[1], RIGHT_APART) >= 0.9 and covered(mask[1], LEFT) == 0.0


def test_fraction_coordinates_and_dilation(node):
    x, y = centre(LEFT)
    plain, _ = run(node, scene([LEFT, RIGHT_APART]), f"{x / SIDE},{y / SIDE}", coordinates="fractions (0..1)")
    grown, _ = run(node, scene([LEFT, RIGHT_APART]), f"{x},{y}", dilation_px=4)
    assert iou(plain[0], LEFT) >= 0.9
    assert (grown >= plain).all() and grown.sum() > plain.sum()


@pytest.mark.parametrize("positive, negative, options, message", [
    ("400,10", "", {}, r"positive point 1 \(x=400, y=10\) is outside image 1, which is 336x336"),
    ("10,10", "5,5; 10,400", {}, r"negative point 2 \(x=10, y=400\) is outside image 1"),
    ("", "5,5", {}, "no positive point"),
    ("10,10", "", {"layer": 0}, "layer 0 does not exist in this 6-layer model"),
    ("10,10", "", {"encoder_size": 230}, "encoder size 230 is not a multiple of this model's 14-pixel patch"),
    ("10,10", "12,12", {}, "fall in the same encoder patch"),
])
def test_bad_points_and_options_are_named(node, positive, negative, options, message):
    with pytest.raises(ValueError, match=message):
        run(node, scene([LEFT]), positive, negative, **options)


def test_an_image_smaller_than_a_patch_is_refused(node):
    with pytest.raises(ValueError, match=r"the image is 10x12 pixels, smaller than one 14x14 patch"):
        node.select(torch.rand(1, 12, 10, 3), feature_clip(), "3,3", -1, 224, 1.0, 0, "pixels")


def test_a_dinov2_model_is_refused_clearly(node, tiny_dinov2):
    with pytest.raises(ValueError, match=r"needs CLIP ViT vision .* but the CLIP_VISION input is DINOv2"):
        node.select(torch.rand(1, 64, 64, 3), tiny_dinov2, "3,3", -1, 224, 1.0, 0, "pixels")


@pytest.fixture
def photo(comfy):
    """A 96x64 noise photo in ComfyUI's input folder, for the stock LoadImage."""
    import folder_paths

    rgb = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(f"{folder_paths.get_input_directory()}/points_photo.png")
    return "points_photo.png"


def test_stock_loader_graph_runs_headless(photo, output_dir):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_clip_vit_l.safetensors"}},
        "3": {"class_type": "SC_PointsToMask", "inputs": {
            "image": ["1", 0], "clip_vision": ["2", 0], "positive_points": '[{"x": 30, "y": 20}]',
            "negative_points": '""', "layer": -1, "encoder_size": 224, "blur_sigma": 1.0, "dilation_px": 0,
            "coordinates": "pixels"}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "points_mask"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    result = run_workflow(prompt)
    saved = result["outputs"]["5"]["images"]
    assert len(saved) == 1 and len(result["outputs"]["6"]["images"]) == 1
    mask = np.asarray(Image.open(output_dir / saved[0]["subfolder"] / saved[0]["filename"]).convert("L"))
    assert mask.shape == (64, 96)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    assert mask[20, 30] == 255


def test_stock_loader_graph_reports_a_point_outside(photo):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_clip_vit_l.safetensors"}},
        "3": {"class_type": "SC_PointsToMask", "inputs": {
            "image": ["1", 0], "clip_vision": ["2", 0], "positive_points": "30,70", "layer": -1,
            "encoder_size": 224, "blur_sigma": 1.0, "dilation_px": 0, "coordinates": "pixels"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    with pytest.raises(WorkflowFailed, match=r"positive point 1 \(x=30, y=70\) is outside image 1, which is 96x64"):
        run_workflow(prompt)
