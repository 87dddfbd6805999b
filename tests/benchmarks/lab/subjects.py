"""Procedural subjects and scenes whose pixels are their own latents (no VAE between the model and the data).

A subject is an 8x8 grey-level glyph: two or three rectangles/strokes of one level on a background of another,
drawn from a generator seeded by the subject's index alone, so ``subject(i)`` is a pure function of ``i`` and
any number of distinct subjects exist. Training subjects and held-out subjects come from disjoint index ranges
(AnyLogo's claim is zero-shot: only a model that copies the given subject can do well on subjects it never saw).

A scene is a 16x16 smooth random texture with one 8x8 region, at an even position, holding a subject. Pixels
(one grey channel, in [-1, 1]) become a 4-channel latent by a fixed 2x2 space-to-depth, which
``depth_to_space`` inverts exactly; a region at even pixel positions is exactly a 4x4 block of latent cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUBJECT_PX, SCENE_PX, BLOCK = 8, 16, 2
TRAIN_SUBJECTS = range(0, 1_000_000)            # index ranges: the split cannot overlap by construction
HELD_OUT_SUBJECTS = range(1_000_000, 2_000_000)
LAB_SEED = 20240517


def space_to_depth(pixels: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """[..., C, H, W] -> [..., C*block*block, H/block, W/block]: each latent cell holds its block's pixels."""
    *lead, c, h, w = pixels.shape
    x = pixels.reshape(-1, c, h // block, block, w // block, block).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(*lead, c * block * block, h // block, w // block)


def depth_to_space(latent: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The exact inverse of ``space_to_depth``."""
    *lead, cc, h, w = latent.shape
    c = cc // (block * block)
    x = latent.reshape(-1, c, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(*lead, c, h * block, w * block)


STREAMS = {"subject": 1, "background": 2, "pairs": 3, "texture": 4}  # one random stream per kind of object


def _rng(stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([LAB_SEED, STREAMS[stream], int(index)])


def subject(index: int) -> torch.Tensor:
    """Glyph ``index`` as [1, 8, 8] grey levels in [-1, 1]: 2-3 filled rectangles (some one pixel thin, i.e.
    strokes) of a foreground level on a background level at least 0.8 away, so the shape is always visible."""
    rng = _rng("subject", int(index))
    background = rng.uniform(-1, 1)
    foreground = rng.uniform(-1, 1)
    while abs(foreground - background) < 0.8:
        foreground = rng.uniform(-1, 1)
    image = np.full((SUBJECT_PX, SUBJECT_PX), background, dtype=np.float32)
    for _ in range(int(rng.integers(2, 4))):
        h, w = int(rng.integers(1, 7)), int(rng.integers(1, 7))
        y, x = int(rng.integers(0, SUBJECT_PX - h + 1)), int(rng.integers(0, SUBJECT_PX - w + 1))
        image[y:y + h, x:x + w] = foreground
    return torch.from_numpy(image)[None]


def background(index: int) -> torch.Tensor:
    """A [1, 16, 16] smooth texture: a random 4x4 grid upsampled bilinearly, plus faint pixel noise."""
    rng = _rng("background", int(index))
    coarse = torch.from_numpy(rng.uniform(-0.8, 0.8, (1, 1, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(SCENE_PX, SCENE_PX), mode="bilinear",
                                             align_corners=False)[0]
    return smooth + torch.from_numpy(rng.normal(0, 0.05, smooth.shape).astype(np.float32))


@dataclass(frozen=True)
class Pair:
    """One AnyLogo example: scene ``background_id`` with subject ``subject_id`` in the region at (y, x)."""
    subject_id: int
    background_id: int
    y: int
    x: int


def make_pairs(count: int, subjects: range, subject_pool: int, *, seed: int) -> list[Pair]:
    """``count`` pairs over the first ``subject_pool`` subjects of ``subjects``, each subject used about equally
    often; positions on the even grid; backgrounds never shared between two calls with different seeds."""
    rng = _rng("pairs", int(seed))
    ids = np.resize(rng.permutation(subject_pool), count)
    positions = range(0, SCENE_PX - SUBJECT_PX + 1, BLOCK)
    return [Pair(subjects[int(s)], seed * 10_000_000 + i, int(rng.choice(positions)), int(rng.choice(positions)))
            for i, s in enumerate(ids)]


def region_mask(pair: Pair) -> torch.Tensor:
    mask = torch.zeros(1, SCENE_PX, SCENE_PX)
    mask[:, pair.y:pair.y + SUBJECT_PX, pair.x:pair.x + SUBJECT_PX] = 1
    return mask


def scene(pair: Pair) -> torch.Tensor:
    pixels = background(pair.background_id).clone()
    pixels[:, pair.y:pair.y + SUBJECT_PX, pair.x:pair.x + SUBJECT_PX] = subject(pair.subject_id)
    return pixels


def as_rgb01(pixels: torch.Tensor) -> torch.Tensor:
    """Grey [-1, 1] -> [3, H, W] in 0..1, what the image encoder reads."""
    return ((pixels + 1) / 2).clamp(0, 1).expand(3, -1, -1)


def textured_subject(index: int) -> torch.Tensor:
    """Glyph ``index`` with a stripe texture on its foreground: ±0.3 around the foreground level, period 2–3 px
    at one of four orientations (all from the subject's own stream, so a pure function of ``index``). The
    texture is the detail a per-subject token struggles to hold and a reference can supply (EqDiff's RRA)."""
    glyph = subject(index)
    rng = _rng("texture", int(index))
    period, angle = float(rng.choice([2.0, 3.0])), float(rng.choice([0.0, 0.25, 0.5, 0.75])) * np.pi
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SUBJECT_PX, 0:SUBJECT_PX].astype(np.float32)
    stripes = np.sign(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase))
    level = np.float32(_rng("subject", int(index)).uniform(-1, 1))  # subject()'s first draw: its background
    foreground = glyph != torch.tensor(level)
    textured = glyph + 0.3 * torch.from_numpy(stripes.astype(np.float32))[None] * foreground
    return textured.clamp(-1, 1)


def place(canvas: torch.Tensor, patch: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """A copy of ``canvas`` [1, H, W] with ``patch`` [1, h, w] at (y, x)."""
    out = canvas.clone()
    out[:, y:y + patch.shape[-2], x:x + patch.shape[-1]] = patch
    return out


def box_mask(shape: tuple[int, int], y: int, x: int, size: int = SUBJECT_PX) -> torch.Tensor:
    mask = torch.zeros(1, *shape)
    mask[:, y:y + size, x:x + size] = 1
    return mask
