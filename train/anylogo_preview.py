"""Region insertion with the model being trained, the way the nodes sample it: for validation images and evaluation.

It mirrors the shipped workflow — AnyLogo Apply (``build_patch`` on a clone, with the DINOv2 ``ImageContextPatch``)
+ InpaintModelConditioning + KSampler with the region as noise mask — on the trainer's own ModelPatcher, whose
UNet holds the current weights, so no export is needed.
"""
from __future__ import annotations

import torch

from model_patches.anylogo import RecyclingSettings, build_patch
from model_patches.image_context import ImageContextPatch

from .anylogo_step import masked_scene


def sample_insertion(patcher, vae, scene: torch.Tensor, mask: torch.Tensor, subject_latent: torch.Tensor,
                     image_context: ImageContextPatch, settings: RecyclingSettings, *, steps: int, cfg: float,
                     sampler: str, scheduler: str, seed: int) -> torch.Tensor:
    """The scene [3, H, W] with the region ``mask`` [H, W] generated from the subject (``subject_latent`` [1, 4,
    h, w] in model space, ``image_context`` its token groups) → the sampled latent [1, 4, H/8, W/8] (VAE space,
    what VAEDecode takes)."""
    import comfy.sample

    model = patcher.clone()
    build_patch(model, subject_latent, settings, image_context).install(model)
    pixels = scene.movedim(0, -1)[None].cpu()
    with torch.no_grad():
        latent = vae.encode(pixels)
        concat = vae.encode(masked_scene(scene, mask).movedim(0, -1)[None].cpu())
    context_dim = int(patcher.model.model_config.unet_config["context_dim"])
    region = mask[None, None].cpu()

    def conditioning():  # text is not read: every cross-attention layer takes the DINOv2 tokens instead
        return [[torch.zeros(1, 1, context_dim), {"concat_latent_image": concat, "concat_mask": region}]]

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conditioning(), conditioning(), latent,
                               noise_mask=region, disable_pbar=True, seed=seed)
