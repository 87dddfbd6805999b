"""CustomContrast at sampling and training time: per-layer S+ text contexts and the decoupled visual attention.

``CustomContrastPatch`` is installed on a clone of the MODEL. On each model call (``apply_model`` wrapper) it
runs the timestep-dependent part of the MFI encoder for the conditional rows, encodes the caption once per
cross-attention layer with that layer's S+ token (``PlaceholderPrompt.encode``, one text-encoder batch), and puts
the result for this call only in ``transformer_options``. There:

* an ``attn2_patch`` gives each layer's conditional rows that layer's own context (the unconditional rows keep
  the negative prompt), and
* an ``attn2`` replacement adds Eq. 3's second term, ``γ · Attn(Q, K_v f̂_v, V_v f̂_v)``, to whatever computed
  the text term before: the stock attention, or another pack's replacement of that layer (IPAdapter-style),
  which is looked up when the call starts, so the order in which the patches were applied does not matter.

With γ = 0, outside the start/end range, or with zero-initialised K_v/V_v, the visual term is exactly zero.
The trainer builds the same state with ``state_for`` and runs the UNet with ``transformer_options_for``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention_ops import host_attention, row_chunks
from .customcontrast_encoder import ImageState, MFIEncoder, MFIOutput
from .customcontrast_location import RECORDER_KEY, layer_shape
from .customcontrast_text import PlaceholderPrompt
from .unet_layout import TransformerSlot

STATE_KEY = "subject_customization.customcontrast"
ATTACHMENT = "subject_customization.customcontrast"
COND = 0  # ComfyUI's cond_or_uncond flag of the positive prompt's rows


class VisualKV(nn.Module):
    """K_v / V_v of one cross-attention layer: token width → the layer's width, zero at initialisation."""

    def __init__(self, token_dim: int, channels: int):
        super().__init__()
        self.to_k = nn.Linear(token_dim, channels, bias=False)
        self.to_v = nn.Linear(token_dim, channels, bias=False)
        nn.init.zeros_(self.to_k.weight)
        nn.init.zeros_(self.to_v.weight)

    def forward(self, tokens: torch.Tensor):
        return self.to_k(tokens), self.to_v(tokens)


class VisualAttention(nn.Module):
    """One K_v/V_v pair per cross-attention slot, keyed ``output3_0`` (module names cannot hold dots)."""

    def __init__(self, slots: list[TransformerSlot], token_dim: int = 768):
        super().__init__()
        self.layers = nn.ModuleDict({layer_key(slot): VisualKV(token_dim, slot.channels) for slot in slots})

    def of(self, slot: TransformerSlot) -> VisualKV:
        return self.layers[layer_key(slot)]


def layer_key(slot: TransformerSlot) -> str:
    return slot.name.replace(".", "_")


@dataclass
class CallState:
    """One model call's S+ contexts and visual tokens for the conditional rows (one subject, or one per row)."""
    contexts: torch.Tensor       # [S, l, T, 768]
    visual: torch.Tensor         # [S, m, 768]
    gamma: float
    outputs: MFIOutput | None = None   # kept for the training losses

    def __deepcopy__(self, memo):  # lives in transformer_options, which ComfyUI copies
        return self


