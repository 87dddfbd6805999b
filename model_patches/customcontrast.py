"""CustomContrast at sampling and training time: per-layer S+ text contexts and the decoupled visual attention.

``CustomContrastPatch`` is one subject; ``SubjectGroup`` (``customcontrast_subjects.py``) installs one or more
on a clone of the MODEL. On each model call (``apply_model`` wrapper) it runs the timestep-dependent part of the MFI encoder for the conditional rows, encodes the caption once per
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
from dataclasses import dataclass, field

import torch
from torch import nn

from . import customcontrast_location as location
from .attention_ops import host_attention, row_chunks
from .customcontrast_location import AttentionRecorder, layer_size
from .customcontrast_encoder import ImageState, MFIEncoder, MFIOutput
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
class SubjectCall:
    """One subject's part of a model call: its visual tokens, γ, where its placeholder is, its K_v/V_v."""
    index: int                                  # the subject's place in the model's subjects (recorder key)
    visual: torch.Tensor                        # [S, m, 768]
    gamma: float
    placeholder: list | None = None             # its placeholder's indices in one prompt encoding
    visual_attention: VisualAttention | None = None   # None: the K_v/V_v the attention layer was built with
    located: bool = True                        # its attention is recorded / masked when the call asks for it


@dataclass
class CallState:
    """One model call's S+ contexts and visual tokens for the conditional rows (one subject, or one per row).

    ``subjects`` lists every subject of the call (several for a multi-subject image); left empty, the call has
    one subject made of ``visual`` / ``gamma`` / ``placeholder``. ``recorder`` (an ``AttentionRecorder``)
    collects each layer's visual and placeholder attention maps per subject; ``masks`` {subject: [rows, h, w]}
    are the location masks applied to those attentions (seed 003 §3.4)."""
    contexts: torch.Tensor       # [S, l, T, 768]
    visual: torch.Tensor         # [S, m, 768]
    gamma: float
    outputs: MFIOutput | None = None   # kept for the training losses
    placeholder: list | None = None    # the placeholder's indices in one prompt encoding (recording, masks)
    prompt_length: int = 77            # tokens of one prompt encoding (contexts may repeat it)
    subjects: list = field(default_factory=list)
    recorder: AttentionRecorder | None = None
    masks: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):  # lives in transformer_options, which ComfyUI copies
        return self

    def calls(self) -> list[SubjectCall]:
        return self.subjects or [SubjectCall(0, self.visual, self.gamma, self.placeholder)]


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
    visual term of every subject on the conditional rows; with a recorder, each subject's visual and
    placeholder attention maps; with location masks, those two attentions masked per pixel (§3.4)."""

    def __init__(self, slot: TransformerSlot, kv: VisualKV, previous=None):
        self.slot, self.kv, self.previous = slot, kv, previous

    def __call__(self, q, k, v, extra_options):
        text = self.previous(q, k, v, extra_options) if self.previous is not None else host_attention(q, k, v,
                                                                                                      extra_options)
        state = extra_options.get(STATE_KEY)
        if state is None:
            return text
        subjects = state.calls()
        recorder, masks = state.recorder, state.masks
        if recorder is None and not masks and all(s.gamma == 0 for s in subjects):
            return text
        heads = extra_options["n_heads"]
        size = layer_size(q.shape[1], extra_options["original_shape"]) if recorder is not None or masks else None
        parts = []
        for flag, rows in row_chunks(extra_options, q.shape[0]):
            if flag != COND:
                parts.append(text[rows])
                continue
            count = rows.stop - rows.start
            out = text[rows]
            for subject in subjects:
                kv = self.kv if subject.visual_attention is None else subject.visual_attention.of(self.slot)
                weight = kv.to_k.weight
                tokens = _per_rows(subject.visual, count, "visual tokens")
                k_v, v_v = kv(tokens.to(weight.device, weight.dtype))
                k_v, v_v = k_v.to(q), v_v.to(q)
                located = subject.located and subject.placeholder is not None
                keep = masks.get(subject.index) if located else None
                keep = None if keep is None else location.layer_mask(_per_rows(keep, count, "location masks"), size)
                if located and (recorder is not None or keep is not None):
                    indices = location.key_positions(k.shape[1], state.prompt_length, subject.placeholder)
                    probabilities = location.placeholder_probabilities(q[rows], k[rows], heads, indices)
                    if recorder is not None:
                        recorder.record(self.slot.name, subject.index, size,
                                        visual=location.visual_map(q[rows], k[rows], k_v, heads),
                                        placeholder=location.placeholder_map(probabilities))
                    if keep is not None:
                        out = location.mask_placeholder(out, probabilities, v[rows], indices, keep, heads)
                if subject.gamma != 0:
                    visual = host_attention(q[rows], k_v, v_v, extra_options)
                    if keep is not None:
                        visual = location.mask_visual(visual, keep)
                    out = out + subject.gamma * visual
            parts.append(out)
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
    location: bool = False              # timestep-specific subject location (§3.4)
    location_mask: torch.Tensor | None = None   # [1|B, H, W] the first step's mask (none: the first step runs free)
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
        return CallState(contexts, outputs.visual, self.gamma if gamma is None else gamma, outputs,
                         placeholder=self.prompt.key_positions(0), prompt_length=self.prompt.length)

    def transformer_options_for(self, transformer_options: dict, state: CallState) -> dict:
        options = with_decoupled_attention(transformer_options, self.slots, self.visual_attention)
        patches = dict(options.get("patches", {}))
        attn2 = list(patches.get("attn2_patch", []))
        if not any(isinstance(p, ContextPatch) for p in attn2):
            attn2.append(ContextPatch(self.slots))
        patches["attn2_patch"] = attn2
        return {**options, "patches": patches, STATE_KEY: state}

    # -- sampling -------------------------------------------------------------------------------------------
    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def install(self, model_patcher) -> None:
        """Install this subject alone on ``model_patcher`` (several subjects: ``SubjectGroup``)."""
        from .customcontrast_subjects import SubjectGroup

        SubjectGroup([self], self.prompt).install(model_patcher)
