"""A fixed position code for the AnyLogo miniature's self-attention: the test of whether recycling works once
attention *can* match a region cell with the corresponding subject cell.

The investigation (README, AnyLogo) found the micro UNet's self-attention exactly uniform over the banked subject
keys, and the reason in the task: the lab's glyphs are random, so a region query (mostly noise at the timesteps
where the subject matters) can only find its source by its offset in the region, and UNet self-attention has no
position signal that both passes share. SD1.5, which the paper fine-tunes, matches by content; a position code
stands in for that here. ``PositionCode`` is an ``attn1_patch`` (it runs before the q/k/v projections, so the
pack's ``RecyclingAttention`` banks and reads the coded keys unchanged):

* extraction pass (the subject, ``Extraction`` status): every subject cell's *key* input gets code(offset of the
  cell in the subject);
* generation pass: every region cell's *query* input gets code(offset of the cell in its region); the scene's own
  keys get none, so the only keys a coded query can match are the banked subject keys.

Only the recycled layers are coded (elsewhere no key could answer a coded query), and values never are (a copy
must bring the subject's content, not the code). Offsets are counted in latent cells: code(o) is one of a fixed
set of orthonormal vectors of the layer's width (seeded), times ``scale``·sqrt(width) (``scale`` 1: the norm of a
LayerNorm output); a coarser layer's cell gets the mean code of the latent cells it covers, in both passes. The
code is a lab device, not part of the pack.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model_patches.recycling import STATUS_KEY, Extraction


def orthonormal_codes(count: int, width: int, seed: int) -> torch.Tensor:
    """[count, width] orthonormal rows (count <= width), the same for every call with the same arguments."""
    if count > width:
        raise ValueError(f"{count} position codes do not fit orthonormally in width {width}")
    gaussian = torch.randn(width, count, generator=torch.Generator().manual_seed(seed))
    q, _ = torch.linalg.qr(gaussian)
    return q.T.contiguous()


def offsets_in_boxes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """For a [B, h, w] 0/1 mask holding one axis-aligned box per row: (inside [B, h, w] bool, offset index
    [B, h, w] = dy * box_w + dx of each cell in its row's box (0 outside), box_h, box_w). Every row's box must have
    the same size (the lab's regions are 4x4 latent cells)."""
    inside = mask > 0.5
    if not bool(inside.flatten(1).any(dim=1).all()):
        raise ValueError("a row has no region cell at this resolution")
    rows = inside.any(dim=2)  # [B, h]
    cols = inside.any(dim=1)  # [B, w]
    heights, widths = rows.sum(dim=1), cols.sum(dim=1)
    if len(set(heights.tolist())) != 1 or len(set(widths.tolist())) != 1:
        raise ValueError(f"regions of different sizes: heights {heights.tolist()}, widths {widths.tolist()}")
    top = rows.float().argmax(dim=1).view(-1, 1, 1)
    left = cols.float().argmax(dim=1).view(-1, 1, 1)
    ys = torch.arange(mask.shape[1], device=mask.device).view(1, -1, 1)
    xs = torch.arange(mask.shape[2], device=mask.device).view(1, 1, -1)
    box_h, box_w = int(heights[0]), int(widths[0])
    index = ((ys - top).clamp(0, box_h - 1) * box_w + (xs - left).clamp(0, box_w - 1)) * inside
    return inside, index, box_h, box_w


class PositionCode:
    """``attn1_patch``: the code of each cell's offset on the subject's keys (extraction) and on the region's
    queries (generation), in the layers ``slot_keys`` ((block, id, index), the recycled ones). ``region``
    [B, 1, h, w] (the scene latents' region masks) is set by the caller before each generation call."""

    def __init__(self, scale: float, slot_keys, seed: int = 0):
        self.scale, self.seed = float(scale), seed
        self.slot_keys = frozenset(tuple(k) for k in slot_keys)
        self.region: torch.Tensor | None = None
        self._codes: dict = {}

    def codes(self, count: int, width: int, device, dtype) -> torch.Tensor:
        key = (count, width)
        if key not in self._codes:
            self._codes[key] = orthonormal_codes(count, width, self.seed + 1000 * width + count) * math.sqrt(width)
        return (self._codes[key] * self.scale).to(device=device, dtype=dtype)

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        if self.scale == 0 or block is None or (*block, extra_options.get("block_index", 0)) not in self.slot_keys:
            return n, context, value
        h, w = extra_options["activations_shape"][-2:]
        latent_h, latent_w = extra_options["original_shape"][-2:]
        factor = latent_h // h
        if (h * factor, w * factor) != (latent_h, latent_w):
            raise RuntimeError(f"PositionCode: a {h}x{w} layer of a {latent_h}x{latent_w} latent")
        width = n.shape[-1]
        if isinstance(extra_options.get(STATUS_KEY), Extraction):
            # the subject latent fills the pass: the offset of a latent cell is its position
            table = self.codes(latent_h * latent_w, width, n.device, n.dtype)
            keys = n if context is None else context
            coded = self._pooled(table.view(1, latent_h, latent_w, width), factor)
            return n, keys + coded, keys if value is None else value
        if self.region is None:
            raise RuntimeError("PositionCode: set the region masks before a generation call")
        region = self.region.to(n.device)
        if region.shape[0] != n.shape[0] or tuple(region.shape[-2:]) != (latent_h, latent_w):
            raise RuntimeError(f"PositionCode: region masks {tuple(region.shape)} for {n.shape[0]} rows of a "
                               f"{latent_h}x{latent_w} latent")
        inside, index, box_h, box_w = offsets_in_boxes(region[:, 0])
        table = self.codes(box_h * box_w, width, n.device, n.dtype)
        grid = table[index] * inside.unsqueeze(-1).to(n.dtype)  # [B, latent_h, latent_w, width]
        keys = n if context is None else context
        return n + self._pooled(grid, factor), keys, keys if value is None else value

    @staticmethod
    def _pooled(grid: torch.Tensor, factor: int) -> torch.Tensor:
        """[B, H, W, C] latent-resolution codes → [B, H/f * W/f, C], each layer cell the mean of the latent cells it
        covers: aligned, a region cell's code is exactly the code of the subject cell it corresponds to; off the
        grid, a blend of its neighbours' (the region sits at any latent position, the subject's grid is fixed)."""
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), factor) if factor > 1 else grid.permute(0, 3, 1, 2)
        return pooled.flatten(2).transpose(1, 2)


class CodedLayout:
    """A ``RecyclingLayout`` (or a wrapper of one) whose every UNet call carries the position code at its
    recycled layers."""

    def __init__(self, layout, scale: float, seed: int = 0):
        self._layout, self.code = layout, PositionCode(scale, [slot.key for slot in layout.slots], seed)

    def __getattr__(self, name):
        return getattr(self._layout, name)

    def set_region(self, region: torch.Tensor) -> None:
        self.code.region = region

    def transformer_options(self, image_context, recycling: bool) -> dict:
        options = self._layout.transformer_options(image_context, recycling)
        patches = dict(options.get("patches", {}))
        patches["attn1_patch"] = list(patches.get("attn1_patch", [])) + [self.code]
        options["patches"] = patches
        return options
