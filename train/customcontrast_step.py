"""One CustomContrast training step (seed 003 Eq. 9): ``L = L_LDM + λ1 (L_c + L_m) + λ2 L_loc``.

The UNet call is the one the Apply node makes: ``customcontrast_options`` installs the decoupled visual
attention and the per-layer S+ contexts (``model_patches/customcontrast.py``), the encoder's per-step part runs at
the sample's own timestep, and each caption goes through ComfyUI's CLIP text encoder with that layer's S+ token
(``PlaceholderPrompt.encode``). The location recorder (``model_patches/customcontrast_location.py``) collects the
placeholder-token and visual attention maps of every layer on the way.

* L_LDM: the eps-MSE of the batch (mean);
* L_c (CSCL, Eq. 4) over the visual/textual CLS tokens and L_m (MACL, Eq. 7) over S+, both over the *global*
  batch: the rows of every rank are gathered with gradients (``gather_global``); MACL's appearance factors come
  from the CLIP image embeddings of the segmented subjects, gathered too (no gradient);
* L_loc: the aggregated location map Ā against the view's subject mask at latent resolution (mean over rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_patches.customcontrast import CallState, VisualAttention, customcontrast_options
from model_patches.customcontrast_encoder import MFIEncoder
from model_patches.customcontrast_location import RECORDER_KEY, AttentionRecorder
from model_patches.customcontrast_losses import (appearance_factors, cscl_loss, gather_global, location_loss,
                                                 macl_loss)

from .diffusion import implied_noise, noised


@dataclass(frozen=True)
class LossWeights:
    contrastive: float = 1e-2     # λ1
    location: float = 1e-3        # λ2
    temperature: float = 0.07     # τ of MACL
    min_similarity: float = 0.05  # clamp of r_ij before α = 1/r


@dataclass
class StepInputs:
    """A micro-batch, prepared: everything but the trained modules' outputs."""
    z0: torch.Tensor              # [B, 4, h, w] clean latents of the views
    masks: torch.Tensor           # [B, h, w] subject masks at latent resolution
    features: torch.Tensor        # [B, T, F] CLIP features of the segmented views (layers concatenated)
    appearance: torch.Tensor      # [B, D] CLIP image embeddings of the segmented views
    subjects: torch.Tensor        # [B] integer subject ids
    prompts: list                 # B PlaceholderPrompt (tokenized captions)
    context: torch.Tensor         # [B, T, 768] the captions' plain encodings (what c_crossattn carries)


def placeholder_recorder(prompts) -> AttentionRecorder:
    return AttentionRecorder([[s * 77 + i for s, i in p.positions] for p in prompts], [p.length for p in prompts])


def call_state(encoder: MFIEncoder, features: torch.Tensor, timestep: torch.Tensor, prompts) -> CallState:
    """Encoder outputs at each row's timestep and each row's per-layer contexts (one text-encoder call per row,
    so a row's numbers do not depend on which rows share its batch)."""
    outputs = encoder.forward_step(encoder.encode_image(features), timestep)
    contexts = torch.cat([p.encode(outputs.s_plus[i:i + 1]) for i, p in enumerate(prompts)])
    return CallState(contexts, outputs.visual, 1.0, outputs)


def customcontrast_forward(model, slots, encoder: MFIEncoder, visual: VisualAttention, x_noisy: torch.Tensor,
                           sigma: torch.Tensor, inputs: StepInputs, *, recorder: AttentionRecorder | None = None,
                           gamma: float = 1.0, cond_or_uncond=(0,)):
    """(denoised prediction, call state), as the Apply node's model call computes them: the rows are chunks of
    ComfyUI's ``cond_or_uncond`` flags (training: conditional rows only); ``inputs`` describe the conditional
    rows, and the timestep of the first conditional row drives the encoder (the node: one sigma per call)."""
    flags = list(cond_or_uncond)
    first = flags.index(0) * (x_noisy.shape[0] // len(flags))
    timestep = model.model_sampling.timestep(sigma.float())
    if len(flags) > 1:
        timestep = timestep[first:first + 1]
    state = call_state(encoder, inputs.features, timestep, inputs.prompts)
    state.gamma = gamma
    options = customcontrast_options({}, slots, visual, state)
    options.update({"cond_or_uncond": flags, "sigmas": sigma})
    if recorder is not None:
        options[RECORDER_KEY] = recorder
    out = model.apply_model(x_noisy, sigma, c_crossattn=inputs.context.to(x_noisy), transformer_options=options)
    return out, state


def global_contrastive_terms(state: CallState, appearance: torch.Tensor, subjects: torch.Tensor,
                             weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, L_m) over the rows of every process (the features gathered with gradients)."""
    out = state.outputs
    visual_cls, text_cls, s_plus = (gather_global(t) for t in (out.visual_cls, out.text_cls, out.s_plus))
    embeds = gather_global(appearance.float().to(s_plus.device))
    ids = gather_global(subjects.to(s_plus.device, torch.float64)).long()
    alpha = appearance_factors(embeds, weights.min_similarity)
    return cscl_loss(visual_cls, text_cls), macl_loss(s_plus, alpha, ids, weights.temperature)


def customcontrast_loss(model, slots, encoder, visual, inputs: StepInputs, sigma: torch.Tensor,
                        noise: torch.Tensor, weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 9 for one micro-batch; the components (detached) for the log and for tests."""
    x_noisy = noised(model, inputs.z0, noise, sigma)
    recorder = placeholder_recorder(inputs.prompts)
    denoised, state = customcontrast_forward(model, slots, encoder, visual, x_noisy, sigma, inputs,
                                             recorder=recorder)
    ldm = (implied_noise(x_noisy, denoised.float(), sigma) - noise).square().mean()
    l_c, l_m = global_contrastive_terms(state, inputs.appearance, inputs.subjects, weights)
    attention = recorder.aggregate(*inputs.z0.shape[-2:])
    l_loc = location_loss(attention, inputs.masks.to(attention))
    total = ldm + weights.contrastive * (l_c + l_m) + weights.location * l_loc
    state.outputs = None
    parts = {"ldm": ldm, "cscl": l_c, "macl": l_m, "loc": l_loc}
    return total, {k: v.detach() for k, v in parts.items()}


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W] pixel mask → [height, width] by area averaging (the fraction of each latent cell on the subject)."""
    return F.interpolate(mask[None, None].float(), size=(height, width), mode="area")[0, 0]
