"""Denoising-training pieces every SD1.5 method shares, expressed through ComfyUI's own model objects.

Noise levels are ComfyUI sigmas: a training sample draws a discrete timestep uniformly, takes its sigma from
``model_sampling.sigmas``, is noised with ``model_sampling.noise_scaling`` and denoised with
``BaseModel.apply_model`` — exactly the functions the samplers use — and the loss compares the noise implied by
the denoised prediction with the noise drawn. For SD1.5 (EPS parameterisation) this is the usual DDPM
epsilon-MSE at timestep t.

Encoders run one sample at a time so that a latent or text embedding never depends on which other samples
share its batch (2 processes x 1 sample then see the same numbers as 1 process x 2 samples), and keep results
per key (dataset index, caption) so an image is encoded once per run.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


def draw_sigmas(model, rng) -> torch.Tensor:
    """One training sigma per sample: a uniformly drawn discrete timestep of the model's schedule."""
    sigmas = model.model_sampling.sigmas
    t = rng.randint(0, len(sigmas))
    return sigmas.to(t.device)[t].float()


def noised(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return model.model_sampling.noise_scaling(sigma, noise, x0)


def implied_noise(x_noisy: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x_noisy - denoised) / sigma.view(-1, *([1] * (x_noisy.ndim - 1)))


class LatentCache:
    """Scaled VAE latents (``process_latent_in`` applied) of images ``[H,W,3]``, encoded singly, kept per key."""

    def __init__(self, vae, model, enabled: bool = True):
        self.vae, self.model, self.enabled, self.store = vae, model, enabled, {}

    def __call__(self, key, pixels: torch.Tensor) -> torch.Tensor:
        if key in self.store:
            return self.store[key]
        with torch.no_grad():
            latent = self.model.process_latent_in(self.vae.encode(pixels[None, ..., :3].cpu()))[0].cpu()
        if self.enabled:
            self.store[key] = latent
        return latent

    def batch(self, keys, pixels: torch.Tensor, device) -> torch.Tensor:
        return torch.stack([self(k, p) for k, p in zip(keys, pixels)]).to(device)


class TextCache:
    """CLIP text embeddings ``[77, 768]`` per caption, as CLIPTextEncode computes them; the newest ``size``
    captions are kept (about 240 kB each in fp32)."""

    def __init__(self, clip, size: int = 1024):
        self.clip, self.size, self.store = clip, size, OrderedDict()

    def __call__(self, caption: str) -> torch.Tensor:
        if caption in self.store:
            self.store.move_to_end(caption)
            return self.store[caption]
        with torch.no_grad():
            emb = self.clip.encode_from_tokens(self.clip.tokenize(caption))[0].float().cpu()
        self.store[caption] = emb
        if len(self.store) > self.size:
            self.store.popitem(last=False)
        return emb

    def batch(self, captions, device) -> torch.Tensor:
        return torch.stack([self(c) for c in captions]).to(device)
