"""EqDiff's Mask Guided Diffusion Process (seed 001 Eq. 6–7): noise only inside the subject, loss only there.

    z_t' = M · z_t + (1 − M) · z_0          the UNet sees the clean background around the noised subject
    L    = Σ M · (ε − ε_θ)² / Σ M            per sample, normalised by the mask's area (channels included)

M is the subject mask at latent resolution, dilated by ``iterations`` 5×5 max-pools (the official 5 at train
time), so the subject's edge is noised too. Prior-preservation images use an all-ones mask (plain denoising).
"""
from __future__ import annotations

import torch

DILATION_KERNEL = 5


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, H, W] (0..1) at latent resolution [B, 1, h, w]: area average, then > 0 counts as subject,
    so a subject thinner than one latent cell still gets its cell."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(mask.float()[:, None], latent_hw)
    return (pooled > 0).float()


def dilate(mask: torch.Tensor, iterations: int, kernel: int = DILATION_KERNEL) -> torch.Tensor:
    """``iterations`` max-pools with a ``kernel``×``kernel`` window, stride 1 (official: 5 iterations of 5×5 on
    the 64×64 latent, a growth of 10 cells = 1/6.4 of the side; a smaller latent scales it with a smaller
    kernel or fewer iterations)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the dilation kernel must be an odd size >= 1, got {kernel}")
    for _ in range(iterations):
        mask = torch.nn.functional.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)
    return mask


def mgdp_input(x_t: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6 (``mask`` [B, 1, h, w] broadcasts over the channels)."""
    return mask * x_t + (1 - mask) * x0


def masked_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7 per sample: [B] squared errors inside the mask over the mask's area (times the channels)."""
    squared = (prediction.float() - target.float()) ** 2
    weights = mask.float().expand_as(squared)
    area = weights.flatten(1).sum(1)
    if bool((area <= 0).any()):
        raise ValueError("a subject mask is empty at latent resolution; every training image needs subject pixels")
    return (squared * weights).flatten(1).sum(1) / area
