"""One EqDiff forward and its losses, shared by the trainer and (for the parity test) the node path's check.

``eqdiff_forward`` is the trainer's UNet evaluation: the reference pass of the same UNet (no gradient, the
pack's extra pass) banking the RRA layers' inputs, then the denoising pass reading them — the very sequence
``EqDiffPatch.calc_cond_batch_wrapper`` runs in sampling, with the same hook objects.
"""
from __future__ import annotations

import torch

from model_patches.custom_diffusion import RECORDER_KEY, TokenMapRecorder
from model_patches.eqdiff_rra import (STATUS_KEY, Read, ReferenceBank, ReferenceRecorder, capture_reference,
                                      level_grids)


def eqdiff_forward(model, transformer_options: dict, slots, modules, x: torch.Tensor, sigma: torch.Tensor,
                   context: torch.Tensor, ref_x: torch.Tensor, ref_sigma: torch.Tensor, ref_context: torch.Tensor,
                   *, recorder: ReferenceRecorder | None = None, token_maps: TokenMapRecorder | None = None,
                   strength: float = 1.0) -> torch.Tensor:
    """Denoised prediction of ``x`` rows; reference rows (``ref_x``) serve the rows in equal consecutive groups
    (one reference for all rows, or one per row, or the instance references repeated for the prior rows)."""
    bank = capture_reference(model, ref_x, ref_sigma, ref_context.detach(), slots, transformer_options)
    repeat = x.shape[0] // ref_x.shape[0]
    if repeat * ref_x.shape[0] != x.shape[0]:
        raise ValueError(f"{ref_x.shape[0]} references cannot serve {x.shape[0]} rows")
    if repeat > 1 and ref_x.shape[0] > 1:
        bank = ReferenceBank({k: v.repeat(repeat, 1, 1) for k, v in bank.features.items()})
    options = {**transformer_options, STATUS_KEY: Read(bank, modules, strength, None, recorder)}
    if token_maps is not None:
        options[RECORDER_KEY] = token_maps
    try:
        return model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
    finally:
        bank.clear()


def loss_level(slots_levels: int) -> int:
    """The UNet level of the attention losses: the official 16×16 maps at 512 px are 1/4 of the latent side
    (level 2); a model with fewer levels uses its deepest one."""
    return min(2, slots_levels - 1)


def grid_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, H, W] nearest-resized to a token grid, flattened: [B, h·w] (as the official loss)."""
    return torch.nn.functional.interpolate(mask.float()[:, None], size=grid, mode="nearest").flatten(1)


def cross_attention_loss(token_maps: TokenMapRecorder, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MSE between the placeholder's cross-attention map at ``grid`` (mean over the encoder and decoder layers
    there, max-normalised per row) and the subject mask resized to that grid; rows without a placeholder skip."""
    maps = [(rows, probs) for name, (rows, probs) in token_maps.maps.items() if token_maps.grids[name] == grid]
    if not maps:
        raise RuntimeError(f"no cross-attention layer at the loss grid {grid}")
    rows = maps[0][0]
    mean = torch.stack([probs for _, probs in maps]).mean(0)
    mean = mean / mean.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.nn.functional.mse_loss(mean, grid_mask(mask[rows], grid))


def reference_attention_loss(recorder: ReferenceRecorder, target_mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Eq. 10 at the loss grid: per query, the attention mass on the reference's subject tokens against the
    target's subject mask (MSE over the queries, mean over the middle/decoder layers there); the first ``rows``
    rows (the instance rows) count."""
    losses = []
    for name, mass in recorder.masses.items():
        grid = recorder.grids[name]
        losses.append(torch.nn.functional.mse_loss(mass[:rows], grid_mask(target_mask, grid)))
    if not losses:
        raise RuntimeError("no RRA layer at the loss grid recorded its reference attention")
    return torch.stack(losses).mean()


def loss_grid(latent_hw: tuple[int, int], slots) -> tuple[int, int]:
    levels = 1 + max(slot.level for slot in slots)
    return level_grids(latent_hw, levels)[loss_level(levels)]
