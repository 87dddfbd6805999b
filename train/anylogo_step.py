"""AnyLogo's training forward (Eq. 6), assembled from the very objects the AnyLogo Apply node installs.

One call = the gemini status of a batch: the extraction status on the subject latents (one subject per row,
noised to each row's sigma with its own noise, ``model_patches.anylogo.extract_signatures``), then the
generation status on the noised scenes, where each recycled layer's ``RecyclingAttention`` reads that row's
signatures unless the row's per-layer keep decision dropped them (sparse recycling, Eq. 5), and every
cross-attention layer gets that row's projected DINOv2 token group (``ImageContextPatch``). A row whose condition
was dropped (classifier-free guidance training) has zero DINOv2 features — the unconditional rows' null tokens at
sampling — and reads no signature, so it is trained exactly as Eq. 7's unconditional prediction is computed.

The inpainting inputs are computed as ComfyUI's InpaintModelConditioning + ``BaseModel.concat_cond`` compute
them (region pixels set to 0.5 grey before encoding; mask resized to the latent grid and rounded).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from model_patches.anylogo import POSITIONS, extract_signatures
from model_patches.image_context import POSITIVE_COND_KEY, ImageContextPatch, group_of_slots
from model_patches.recycling import STATUS_KEY, AttentionRecorder, Generation, RecyclingAttention
from model_patches.unet_layout import MIDDLE, TransformerSlot, select_slots, transformer_slots

from .diffusion import implied_noise, noised


@dataclass(frozen=True)
class RecyclingLayout:
    """The recycled self-attention layers and the DINOv2 group of every cross-attention layer of one UNet."""
    slots: tuple[TransformerSlot, ...]
    group_of: dict
    in_channels: int
    context_dim: int

    @classmethod
    def of(cls, model, positions: str, include_middle: bool, groups: int) -> "RecyclingLayout":
        blocks = POSITIONS[positions] + ((MIDDLE,) if include_middle else ())
        config = model.model_config.unet_config
        return cls(tuple(select_slots(model, blocks)), group_of_slots(transformer_slots(model), groups),
                   int(config["in_channels"]), int(config["context_dim"]))

    def transformer_options(self, image_context: ImageContextPatch, recycling: bool) -> dict:
        options = {"patches": {"attn2_patch": [image_context]}, POSITIVE_COND_KEY: 0}
        if recycling:
            options["patches_replace"] = {"attn1": {slot.key: RecyclingAttention(slot) for slot in self.slots}}
        return options


def keep_decisions(uniform: torch.Tensor, threshold: float, dropped: torch.Tensor) -> torch.Tensor:
    """Sparse recycling's per-row, per-layer decisions (Eq. 5): keep layer i of row r when its uniform draw
    ``uniform[r, i]`` <= Λ; Λ = 0 keeps nothing (blocked flow), and a row whose condition is dropped reads no
    signature (Eq. 7's unconditional prediction)."""
    if threshold <= 0:
        return torch.zeros_like(uniform, dtype=torch.bool)
    return (uniform <= threshold) & ~dropped.view(-1, 1)


def sparse_key_bias(keep: torch.Tensor, slots) -> callable:
    """Generation ``key_bias`` from per-row, per-layer keep decisions ``keep`` [B, len(slots)] (bool):
    0 where the row reads that layer's signature, -inf where it is dropped (Eq. 5's ∅)."""
    index = {slot.key: i for i, slot in enumerate(slots)}
    bias = torch.where(keep, 0.0, -math.inf)

    def key_bias(slot_key, rows: int, device):
        if rows != bias.shape[0]:
            raise RuntimeError(f"{bias.shape[0]} keep decisions for {rows} reading rows")
        return bias[:, index[slot_key]].to(device)

    return key_bias


def anylogo_forward(model, layout: RecyclingLayout, x_noisy: torch.Tensor, sigma: torch.Tensor,
                    concat: torch.Tensor, subject: torch.Tensor, subject_noise: torch.Tensor,
                    image_context: ImageContextPatch, keep: torch.Tensor | None = None, *,
                    subject_known: bool = True, detach_signatures: bool = False,
                    recorder: AttentionRecorder | None = None) -> torch.Tensor:
    """The generation status's denoised prediction [B, 4, h, w] for noised scene latents ``x_noisy`` at
    per-row ``sigma`` [B], with ``concat`` [B, 5, h, w] (mask, masked-scene latent) and the rows' subject
    latents ``subject`` [B, 4, hs, ws] noised with ``subject_noise`` at the same sigmas. ``keep`` [B, layers]:
    which recycled layers each row reads (None: all, the complete transmission of sampling). No layer to read
    (blocked flow, or every row dropped) skips the extraction pass. The signature bank belongs to this call's
    autograd graph (gradient checkpointing replays attention from it in backward) and is emptied here when no
    graph was built. ``recorder`` collects what the recycled layers delivered (ASA, SLD; the attention report)."""
    reading = bool(layout.slots) and (keep is None or bool(keep.any()))
    options = layout.transformer_options(image_context, reading)
    context = torch.zeros(x_noisy.shape[0], 1, layout.context_dim, device=x_noisy.device, dtype=x_noisy.dtype)
    bank = None
    if reading:
        with torch.no_grad() if detach_signatures else contextlib.nullcontext():
            bank = extract_signatures(model, subject, subject_noise, sigma, context, list(layout.slots), options,
                                      in_channels=layout.in_channels, subject_known=subject_known)
        key_bias = None if keep is None else sparse_key_bias(keep, layout.slots)
        options[STATUS_KEY] = Generation(bank, reading_cond=0, key_bias=key_bias, recorder=recorder)
    options.update({"cond_or_uncond": [0], "sigmas": sigma})
    try:
        return model.apply_model(x_noisy, sigma, c_concat=concat, c_crossattn=context, transformer_options=options)
    finally:
        if bank is not None and not torch.is_grad_enabled():
            bank.clear()


def anylogo_loss(model, layout: RecyclingLayout, z0: torch.Tensor, concat: torch.Tensor, subject: torch.Tensor,
                 image_context: ImageContextPatch, sigma: torch.Tensor, noise: torch.Tensor,
                 subject_noise: torch.Tensor, keep: torch.Tensor, *, subject_known: bool = True,
                 detach_signatures: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 for a batch of clean scene latents ``z0``: the noise MSE of the generation status only, and (for the
    log, no gradient) the same error inside the region (``concat``'s mask channel). The trainer and the lab's
    miniatures both train through this, so a miniature measures the trainer's own objective."""
    x_noisy = noised(model, z0, noise, sigma)
    denoised = anylogo_forward(model, layout, x_noisy, sigma, concat, subject, subject_noise, image_context, keep,
                               subject_known=subject_known, detach_signatures=detach_signatures)
    error = (implied_noise(x_noisy, denoised.float(), sigma) - noise).square()
    region = concat[:, :1]
    region_loss = (error * region).sum() / (region.sum() * error.shape[1]).clamp_min(1)
    return error.mean(), region_loss.detach()


# ---- inputs --------------------------------------------------------------------------------------------------

def encode_latent(vae, model, pixels: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in 0..1 → [4, H/8, W/8] VAE latent in model space (``process_latent_in``), one image per call
    so a latent never depends on its batch."""
    with torch.no_grad():
        return model.process_latent_in(vae.encode(pixels.movedim(0, -1)[None].cpu()).float())[0]


def masked_scene(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """InpaintModelConditioning's masked image: region pixels (rounded mask) set to 0.5."""
    keep = 1.0 - mask.round()
    return (pixels - 0.5) * keep + 0.5


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W] pixel mask → [1, height, width] as BaseModel.concat_cond builds the inpainting mask channel."""
    import comfy.utils

    return comfy.utils.common_upscale(mask[None, None], width, height, "bilinear", "center").round()[0]


def inpaint_inputs(vae, model, pixels: torch.Tensor, mask: torch.Tensor):
    """(scene latent z0 [4, h, w], concat [5, h, w] = [mask, masked-scene latent]) for one scene crop."""
    z0 = encode_latent(vae, model, pixels)
    concat = torch.cat([latent_mask(mask, *z0.shape[-2:]), encode_latent(vae, model, masked_scene(pixels, mask))])
    return z0, concat
