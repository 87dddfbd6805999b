"""P3S point → mask (Eq. 1/2): patch similarity to clicked points, Gaussian, Otsu, the clicked components.

For one image with patch tokens ``[gh*gw, D]`` on a ``gh x gw`` grid and points in pixels:

1. A point selects the pixel it lies in, and a pixel belongs to the patch that contains its centre. The
   encoder sees the whole image squashed to a square (see point_features), so pixel ``(px, py)`` lies in patch
   ``(floor((py+.5)*gh/H), floor((px+.5)*gw/W))``. The same rule maps the grid decision back to pixels, so the
   clicked pixel always carries its patch's decision.
2. ``M_P`` = cosine similarity of every patch to the positive points' patches, the maximum over positives (a
   patch belongs to the subject if it resembles any clicked part of it); ``M_N`` likewise over the negatives
   (zero without negatives). Cosines are clamped at 0: a negative cosine means "unrelated", and the clamp keeps
   ``M_P·(1−M_N)`` in 0..1 as the soft "like a positive and unlike every negative" the paper intends.
3. Gaussian blur (sigma in patches), then Otsu. The blurred map is stretched min..max to 0..255 before Otsu:
   Otsu's threshold moves with any affine change of the values, so stretching only spends all 256 levels on
   the range present (cosines of real CLIP tokens crowd into a narrow band). A flat map (range < 1e-6) has no
   two classes: every patch is foreground.
4. The clicked patches decide for themselves: every positive patch is foreground, every negative patch
   background (a positive and a negative in the same patch is an error). Of the foreground, only the
   8-connected components that contain a positive patch are kept: a look-alike elsewhere is dropped even when
   no negative point marks it, while a look-alike touching the subject needs a negative point.
5. Each pixel takes its patch's decision, then optional dilation by a disc of ``dilation_px`` pixels.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .point_features import patch_tokens
from .point_parsing import Point, PointsError

FLAT_RANGE = 1e-6
Cell = tuple[int, int]


def _patch_index(pixel, pixels: int, cells: int):
    """Cell holding the centre of ``pixel`` (int or int array) on a side of ``pixels`` split into ``cells``."""
    return ((2 * pixel + 1) * cells) // (2 * pixels)  # integer arithmetic: no rounding at patch borders


def patch_of_point(x: float, y: float, width: int, height: int, grid_h: int, grid_w: int) -> Cell:
    """(row, col) of the patch holding the pixel that coordinate (x, y) of a width x height image lies in."""
    px = min(max(int(math.floor(x)), 0), width - 1)
    py = min(max(int(math.floor(y)), 0), height - 1)
    return _patch_index(py, height, grid_h), _patch_index(px, width, grid_w)


def similarity_to(tokens: torch.Tensor, grid: tuple[int, int], cells: list[Cell]) -> torch.Tensor:
    """Max over ``cells`` of the cosine similarity of every patch to that cell's patch, clamped at 0: [gh, gw].

    Zero everywhere when ``cells`` is empty (no negative point suppresses nothing)."""
    grid_h, grid_w = grid
    if tokens.shape[0] != grid_h * grid_w:
        raise PointsError(f"{tokens.shape[0]} patch tokens do not fill a {grid_h}x{grid_w} grid")
    if not cells:
        return tokens.new_zeros(grid)
    unit = F.normalize(tokens.float(), dim=-1)
    picked = unit[[r * grid_w + c for r, c in cells]]                   # [K, D]
    return (unit @ picked.T).amax(dim=-1).clamp_min(0).reshape(grid)


def selection_score(tokens: torch.Tensor, grid: tuple[int, int], positive: list[Cell],
                    negative: list[Cell]) -> torch.Tensor:
    """Eq. 2 before smoothing: ``M_P · (1 − M_N)`` on the patch grid."""
    return similarity_to(tokens, grid, positive) * (1.0 - similarity_to(tokens, grid, negative))


def otsu_foreground(score: np.ndarray, blur_sigma: float) -> np.ndarray:
    """Gaussian (sigma in patches; 0 = none), 8-bit min-max stretch, Otsu: boolean foreground [gh, gw]."""
    _check_blur(blur_sigma)
    score = np.ascontiguousarray(score, dtype=np.float32)
    if blur_sigma > 0:
        score = cv2.GaussianBlur(score, (0, 0), sigmaX=float(blur_sigma), sigmaY=float(blur_sigma))
    low, high = float(score.min()), float(score.max())
    if high - low < FLAT_RANGE:
        return np.ones(score.shape, dtype=bool)
    levels = np.round((score - low) * (255.0 / (high - low))).astype(np.uint8)
    threshold, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return levels > threshold


def _check_blur(blur_sigma: float) -> None:
    # NaN passes "< 0" and fails "> 0", so without this it would quietly act as no blur
    if not math.isfinite(blur_sigma) or blur_sigma < 0:
        raise PointsError(f"blur sigma must be a finite number >= 0 (in patches), got {blur_sigma}")


def keep_clicked_components(foreground: np.ndarray, positive: list[Cell], negative: list[Cell]) -> np.ndarray:
    """Force clicked patches, then keep the 8-connected foreground components holding a positive patch."""
    foreground = foreground.copy()
    for cell in positive:
        foreground[cell] = True
    for cell in negative:
        foreground[cell] = False
    _, labels = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=8)
    kept = {int(labels[cell]) for cell in positive}
    return np.isin(labels, list(kept))


def grid_to_pixels(grid_mask: np.ndarray, height: int, width: int, dilation_px: int = 0) -> torch.Tensor:
    """Each pixel takes the decision of the patch holding its centre (patch_of_point's rule); then dilation."""
    grid_h, grid_w = grid_mask.shape
    rows = _patch_index(np.arange(height), height, grid_h)
    cols = _patch_index(np.arange(width), width, grid_w)
    mask = grid_mask[rows[:, None], cols[None, :]].astype(np.uint8)
    if dilation_px > 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation_px + 1, 2 * dilation_px + 1))
        mask = cv2.dilate(mask, disc)
    return torch.from_numpy(mask.astype(np.float32))


