"""CustomContrast's subject location (seed 003 §3.4): the attention maps of a subject, recorded and turned into masks.

**What is recorded.** For every cross-attention layer and every subject, two maps over the layer's latent pixels
(conditional rows only, values in 0..1, averaged over heads):

* the **placeholder map** ``A_t^p``: the text attention's probability of the placeholder token(s) — the softmax
  over all text keys, the columns of every placeholder occurrence summed (a prompt with the word twice, or a
  context that ComfyUI repeated to a common length, still gives one map);
* the **visual map** ``A_v``: the share of the pixel's attention that the subject's m visual tokens would take in
  one softmax over ``[text keys ; visual keys]``. Averaging the decoupled visual softmax itself over its tokens
  would give 1/m at every pixel (each query's visual probabilities sum to 1), a map that locates nothing; the
  share is the same log-sum-exps, compared with the text keys'.

**Aggregation (the paper's Ā_g).** ``AttentionRecorder.aggregated(subject)``: every layer's visual and placeholder
maps resized bilinearly to one size (by default the largest layer's) and averaged, the visual and placeholder
maps with equal weight. It is what ``location_loss`` (L_loc, Eq. 8) takes in training and what the location mask
is made from at sampling.

**With and without gradients.** ``AttentionRecorder(keep_grad=True)`` keeps the maps in the autograd graph (the
trainer's L_loc reaches the encoder and K_v/V_v through them); ``keep_grad=False`` (sampling) stores them detached,
so no graph is held between layers.

**Timestep-specific location.** ``LocationTrace`` carries the masks across model calls of one sampling run: the
aggregated map of the call at step t+1 (the previous, noisier call) becomes, through ``location_mask``, the mask of
step t, applied to that subject's visual attention and placeholder attention (``mask_visual``,
``mask_placeholder``). The first call of a run has no step t+1: it runs unmasked, or with the user's location
mask when one is given (the paper has none; it only says the mask of t+1 is injected at t). The maps are recorded
before masking — the layer's own estimate of where the subject is — so a mask does not shrink from step to step
by feeding on itself.

The trainer uses the recorder like this (names from ``model_patches.customcontrast``)::

    state = patch.state_for(timestep)
    state.recorder = AttentionRecorder(keep_grad=True)
    unet(x, t, transformer_options=patch.transformer_options_for(options, state))
    loss = location_loss(state.recorder.aggregated(0, size=mask.shape[-2:]), mask)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention_ops import key_share


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, inner = t.shape
    return t.reshape(b, length, heads, inner // heads).transpose(1, 2)


def _per_row(indices) -> bool:
    return bool(indices) and isinstance(indices[0], (list, tuple))


def _row_index(indices, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row key indices (a list of ``rows`` lists, lengths may differ) → (index [rows, P] padded with 0,
    valid [rows, P] 0/1)."""
    if len(indices) != rows:
        raise ValueError(f"placeholder positions for {len(indices)} rows, the layer has {rows} conditional rows")
    width = max(len(r) for r in indices)
    index = torch.zeros(rows, width, dtype=torch.long, device=device)
    valid = torch.zeros(rows, width, device=device)
    for r, row in enumerate(indices):
        index[r, :len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
        valid[r, :len(row)] = 1.0
    return index, valid


def key_positions(key_length: int, prompt_length: int, positions) -> list:
    """Indices of the placeholder's keys in a context of ``key_length`` tokens made by repeating a prompt of
    ``prompt_length`` tokens (ComfyUI repeats contexts to a common length when it batches prompts). ``positions``
    may also hold one list per conditional row (a training batch of different captions): then one list per row."""
    if _per_row(positions):
        return [key_positions(key_length, prompt_length, p) for p in positions]
    if key_length % prompt_length:
        raise ValueError(f"a context of {key_length} tokens is not a repeat of the {prompt_length}-token prompt")
    return [r * prompt_length + p for r in range(key_length // prompt_length) for p in positions]


def placeholder_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, indices) -> torch.Tensor:
    """[B, heads, Lq, P]: softmax(QK^T/sqrt(d)) over all keys, the columns of the placeholder keys ``indices``
    (per-row indices: each row's own columns, a shorter row's padding columns 0)."""
    qh, kh = _split_heads(q.float(), heads), _split_heads(k.float(), heads)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    probabilities = torch.softmax(logits, dim=-1)
    if not _per_row(indices):
        return probabilities[..., list(indices)]
    index, valid = _row_index(indices, q.shape[0], q.device)
    b, h, lq, _ = probabilities.shape
    picked = probabilities.gather(-1, index[:, None, None, :].expand(b, h, lq, index.shape[1]))
    return picked * valid[:, None, None, :]


def placeholder_map(probabilities: torch.Tensor) -> torch.Tensor:
    """[B, heads, Lq, P] → [B, Lq]: summed over the placeholder keys, averaged over heads."""
    return probabilities.sum(dim=-1).mean(dim=1)


def visual_map(q: torch.Tensor, k_text: torch.Tensor, k_visual: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Lq]: the visual keys' share of one softmax over [text keys ; visual keys], averaged over heads."""
    return key_share(q, k_text, k_visual, heads)


def layer_size(tokens: int, original_shape) -> tuple[int, int]:
    """(h, w) of a layer with ``tokens`` pixels in a UNet whose input latent is ``original_shape`` [B, C, H, W]:
    each downsampling halves a side, rounding up as the UNet's stride-2 convolutions do."""
    height, width = int(original_shape[-2]), int(original_shape[-1])
    h, w = height, width
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"{tokens} query tokens are no downsampling of a {height}x{width} latent")
    return h, w


def resize_map(maps: torch.Tensor, size) -> torch.Tensor:
    """[B, h, w] → [B, *size], bilinear (identity at the same size)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


@dataclass
class LayerMaps:
    """One layer's maps of one subject, flat over the layer's pixels (conditional rows)."""
    size: tuple[int, int]
    visual: torch.Tensor | None = None        # [B, h*w]
    placeholder: torch.Tensor | None = None   # [B, h*w]

    def images(self) -> list[torch.Tensor]:
        return [m.reshape(m.shape[0], *self.size) for m in (self.visual, self.placeholder) if m is not None]


@dataclass
class AttentionRecorder:
    """Per cross-attention layer and per subject, the visual and placeholder attention maps of one model call.

    ``record`` is called by the decoupled attention of each layer; ``aggregated`` gives Ā_g of a subject."""
    keep_grad: bool = False
    maps: dict = field(default_factory=dict)   # (layer, subject) → LayerMaps
    closed: bool = False                       # after ``close()``: records are ignored

    def __deepcopy__(self, memo):  # lives in transformer_options, which ComfyUI copies
        return self

    def close(self) -> None:
        """Ignore later records: a block checkpointed in training runs its attention again in backward (the
        same maps, which must be computed again for the recomputation, but not stored twice)."""
        self.closed = True

    def record(self, layer, subject: int, size, *, visual: torch.Tensor | None = None,
               placeholder: torch.Tensor | None = None) -> None:
        """Store layer ``layer``'s maps of ``subject``: ``visual`` / ``placeholder`` [B, h*w] for a layer of
        ``size`` (h, w). Recording a layer twice in one call (a UNet run twice on the state) is refused."""
        if self.closed:
            return
        if (layer, subject) in self.maps:
            raise RuntimeError(f"layer {layer!r} recorded twice for subject {subject} in one call; use a new "
                               "AttentionRecorder per UNet call")
        h, w = size
        for name, m in (("visual", visual), ("placeholder", placeholder)):
            if m is not None and (m.ndim != 2 or m.shape[1] != h * w):
                raise ValueError(f"{name} map of layer {layer!r}: expected [rows, {h * w}], got {tuple(m.shape)}")
        if not self.keep_grad:
            visual = None if visual is None else visual.detach()
            placeholder = None if placeholder is None else placeholder.detach()
        self.maps[(layer, subject)] = LayerMaps((int(h), int(w)), visual, placeholder)

    def subjects(self) -> list[int]:
        return sorted({s for _, s in self.maps})

    def layers(self, subject: int) -> list:
        return [layer for layer, s in self.maps if s == subject]

    def aggregated(self, subject: int, size=None) -> torch.Tensor:
        """Ā_g [B, h, w] of ``subject``: every recorded visual and placeholder map at ``size`` (default: the
        largest layer's), averaged with equal weight."""
        entries = [m for (_, s), m in self.maps.items() if s == subject]
        if not entries:
            raise KeyError(f"no attention map recorded for subject {subject}")
        if size is None:
            size = max((m.size for m in entries), key=lambda hw: hw[0] * hw[1])
        images = [resize_map(image.float(), size) for m in entries for image in m.images()]
        return torch.stack(images).mean(dim=0)


def location_mask(aggregated: torch.Tensor) -> torch.Tensor:
    """The mask made from Ā_g [B, h, w]: scaled per row to 0..1 (min → 0, max → 1). A row without contrast
    (max = min) locates nothing and gives ones: no masking rather than a division by zero."""
    flat = aggregated.detach().float().flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny),
                         torch.ones_like(flat))
    return scaled.reshape(aggregated.shape)


