"""A pretrained base for the lab's micro UNet: plain denoising before any method is fine-tuned on it.

The papers fine-tune a pretrained SD1.5(-inpainting), whose self-attention already matches content between
positions; a micro UNet from random weights has no such attention. Pretraining here is the stock model (no
patch, an all-zero context, like a dropped condition) on the lab's training scenes with the SD-inpainting mix
of masks, so the base sees every input kind the AnyLogo passes give it later:

* ``hidden``: the subject's region masked, as in the generation pass (it must be inpainted from the scene);
* ``visible``: mask 0 and the clean scene as the masked image, as the extraction pass sees its subject
  (``subject_known``);
* ``blank``: mask 1 everywhere, grey masked image: plain unconditional denoising.

Task ``copy`` instead trains the side-by-side control's input (the subject visible beside the scene, its copy
hidden in the region), the one setting where this UNet was seen to use a subject through its own attention.
"""
from __future__ import annotations

import time

import torch

from train.diffusion import implied_noise, noised

MASK_MODES = ("hidden", "visible", "blank")
PRETRAIN_TASKS = ("denoise", "copy")


def pretrain_step_inputs(z0: torch.Tensor, concat: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """The concat [B, 5, h, w] of a ``denoise`` pretraining batch: row r gets mask mode ``MASK_MODES[modes[r]]``
    (``concat`` is the pairs' own [region mask; masked scene])."""
    visible = torch.cat([torch.zeros_like(concat[:, :1]), z0], dim=1)
    blank = torch.cat([torch.ones_like(concat[:, :1]), torch.zeros_like(z0)], dim=1)
    choice = modes.view(-1, 1, 1, 1).to(concat.device)
    return torch.where(choice == 0, concat, torch.where(choice == 1, visible, blank))


def plain_loss(model, z0, concat, sigma, noise) -> torch.Tensor:
    """Noise MSE of the stock model (no patch) with an all-zero context."""
    x = noised(model, z0, noise, sigma)
    context = torch.zeros(z0.shape[0], 1, int(model.model_config.unet_config["context_dim"]), device=z0.device)
    denoised = model.apply_model(x, sigma, c_concat=concat, c_crossattn=context,
                                 transformer_options={"cond_or_uncond": [0], "sigmas": sigma})
    return (implied_noise(x, denoised.float(), sigma) - noise).square().mean()


def pretrain(model, pool, *, steps: int, batch: int, lr: float, seed: int, task: str, side_by_side,
             device, log_every: int = 250, log=print) -> list[dict]:
    """Train ``model`` in place for ``steps`` AdamW steps; returns the loss curve. ``side_by_side`` builds the
    copy task's input (the miniature's control)."""
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"pretraining task must be one of {PRETRAIN_TASKS}, got {task!r}")
    params = list(model.diffusion_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(30_000 + seed)  # a stream of its own: not any arm's data stream
    sigmas = model.model_sampling.sigmas.float()
    curve, window, started = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, pool.z0.shape[0], (batch,), generator=gen)
        t = torch.randint(0, len(sigmas), (batch,), generator=gen)
        noise = torch.randn((batch,) + tuple(pool.z0.shape[1:]), generator=gen)
        modes = torch.randint(0, len(MASK_MODES), (batch,), generator=gen)
        rows = pool.rows(index)
        if task == "denoise":
            z0, concat = rows.z0, pretrain_step_inputs(rows.z0, rows.concat, modes)
        else:
            z0, concat = side_by_side(rows.z0, rows.concat, rows.subject)
            column = torch.randn(z0.shape[:3] + (z0.shape[3] - rows.z0.shape[3],), generator=gen)
            noise = torch.cat([noise, column], dim=-1)
        loss = plain_loss(model, z0.to(device), concat.to(device), sigmas[t].to(device), noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            point = {"step": step, "loss": sum(window) / len(window), "seconds": time.perf_counter() - started}
            curve.append(point)
            window = []
            log(f"  pretrain {task} step {step}: loss {point['loss']:.4f} ({point['seconds']:.0f} s)")
    return curve
