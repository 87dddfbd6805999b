"""CustomContrast with one or more subjects in one image: what the Apply node installs on a clone of the MODEL.

Each subject is a ``CustomContrastPatch`` (its encoder, K_v/V_v, image features, γ, start/end, location on/off
and optional first-step location mask); the group holds them in Apply order with one ``PlaceholderPrompt`` that
names every subject's placeholder word. On each model call (``apply_model`` wrapper) with at least one subject
active at this sigma:

* every active subject's encoder runs its per-step part, and the caption is encoded once per cross-attention
  layer with **each** subject's S+[a] at **its own** placeholder's positions (one text-encoder batch of l rows;
  an inactive subject keeps its word there);
* every active subject adds its own visual term ``γ_k · Attn(Q, K_v^k f̂_v^k, V_v^k f̂_v^k)`` (Eq. 3 summed over
  subjects, each with the K_v/V_v of its own weights);
* with location on, each subject's attention maps are recorded under its index and its mask (the map of the
  previous call, or its user mask at the first call) is applied to its attentions only (seed 003 §3.4).

One subject gives exactly what ``CustomContrastPatch.state_for`` + ``transformer_options_for`` give (the path
the trainer runs). Applying CustomContrast to a MODEL that has it makes a new group (the old subjects plus the
new one) on the new clone; the input MODEL keeps its own group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .customcontrast import ATTACHMENT, COND, CallState, CustomContrastPatch, SubjectCall
from .customcontrast_location import AttentionRecorder, LocationTrace
from .customcontrast_text import PlaceholderPrompt


@dataclass
class SubjectGroup:
    subjects: list[CustomContrastPatch]   # subject k = subjects[k]: its placeholder is prompt.tokens[k]
    prompt: PlaceholderPrompt             # the caption, holding every subject's placeholder
    words: list[str] = field(default_factory=list)   # the placeholder words as written (to add a subject)
    _trace: LocationTrace | None = None
    _last_sigma: float | None = None

    def __post_init__(self):
        if len(self.prompt.tokens) != len(self.subjects):
            raise ValueError(f"{len(self.subjects)} subjects but the prompt names {len(self.prompt.tokens)} "
                             "placeholders; give one placeholder word per subject")
        slots = [s.name for s in self.subjects[0].slots]
        for k, subject in enumerate(self.subjects[1:], 1):
            if [s.name for s in subject.slots] != slots:
                raise ValueError(f"subject {k + 1}'s weights are for other cross-attention layers than subject 1's")

    def __deepcopy__(self, memo):  # shared by the clones of the MODEL it is installed on
        return self

    def install(self, model_patcher) -> None:
        """Put this group on ``model_patcher`` (a clone), replacing a group it inherited from its source."""
        import comfy.patcher_extension

        kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
        model_patcher.remove_wrappers_with_key(kind, ATTACHMENT)
        model_patcher.add_wrapper_with_key(kind, ATTACHMENT, self.apply_model_wrapper)
        model_patcher.set_attachments(ATTACHMENT, self)

    # -- one model call ---------------------------------------------------------------------------------------
    def state_for(self, timestep: torch.Tensor, sigma: float | None = None) -> CallState | None:
        """Every subject active at ``sigma`` (all without one): encoder outputs, the l contexts with each
        subject's S+ at its placeholder, and one ``SubjectCall`` per subject. None when no subject is active."""
        active = [k for k, s in enumerate(self.subjects) if sigma is None or s.active(sigma)]
        if not active:
            return None
        outputs = {k: self.subjects[k].encoder.forward_step(self.subjects[k].image_state(), timestep)
                   for k in active}
        contexts = self.prompt.encode({k: o.s_plus for k, o in outputs.items()})
        calls = [SubjectCall(k, outputs[k].visual, self.subjects[k].gamma, self.prompt.key_positions(k),
                             self.subjects[k].visual_attention, located=self.subjects[k].location) for k in active]
        first = calls[0]
        return CallState(contexts, first.visual, first.gamma, outputs[first.index], placeholder=first.placeholder,
                         prompt_length=self.prompt.length, subjects=calls)

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):
        flags = list(transformer_options.get("cond_or_uncond") or [COND])
        sigma = float(t.flatten()[0])
        if COND not in flags or not any(s.active(sigma) for s in self.subjects):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        timestep = executor.class_obj.model_sampling.timestep(t.flatten()[:1].float())
        for subject in self.subjects:
            subject.encoder.to(x.device)
            subject.visual_attention.to(x.device)
        state = self.state_for(timestep, sigma)
        located = any(call.located for call in state.subjects)
        trace = self._located_call(state, sigma, x.shape[0] // len(flags)) if located else None
        try:
            options = self.subjects[0].transformer_options_for(transformer_options, state)
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            if trace is not None:
                trace.finish_call(state.recorder, state.masks)
            return out
        finally:
            state.outputs = None

    # -- location across calls ----------------------------------------------------------------------------------
    def trace(self) -> LocationTrace:
        if self._trace is None:
            masks = {k: s.location_mask.float() for k, s in enumerate(self.subjects)
                     if s.location and s.location_mask is not None}
            self._trace = LocationTrace(user_masks=masks)
        return self._trace

    def _located_call(self, state: CallState, sigma: float, rows: int) -> LocationTrace:
        """Give this call the masks made at the previous (noisier) call and a recorder for the next one. A call
        whose sigma is not below the previous call's starts a new sampling run: no mask carried over."""
        trace = self.trace()
        if self._last_sigma is None or sigma >= self._last_sigma:
            trace.reset()
        self._last_sigma = sigma
        state.masks = trace.masks_for_call(rows)
        state.recorder = AttentionRecorder(keep_grad=False)
        return trace

    def with_subject(self, subject: CustomContrastPatch, word: str, prompt: PlaceholderPrompt) -> "SubjectGroup":
        """A new group: these subjects and ``subject`` (placeholder ``word``) after them, with ``prompt``, which
        must name every subject's placeholder (``PlaceholderPrompt.of_words(clip, text, group.words + [word])``)."""
        return SubjectGroup([*self.subjects, subject], prompt, [*self.words, word])