def _per_rows(tensor: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(rows, *tensor.shape[1:])
    raise ValueError(f"{tensor.shape[0]} subjects' {what} for {rows} conditional rows; give one subject or one per "
                     "image")


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    # ComfyUI batches contexts of 77·k tokens by repeating them to a common length (CONDCrossAttn.concat): a
    # repeated key set leaves attention unchanged
    return context if context.shape[1] == length else context.repeat(1, length // context.shape[1], 1)


class ContextPatch:
    """``attn2_patch``: layer ``a``'s conditional rows get the caption encoded with S+[a]."""

    def __init__(self, slots: list[TransformerSlot]):
        self.index = {slot.key: i for i, slot in enumerate(slots)}

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        state = extra_options.get(STATE_KEY)
        block = extra_options.get("block")
        if state is None or block is None:
            return n, context, value
        layer = self.index.get((block[0], block[1], extra_options.get("block_index", 0)))
        if layer is None:
            return n, context, value
        chunks = row_chunks(extra_options, n.shape[0])
        if not any(flag == COND for flag, _ in chunks):
            return n, context, value
        ours = state.contexts[:, layer]
        length = math.lcm(context.shape[1], ours.shape[1])
        parts = []
        for flag, rows in chunks:
            count = rows.stop - rows.start
            if flag == COND:
                parts.append(_repeat_to(_per_rows(ours, count, "contexts").to(context), length))
            else:
                parts.append(_repeat_to(context[rows], length))
        context = torch.cat(parts)
        return n, context, context


class DecoupledAttention:
    """``attn2`` replacement of one layer: the previous occupant's (or the stock) text attention + Eq. 3's
    visual term on the conditional rows."""

    def __init__(self, slot: TransformerSlot, kv: VisualKV, previous=None):
        self.slot, self.kv, self.previous = slot, kv, previous

    def __call__(self, q, k, v, extra_options):
        text = self.previous(q, k, v, extra_options) if self.previous is not None else host_attention(q, k, v,
                                                                                                      extra_options)
        state = extra_options.get(STATE_KEY)
        recorder = extra_options.get(RECORDER_KEY)
        if state is None or (state.gamma == 0 and recorder is None):
            return text
        parts = []
        for flag, rows in row_chunks(extra_options, q.shape[0]):
            if flag != COND:
                parts.append(text[rows])
                continue
            tokens = _per_rows(state.visual, rows.stop - rows.start, "visual tokens")
            weight = self.kv.to_k.weight
            k_v, v_v = self.kv(tokens.to(weight.device, weight.dtype))
            if recorder is not None:  # the location maps of this layer's conditional rows (training: L_loc)
                recorder.record(q[rows], k[rows], k_v.to(q), extra_options["n_heads"],
                                layer_shape(extra_options, q.shape[1]))
            if state.gamma == 0:
                parts.append(text[rows])
                continue
            visual = host_attention(q[rows], k_v.to(q), v_v.to(q), extra_options)
            parts.append(text[rows] + state.gamma * visual)
        return torch.cat(parts)


def _replacement_of(replaces: dict, slot: TransformerSlot):
    """What ComfyUI would call for this layer's attn2: the 3-tuple key first, then the 2-tuple."""
    return replaces.get(slot.key, replaces.get(slot.key[:2]))


def with_decoupled_attention(transformer_options: dict, slots, visual: VisualAttention) -> dict:
    """A copy of ``transformer_options`` whose attn2 replacement of every slot is ours wrapping the occupant."""
    replaces = dict(transformer_options.get("patches_replace", {}))
    attn2 = dict(replaces.get("attn2", {}))
    for slot in slots:
        previous = _replacement_of(attn2, slot)
        if isinstance(previous, DecoupledAttention):  # already wrapped in an enclosing call
            continue
        attn2[slot.key] = DecoupledAttention(slot, visual.of(slot), previous)
    replaces["attn2"] = attn2
    return {**transformer_options, "patches_replace": replaces}


def customcontrast_options(transformer_options: dict, slots, visual: VisualAttention, state: CallState) -> dict:
    """A copy of ``transformer_options`` running one call with ``state``: every slot's attn2 replaced by the
    decoupled attention (wrapping the occupant) and the per-layer context patch added once. Sampling (the patch's
    wrapper) and training build the UNet call through this one function."""
    options = with_decoupled_attention(transformer_options, slots, visual)
    patches = dict(options.get("patches", {}))
    attn2 = list(patches.get("attn2_patch", []))
    if not any(isinstance(p, ContextPatch) for p in attn2):
        attn2.append(ContextPatch(slots))
    patches["attn2_patch"] = attn2
    return {**options, "patches": patches, STATE_KEY: state}


@dataclass
class CustomContrastPatch:
    encoder: MFIEncoder
    visual_attention: VisualAttention
    slots: list[TransformerSlot]
    prompt: PlaceholderPrompt
    image_features: torch.Tensor        # [S, T, feature_dim] CLIP features (layers concatenated)
    gamma: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    _image: ImageState | None = None

    def __deepcopy__(self, memo):  # one patch per Apply node, shared by the clones made from it
        return self

    # -- the shared step ------------------------------------------------------------------------------------
    def image_state(self) -> ImageState:
        """The timestep-independent encoder part; cached while no gradient is wanted (sampling)."""
        if torch.is_grad_enabled():
            return self.encoder.encode_image(self.image_features)
        if self._image is None:
            self._image = self.encoder.encode_image(self.image_features)
        return self._image

    def state_for(self, timestep: torch.Tensor, gamma: float | None = None) -> CallState:
        """Encoder outputs and per-layer contexts for ``timestep`` [1 | S] (discrete, 0..999)."""
        outputs = self.encoder.forward_step(self.image_state(), timestep)
        contexts = self.prompt.encode(outputs.s_plus)
        return CallState(contexts, outputs.visual, self.gamma if gamma is None else gamma, outputs)

    def transformer_options_for(self, transformer_options: dict, state: CallState) -> dict:
        return customcontrast_options(transformer_options, self.slots, self.visual_attention, state)

    # -- sampling -------------------------------------------------------------------------------------------
    def install(self, model_patcher) -> None:
        present = model_patcher.get_attachment(ATTACHMENT)
        if present is not None:
            raise ValueError("this MODEL already has CustomContrast applied; it applies once per model (several "
                             "subjects in one image are not supported yet). Feed CustomContrast Apply the MODEL "
                             "from before the first one")
        import comfy.patcher_extension

        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, ATTACHMENT,
                                           self.apply_model_wrapper)
        model_patcher.set_attachments(ATTACHMENT, self)

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):
        flags = list(transformer_options.get("cond_or_uncond") or [COND])
        if COND not in flags or not self.active(float(t.flatten()[0])):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base_model = executor.class_obj
        timestep = base_model.model_sampling.timestep(t.flatten()[:1].float())
        self.encoder.to(x.device)
        self.visual_attention.to(x.device)
        state = self.state_for(timestep)
        try:
            options = self.transformer_options_for(transformer_options, state)
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            state.outputs = None