def _cells(points: tuple[Point, ...], width: int, height: int, grid: tuple[int, int]) -> list[Cell]:
    return [patch_of_point(x, y, width, height, *grid) for x, y in points]


def points_to_mask(tokens: torch.Tensor, grid: tuple[int, int], height: int, width: int,
                   positives: tuple[Point, ...], negatives: tuple[Point, ...] = (), *,
                   blur_sigma: float = 1.0, dilation_px: int = 0) -> torch.Tensor:
    """Mask [H, W] (0/1 float) of the subject under the positive points of one image; points in pixels."""
    if not positives:
        raise PointsError("no positive point: give at least one point on the subject to select")
    _check_blur(blur_sigma)
    if dilation_px < 0:
        raise PointsError(f"dilation must be >= 0, got {dilation_px}")
    if grid[0] * grid[1] < 2 or min(grid) < 1:
        raise PointsError(f"a {grid[0]}x{grid[1]} patch grid has nothing to compare the clicked patch with (the "
                          "mask would be the whole image): use an encoder size of at least two patches per side")
    # a NaN token loses every comparison: its patch would silently drop out of the mask (or take the mask down)
    # (image_ops cannot reach model_patches.finite when trainers import it as a top-level package)
    bad = int((~torch.isfinite(tokens)).sum())
    if bad:
        raise PointsError(f"the patch tokens hold {bad} non-finite values (NaN/inf) of {tokens.numel()}; expected "
                          "finite features: the image or the CLIP vision model gives NaN/inf")
    pos_cells = _cells(positives, width, height, grid)
    neg_cells = _cells(negatives, width, height, grid)
    for i, cell in enumerate(pos_cells):
        if cell in neg_cells:
            j = neg_cells.index(cell)
            raise PointsError(
                f"positive point {i + 1} {_xy(positives[i])} and negative point {j + 1} {_xy(negatives[j])} fall "
                f"in the same encoder patch (row {cell[0]}, column {cell[1]} of the {grid[0]}x{grid[1]} grid, "
                f"{height / grid[0]:.0f}x{width / grid[1]:.0f} pixels of this image): move them apart or raise "
                "the encoder size")
    score = selection_score(tokens, grid, pos_cells, neg_cells).cpu().numpy()
    grid_mask = keep_clicked_components(otsu_foreground(score, blur_sigma), pos_cells, neg_cells)
    return grid_to_pixels(grid_mask, height, width, dilation_px)


def _xy(point: Point) -> str:
    return f"(x={point[0]:g}, y={point[1]:g})"


def select_subject(clip_vision, pixels: torch.Tensor, positives: tuple[Point, ...], negatives: tuple[Point, ...] = (),
                   *, layer: int = -1, encoder_size: int = 224, blur_sigma: float = 1.0,
                   dilation_px: int = 0) -> torch.Tensor:
    """Mask [H, W] of the subject under ``positives`` in one image ``pixels`` [3, H, W] (0..1), points in pixels:
    the image's CLIP patch tokens, then ``points_to_mask``. The one path of the Points to Mask node and of every
    trainer that takes clicks instead of a mask, so a click selects the same pixels everywhere."""
    height, width = pixels.shape[-2:]
    tokens, grid = patch_tokens(clip_vision, pixels[None], layer, encoder_size)
    return points_to_mask(tokens[0], grid, height, width, positives, negatives, blur_sigma=blur_sigma,
                          dilation_px=dilation_px)