def layer_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A subject's mask [B, h0, w0] at a layer of ``size`` (h, w), flat: [B, h*w]."""
    return resize_map(mask, size).flatten(1)


def mask_visual(visual_out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The visual attention with its probabilities multiplied per pixel by ``keep`` [B, Lq]: the mask is a per-
    query factor, so it multiplies the attention's output row."""
    return visual_out * keep.to(visual_out).unsqueeze(-1)


def mask_placeholder(text_out: torch.Tensor, probabilities: torch.Tensor, v: torch.Tensor, indices,
                     keep: torch.Tensor, heads: int) -> torch.Tensor:
    """The text attention with the placeholder columns of its probabilities multiplied per pixel by ``keep``
    [B, Lq] (the other tokens' weights unchanged, no renormalisation):
    ``out - Σ_p (1 - keep) · A[:, p] v_p`` per head, ``probabilities`` [B, heads, Lq, P] from
    ``placeholder_probabilities``."""
    vh = _split_heads(v.float(), heads)
    if _per_row(indices):  # padding columns carry probability 0, so their value rows remove nothing
        index, _ = _row_index(indices, v.shape[0], v.device)
        v_p = vh.gather(2, index[:, None, :, None].expand(vh.shape[0], heads, index.shape[1], vh.shape[-1]))
    else:
        v_p = vh[:, :, list(indices)]                                        # [B, heads, P, d]
    removed = (probabilities * (1 - keep.float())[:, None, :, None]) @ v_p   # [B, heads, Lq, d]
    b, _, lq, d = removed.shape
    return text_out - removed.transpose(1, 2).reshape(b, lq, heads * d).to(text_out)


@dataclass
class LocationTrace:
    """The masks one sampling run carries from model call to model call, per subject.

    ``masks_for_call()`` gives the masks of this call (the previous call's, or the user's at the first call);
    ``finish_call(recorder)`` turns this call's aggregated maps into the next call's masks. ``reset()`` starts a
    run (called when sampling starts)."""
    user_masks: dict = field(default_factory=dict)   # subject → [1|B, H, W] mask for the first call
    _next: dict = field(default_factory=dict)
    history: list | None = None                      # (masks used, maps made) per call, when a list is given

    def __deepcopy__(self, memo):
        return self

    def reset(self) -> None:
        self._next = {}

    def masks_for_call(self, rows: int) -> dict:
        masks = dict(self._next) if self._next else {s: m for s, m in self.user_masks.items()}
        out = {}
        for subject, mask in masks.items():
            if mask.shape[0] not in (1, rows):
                continue  # the batch changed (another run with this model): no stale mask
            out[subject] = mask.expand(rows, *mask.shape[1:]) if mask.shape[0] == 1 else mask
        return out

    def finish_call(self, recorder: AttentionRecorder, used: dict) -> None:
        made = {s: recorder.aggregated(s) for s in recorder.subjects()}
        self._next = {s: location_mask(m) for s, m in made.items()}
        if self.history is not None:
            self.history.append((used, made))
