"""One CustomContrast training step (seed 003 Eq. 9): ``L = L_LDM + λ1 (L_c + L_m) + λ2 L_loc``.

The UNet call is the one the Apply node makes: a ``CustomContrastPatch`` installed on a clone of the MODEL
(its APPLY_MODEL wrapper), handed to ``apply_model`` through ``transformer_options["wrappers"]`` as ComfyUI's
sampler hands it. ``BatchPatch`` is that patch with one subject per row: each row's own CLIP features, caption and
timestep; the encoder's per-step part runs at the sample's timestep, and each caption goes through ComfyUI's CLIP
text encoder with that layer's S+ token (``PlaceholderPrompt.encode``). The shared ``AttentionRecorder``
(``model_patches/customcontrast_location.py``, ``keep_grad=True``) collects the placeholder-token and visual
attention maps of every layer on the way; their aggregate Ā is L_loc's input.

* L_LDM: the eps-MSE of the batch (mean);
* L_c (CSCL, Eq. 4) over the visual/textual CLS tokens and L_m (MACL, Eq. 7) over S+, both over the *global*
  batch: the rows of every rank are gathered with gradients (``gather_global``); MACL's appearance factors come
  from the CLIP image embeddings of the segmented subjects, gathered too (no gradient);
* L_loc: the aggregated location map Ā against the view's subject mask at latent resolution (mean over rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model_patches.customcontrast import CallState, CustomContrastPatch
from model_patches.customcontrast_encoder import MFIOutput
from model_patches.customcontrast_location import AttentionRecorder
from model_patches.customcontrast_losses import (appearance_factors, cscl_loss, gather_global, location_loss,
                                                 macl_loss)
from model_patches.customcontrast_subjects import SubjectGroup

from .diffusion import implied_noise, noised


CSCL_NEGATIVES = ("all", "other_subjects")


@dataclass(frozen=True)
class LossWeights:
    contrastive: float = 1e-2     # λ1
    location: float = 1e-3        # λ2
    temperature: float = 0.07     # τ of MACL
    min_similarity: float = 0.25  # clamp of r_ij before α = 1/r (α <= 4; see customcontrast_losses)
    terms: tuple = ("cscl", "macl")  # which contrastive terms λ1 weighs (the paper's Table 4 ablates each)
    cscl_negatives: str = "all"   # "all": Eq. 4 as printed; "other_subjects": a subject's other views are no negative


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


@dataclass
class BatchPatch(CustomContrastPatch):
    """The Apply node's patch for a training batch: row b of the conditional rows is its own subject (features
    ``image_features[b]``, caption ``prompts[b]``, timestep ``timesteps[b]``). ``state_for`` is the only
    difference from sampling; the wrapper, the S+ context patch and the decoupled attention are the node's.
    The state of the last call (with the encoder outputs the losses need) stays in ``last``."""
    prompts: list = field(default_factory=list)
    timesteps: torch.Tensor | None = None
    record: bool = True
    last: CallState | None = None
    last_outputs: MFIOutput | None = None

    def state_for(self, timestep: torch.Tensor, gamma: float | None = None) -> CallState:
        if self.timesteps is not None:
            timestep = self.timesteps
        outputs = self.encoder.forward_step(self.image_state(), timestep)
        lengths = {p.length for p in self.prompts}
        if len(lengths) != 1:
            raise ValueError(f"the batch's captions encode to different lengths {sorted(lengths)} tokens; keep "
                             "training captions within 75 tokens")
        # one text-encoder call per row, so a row's numbers do not depend on which rows share its batch
        contexts = torch.cat([p.encode(outputs.s_plus[i:i + 1]) for i, p in enumerate(self.prompts)])
        state = CallState(contexts, outputs.visual, self.gamma if gamma is None else gamma, outputs,
                          placeholder=[p.key_positions(0) for p in self.prompts], prompt_length=lengths.pop())
        if self.record:
            state.recorder = AttentionRecorder(keep_grad=True)
        self.last, self.last_outputs = state, outputs
        return state


class BatchGroup(SubjectGroup):
    """The Apply node's one-subject group, whose call state is the batch's (``BatchPatch.state_for``): the
    wrapper, location handling and attention patches are the ones sampling runs."""

    def state_for(self, timestep: torch.Tensor, sigma: float | None = None) -> CallState:
        return self.subjects[0].state_for(timestep)


def batch_patch(patcher, slots, encoder, visual, prompt) -> tuple[BatchPatch, object]:
    """(the patch, the MODEL clone carrying it): installed once, fed a new batch every step."""
    patch = BatchPatch(encoder=encoder, visual_attention=visual, slots=slots, prompt=prompt,
                       image_features=torch.zeros(0))
    patched = patcher.clone()
    BatchGroup([patch], prompt).install(patched)
    return patch, patched


def customcontrast_forward(patch: BatchPatch, patched, x_noisy: torch.Tensor, sigma: torch.Tensor,
                           inputs: StepInputs, *, record: bool = True, gamma: float = 1.0, cond_or_uncond=(0,)):
    """(denoised prediction, call state) of ``patched`` (the clone ``batch_patch`` made) called as ComfyUI's
    sampler calls it: ``cond_or_uncond`` flags the row chunks (training: conditional rows only); ``inputs``
    describe the conditional rows, each at its own sigma."""
    flags = list(cond_or_uncond)
    per_chunk = x_noisy.shape[0] // len(flags)
    first = flags.index(0) * per_chunk
    patch.image_features, patch.prompts, patch.gamma, patch.record = inputs.features, inputs.prompts, gamma, record
    patch.timesteps = patched.model.model_sampling.timestep(sigma[first:first + per_chunk].float())
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers,
               "cond_or_uncond": flags, "sigmas": sigma}
    try:
        out = patched.model.apply_model(x_noisy, sigma, c_crossattn=inputs.context.to(x_noisy),
                                        transformer_options=options)
        state, state.outputs = patch.last, patch.last_outputs
    finally:
        patch.last = patch.last_outputs = None
        patch.image_features, patch.prompts = torch.zeros(0), []
    return out, state


def global_contrastive_terms(state: CallState, appearance: torch.Tensor, subjects: torch.Tensor,
                             weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_c, L_m) over the rows of every process (the features gathered with gradients)."""
    out = state.outputs
    visual_cls, text_cls, s_plus = (gather_global(t) for t in (out.visual_cls, out.text_cls, out.s_plus))
    embeds = gather_global(appearance.float().to(s_plus.device))
    ids = gather_global(subjects.to(s_plus.device, torch.float64)).long()
    alpha = appearance_factors(embeds, weights.min_similarity)
    if weights.cscl_negatives not in CSCL_NEGATIVES:
        raise ValueError(f"cscl_negatives must be one of {CSCL_NEGATIVES}, got {weights.cscl_negatives!r}")
    l_c = cscl_loss(visual_cls, text_cls, ids if weights.cscl_negatives == "other_subjects" else None)
    return l_c, macl_loss(s_plus, alpha, ids, weights.temperature)


