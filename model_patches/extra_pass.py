"""One extra pass of the same UNet on a reference latent noised to the current sigma (subject or reference).

Used inside sampling (from a ``calc_cond_batch`` wrapper) and by trainers: the latent is noised with the
model's own ``noise_scaling`` and a seeded generator, so the pass is reproducible per seed and step, and it
carries the sampler's patches but no ControlNet residuals.
"""
from __future__ import annotations

import hashlib
import struct

import torch

NOISE_STREAM = "noise"


def step_seed(seed: int, sigma: float, stream: object = NOISE_STREAM) -> int:
    """A 63-bit generator seed for one step of one random stream, from the user's seed and the step's sigma
    (no schedule lookup needed).

    The parts are hashed (BLAKE2b), not combined arithmetically: ``torch.Generator.manual_seed`` on the CPU
    keeps only the seed's low 32 bits, and a float32 sigma widened to a double has its low 29 mantissa bits
    zero, so a linear formula gave about eight distinct generators per user seed across a whole schedule and
    let the keep draws of one layer reuse the subject noise's generator. ``stream`` separates the subject
    noise from each layer's keep draws."""
    bits = struct.unpack("<Q", struct.pack("<d", float(sigma)))[0]
    digest = hashlib.blake2b(repr((str(stream), int(seed), bits)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(shape, seed: int, sigma: float, device, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, sigma, NOISE_STREAM))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)


def noised(base_model, latent: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``latent`` (model space, i.e. after process_latent_in) forward-noised to ``sigma`` the way samplers do."""
    return base_model.model_sampling.noise_scaling(sigma.view(-1).to(latent), noise, latent)


def inpaint_concat(latent: torch.Tensor, known: bool, base_model=None) -> torch.Tensor:
    """The 5 extra channels of a 9-channel inpainting UNet for a reference latent: [mask, masked-image latent].

    ``known=True``: mask 0 and the clean latent — the reference is fully visible, as the scene is outside its
    region, so the pass's features stay anchored to the clean subject at every noise level.
    ``known=False``: mask 1 and the latent of a blank (grey) image — the whole reference is "to be painted",
    exactly what ComfyUI gives an inpainting UNet that gets no mask (``base_model.blank_inpaint_image_like``;
    SD-inpainting was trained with the masked image's region grey, whose latent is not zero).
    """
    b, _, h, w = latent.shape
    if known:
        return torch.cat([torch.zeros(b, 1, h, w, dtype=latent.dtype, device=latent.device), latent], dim=1)
    blank_like = getattr(base_model, "blank_inpaint_image_like", None)
    if blank_like is None:
        raise ValueError("subject_concat 'unknown' needs ComfyUI's inpainting model (blank_inpaint_image_like)")
    return torch.cat([torch.ones(b, 1, h, w, dtype=latent.dtype, device=latent.device), blank_like(latent)], dim=1)


def run_reference_pass(base_model, x: torch.Tensor, sigma: torch.Tensor, *, context: torch.Tensor,
                       transformer_options: dict, concat: torch.Tensor | None = None,
                       stop: type[BaseException] | None = None) -> torch.Tensor | None:
    """Run ``base_model.apply_model`` on an already-noised reference ``x`` as a conditional (cond) row.

    ``transformer_options`` is the sampler's (its patches apply) plus the status the patches react to. A
    ``stop`` exception raised by a patch once it has what it needs ends the pass early (returns None).
    """
    options = {**transformer_options, "cond_or_uncond": [0], "sigmas": sigma.view(-1)[:1],
               "uuids": [None]}
    if sigma.numel() not in (1, x.shape[0]):
        raise ValueError(f"{sigma.numel()} sigmas for {x.shape[0]} reference latents")
    try:
        return base_model.apply_model(x, sigma.view(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.view(-1),
                                      c_concat=concat,
                                      c_crossattn=context, transformer_options=options)
    except Exception as e:
        if stop is not None and isinstance(e, stop):
            return None
        raise
