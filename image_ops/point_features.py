"""CLIP patch tokens for the point → mask selection (P3S RNGR-Encoder), from one pass of the stock CLIP_VISION.

P3S computes the patch similarity on "the hidden state feature" of OpenAI's CLIP ViT-L/14, the same last
hidden state its RNGR-Encoder attends to, so the default layer is the last one (before the final layer norm,
which CLIP applies only to the class token). Earlier layers are often spatially crisper; the node exposes the
choice.

The image is squashed (resized without keeping its aspect ratio) to a square ``size x size`` encoder input:
every patch then holds image content (padding would spend patches on a border that can itself look like a
subject), nothing is cropped away (CLIP's usual centre crop would lose points near the edges), and a pixel
maps to its patch by two independent scales, ``col = x*gw/W`` and ``row = y*gh/H``. The shapes seen by CLIP
are stretched for non-square images; for similarity between patches of the same image this matters little.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .point_parsing import PointsError
from .vision_features import CLIP, layer_states, require_kind


def resolve_layer(layer: int, depth: int) -> int:
    """1-based layer from ``layer``: 1..depth counts from the input, -1..-depth from the output (-1 = last)."""
    if 1 <= layer <= depth:
        return layer
    if -depth <= layer <= -1:
        return depth + 1 + layer
    raise PointsError(f"layer {layer} does not exist in this {depth}-layer model: use 1..{depth} counted from "
                      f"the input or -1..-{depth} counted from the output (-1 = last)")


def squash_to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,H,W] in 0..1 → [B,3,size,size], antialiased bicubic like ComfyUI's CLIP preprocessing."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0)


def patch_tokens(clip_vision, images: torch.Tensor, layer: int = -1, size: int = 224):
    """Patch tokens ``[B, gh*gw, D]`` (class token dropped) and the grid ``(gh, gw)`` of ``images`` [B,3,H,W].

    Raises a clear error for a non-CLIP model (DINOv2, SigLIP), a size that is not a multiple of the patch, or
    an image smaller than one patch."""
    info = require_kind(clip_vision, CLIP, "Points to mask (P3S patch similarity)")
    patch = info.patch_size
    if size < patch or size % patch:
        lower = max(patch, size // patch * patch)
        raise PointsError(f"encoder size {size} is not a multiple of this model's {patch}-pixel patch: use e.g. "
                          f"{lower} or {lower + patch}")
    if size < 2 * patch:
        raise PointsError(f"encoder size {size} gives a {size // patch}x{size // patch} patch grid with this "
                          f"model's {patch}-pixel patches: one patch has nothing to compare with, the mask would "
                          f"be the whole image. Use at least {2 * patch} ({16 * patch} = the paper's 16x16 grid)")
    height, width = images.shape[-2:]
    if height < patch or width < patch:
        raise PointsError(f"the image is {width}x{height} pixels, smaller than one {patch}x{patch} patch of the "
                          "encoder: nothing can be located in it")
    chosen = resolve_layer(layer, info.depth)
    states = layer_states(clip_vision, squash_to_square(images, size), [chosen])[chosen]
    grid = size // patch
    return states[:, 1:], (grid, grid)
