"""AnyLogo inputs for the lab's subjects, computed the way the trainer computes them, minus the VAE.

The latents are the pixels (``subjects.space_to_depth``); the inpainting concat is [region mask; masked scene]
with the region set to 0, the grey of InpaintModelConditioning (0.5 in 0..1 pixels); the image-encoder tokens
are the pack's ``encode_dinov2_hierarchical`` groups of the micro DINOv2 with the masked scene's global token
(``group_tokens``), as ``train.anylogo`` builds them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from image_ops.hierarchical_encode import encode_dinov2_hierarchical
from model_patches.image_context import group_tokens

from . import subjects as S
from .micro_models import MICRO_DINOV2_RESOLUTION


@dataclass
class PairTensors:
    z0: torch.Tensor         # [N, 4, 8, 8] scene latents (x scale per side)
    concat: torch.Tensor     # [N, 5, 8, 8] mask + masked-scene latent (x scale)
    subject: torch.Tensor    # [N, 4, 4, 4] subject latents (x scale)
    tokens: list             # per group [N, T, D] (subject tokens + scene global token)

    def rows(self, index) -> "PairTensors":
        return PairTensors(self.z0[index], self.concat[index], self.subject[index], [t[index] for t in self.tokens])

    def to(self, device) -> "PairTensors":
        return PairTensors(self.z0.to(device), self.concat.to(device), self.subject.to(device),
                           [t.to(device) for t in self.tokens])


def masked_scene(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return pixels * (1 - mask)


@torch.no_grad()
def subject_tokens(encoder, subject_pixels: torch.Tensor, scene_pixels: torch.Tensor, chunk: int = 256) -> list:
    """Token groups of [N, 1, 8, 8] subjects, each with the global token of its [N, 1, 16, 16] masked scene."""
    parts = []
    for start in range(0, subject_pixels.shape[0], chunk):
        sub = torch.stack([S.as_rgb01(p) for p in subject_pixels[start:start + chunk]])
        bg = torch.stack([S.as_rgb01(p) for p in scene_pixels[start:start + chunk]])
        embeds = encode_dinov2_hierarchical(encoder, sub, size=MICRO_DINOV2_RESOLUTION, background_pixels=bg,
                                            chunk_size=chunk)
        parts.append([g.float() for g in group_tokens(embeds.groups, embeds.background)])
    return [torch.cat([p[g] for p in parts]) for g in range(len(parts[0]))]


def coarse_view(pixels: torch.Tensor, pool: int) -> torch.Tensor:
    """What a lossy encoder sees: ``pool`` x ``pool`` block means, shown at the original size (1 = unchanged)."""
    if pool <= 1:
        return pixels
    coarse = torch.nn.functional.avg_pool2d(pixels, pool)
    return torch.nn.functional.interpolate(coarse, scale_factor=pool, mode="nearest")


def upscaled(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """Every pixel repeated ``scale`` x ``scale`` times (nearest): the same image on a finer latent grid."""
    if scale <= 1:
        return pixels
    return pixels.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def build(pairs: list[S.Pair], encoder, subject_ids: list[int] | None = None, encoder_pool: int = 1,
          scale: int = 1) -> PairTensors:
    """Tensors of ``pairs``; with ``subject_ids`` (one per pair) that subject is the condition instead of the
    pair's own (how candidates are given at evaluation: same scene, another subject's latent and tokens).
    ``encoder_pool`` > 1 gives the image encoder only block means of the subject (the recycled latent keeps
    every pixel): DINOv2's tokens lose low-level detail, which is what the paper's recycling restores.
    ``scale`` > 1 repeats every pixel of scene, mask and subject ``scale`` times per side before the latents are
    taken (e.g. 2: 16x16 scene latents, 8x8 subject latents): the same content, farther apart in cells than the
    convolutions reach; the image tokens are those of the original pixels, so they do not change with it."""
    ids = subject_ids if subject_ids is not None else [p.subject_id for p in pairs]
    scenes = torch.stack([S.scene(p) for p in pairs])
    masks = torch.stack([S.region_mask(p) for p in pairs])
    masked = masked_scene(scenes, masks)
    subject_pixels = torch.stack([S.subject(i) for i in ids])
    tokens = subject_tokens(encoder, coarse_view(subject_pixels, encoder_pool), masked)
    scenes, masks, masked, subject_pixels = (upscaled(t, scale) for t in (scenes, masks, masked, subject_pixels))
    latent_mask = masks[:, :, ::S.BLOCK, ::S.BLOCK]  # the region is whole 2x2 blocks: exact
    concat = torch.cat([latent_mask, S.space_to_depth(masked)], dim=1)
    return PairTensors(S.space_to_depth(scenes), concat, S.space_to_depth(subject_pixels), tokens)