def customcontrast_loss(patch: BatchPatch, patched, inputs: StepInputs, sigma: torch.Tensor, noise: torch.Tensor,
                        weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 9 for one micro-batch; the components (detached) for the log and for tests."""
    model = patched.model
    x_noisy = noised(model, inputs.z0, noise, sigma)
    denoised, state = customcontrast_forward(patch, patched, x_noisy, sigma, inputs)
    ldm = (implied_noise(x_noisy, denoised.float(), sigma) - noise).square().mean()
    l_c, l_m = global_contrastive_terms(state, inputs.appearance, inputs.subjects, weights)
    attention = state.recorder.aggregated(0, size=inputs.z0.shape[-2:])
    state.recorder.close()  # gradient checkpointing replays the attention in backward
    l_loc = location_loss(attention, inputs.masks.to(attention))
    contrastive = ("cscl" in weights.terms) * l_c + ("macl" in weights.terms) * l_m
    total = ldm + weights.contrastive * contrastive + weights.location * l_loc
    state.outputs = None
    parts = {"ldm": ldm, "cscl": l_c, "macl": l_m, "loc": l_loc}
    return total, {k: v.detach() for k, v in parts.items()}


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W] pixel mask → [height, width] by area averaging (the fraction of each latent cell on the subject)."""
    return F.interpolate(mask[None, None].float(), size=(height, width), mode="area")[0, 0]
