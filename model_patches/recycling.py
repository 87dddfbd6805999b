"""Model recycling (AnyLogo Eq. 4–7): one UNet extracts a subject's signatures and then generates with them.

Two statuses of the same network, told apart by what the caller puts under ``STATUS_KEY`` in
``transformer_options``:

* ``Extraction`` — the subject pass. Each recycled self-attention layer banks its projected keys and values
  (the subject's signatures ``z_sub^{t,i}``) and otherwise runs unchanged.
* ``Generation`` — the content pass. In the rows that read the bank, layer ``i`` attends over
  ``[z_t^i ; z_sub^{t,i}]`` (Eq. 4): ``softmax(Q [K_z ; K_sub]^T / sqrt(d)) [V_z ; V_sub]``. Other rows (the
  unconditional prediction, Eq. 7) run the stock attention.

Sparse recycling (Eq. 5) is a per-layer, per-row keep decision carried by the ``Generation`` status; a strength
s != 1 adds log(s) to the subject keys' logits (s=1 is Eq. 4 exactly). The same classes serve the sampling
patch and the trainer, so what is trained is what is sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention_ops import appended_key_share, extended_key_mask, host_attention, row_chunks
from .unet_layout import TransformerSlot

STATUS_KEY = "subject_customization.recycling"


class StopExtraction(Exception):
    """Raised inside the subject pass once every recycled layer is banked: the rest of the UNet is not needed."""


@dataclass
class SignatureBank:
    """Projected subject keys/values per layer, [subjects, L_sub, C] each: one subject shared by every reading
    row (sampling) or one per reading row (training). A plain object: cleared after each use."""
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)

    def store(self, slot_key, k, v):
        self.keys[slot_key], self.values[slot_key] = k, v

    def __contains__(self, slot_key):
        return slot_key in self.keys

    def __len__(self):
        return len(self.keys)

    def clear(self):
        self.keys.clear()
        self.values.clear()


@dataclass
class Extraction:
    bank: SignatureBank
    slots: tuple                     # slot keys to bank, in forward order
    stop_when_complete: bool = True  # the generation pass needs nothing past the last banked layer

    def __deepcopy__(self, memo):  # lives in transformer_options, which ComfyUI may copy
        return self


@dataclass
class Generation:
    bank: SignatureBank
    reading_cond: int                # index into calc_cond_batch's conds whose rows read the bank (positive)
    key_bias: Callable | None = None  # (slot_key, rows: int, device) -> [rows] additive bias, or None for 0
    recorder: "AttentionRecorder | None" = None

    def __deepcopy__(self, memo):
        return self


@dataclass
class AttentionRecorder:
    """What a recycled layer delivered (App. E): accumulated subject attention (ASA), the share of attention mass
    on subject tokens, and the statistic latent difference (SLD), the L1 error between the token mean of the
    delivered subject values and of the layer's own (denoising) values."""
    per_layer: dict = field(default_factory=dict)     # slot name -> list of (sigma, mean share, SLD)
    maps: dict = field(default_factory=dict)          # slot name -> running sum of [rows, Lq] share maps
    map_counts: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)        # slot name -> (rows, h, w) of the layer's token grid

    def __deepcopy__(self, memo):
        return self

    def add(self, slot: TransformerSlot, sigma: float, share: torch.Tensor, grid: tuple[int, int],
            sld: float = float("nan")):
        self.per_layer.setdefault(slot.name, []).append((sigma, float(share.mean()), sld))
        share = share.detach().float().cpu()
        if slot.name in self.maps and self.maps[slot.name].shape == share.shape:
            self.maps[slot.name] += share
            self.map_counts[slot.name] += 1
        else:
            self.maps[slot.name], self.map_counts[slot.name] = share.clone(), 1
        self.shapes[slot.name] = (share.shape[0],) + tuple(grid)

    def reset(self):
        self.per_layer.clear(), self.maps.clear(), self.map_counts.clear(), self.shapes.clear()


def statistic_latent_difference(delivered: torch.Tensor, content: torch.Tensor) -> float:
    """SLD of App. E: mean over rows and channels of |token mean of the delivered subject latents - token mean of
    the denoising latents| ([rows, tokens, channels] each; the values, i.e. what attention mixes in)."""
    return float((delivered.float().mean(dim=1) - content.float().mean(dim=1)).abs().mean())


def _token_grid(extra_options, tokens: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape") or extra_options.get("original_shape")
    if shape and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original:  # derive the grid from the latent's aspect ratio
        for down in range(8):
            h, w = -(-original[-2] // 2 ** down), -(-original[-1] // 2 ** down)
            if h * w == tokens:
                return h, w
    return 1, tokens


class RecyclingAttention:
    """``patches_replace["attn1"]`` callable for one layer. Stateless: the status comes with each call."""

    def __init__(self, slot: TransformerSlot, previous: Callable | None = None):
        self.slot = slot
        self.previous = previous  # a replacement that held this slot before us: it keeps running inside ours

    def _inner(self, q, k, v, extra_options, mask=None):
        if self.previous is None:
            return host_attention(q, k, v, extra_options, mask)
        if mask is not None:
            raise RuntimeError(f"layer {self.slot.name}: a recycling strength other than 1 cannot be combined with "
                               "the other self-attention replacement on this layer")
        return self.previous(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        status = extra_options.get(STATUS_KEY)
        if isinstance(status, Extraction):
            return self._extract(status, q, k, v, extra_options)
        if isinstance(status, Generation) and self.slot.key in status.bank:
            return self._generate(status, q, k, v, extra_options)
        return self._inner(q, k, v, extra_options)

    def _extract(self, status: Extraction, q, k, v, extra_options):
        if self.slot.key in status.slots:
            was_complete = len(status.bank) == len(status.slots)
            status.bank.store(self.slot.key, k, v)
            # only the first completion stops the pass: a gradient-checkpointed block recomputed during backward
            # stores again into a complete bank and must run through
            if status.stop_when_complete and not was_complete and len(status.bank) == len(status.slots):
                raise StopExtraction()
        return self._inner(q, k, v, extra_options)

    def _generate(self, status: Generation, q, k, v, extra_options):
        chunks = row_chunks(extra_options, q.shape[0])
        if all(flag != status.reading_cond for flag, _ in chunks):
            return self._inner(q, k, v, extra_options)
        out = torch.empty_like(q)
        for flag, rows in chunks:
            sub_options = {**extra_options, "cond_or_uncond": [flag]}
            if flag != status.reading_cond:
                out[rows] = self._inner(q[rows], k[rows], v[rows], sub_options)
            else:
                out[rows] = self._read(status, q[rows], k[rows], v[rows], sub_options)
        return out

    def _subject_rows(self, banked, rows: int, reading):
        """One subject for every row (sampling), or one per row (training batches)."""
        if banked.shape[0] == 1:
            return banked.expand(int(reading.sum()), -1, -1)
        if banked.shape[0] != rows:
            raise RuntimeError(f"layer {self.slot.name}: {banked.shape[0]} banked subjects for {rows} reading rows")
        return banked[reading]

    def _read(self, status: Generation, q, k, v, extra_options):
        n = q.shape[0]
        bias = status.key_bias(self.slot.key, n, q.device) if status.key_bias is not None else None
        reading = torch.ones(n, dtype=torch.bool, device=q.device) if bias is None else ~torch.isneginf(bias)
        if not bool(reading.any()):
            return self._inner(q, k, v, extra_options)  # sparse recycling dropped this layer for every row
        out = torch.empty_like(q)
        if not bool(reading.all()):
            out[~reading] = self._inner(q[~reading], k[~reading], v[~reading], extra_options)
        q_r, k_r, v_r = q[reading], k[reading], v[reading]
        k_sub = self._subject_rows(status.bank.keys[self.slot.key].to(k), n, reading)
        v_sub = self._subject_rows(status.bank.values[self.slot.key].to(v), n, reading)
        kept_bias = None if bias is None else bias[reading]
        mask = None
        if kept_bias is not None and bool((kept_bias != 0).any()):
            mask = extended_key_mask(k_r.shape[1], k_sub.shape[1], kept_bias, q.dtype)
        out[reading] = self._inner(q_r, torch.cat([k_r, k_sub], dim=1), torch.cat([v_r, v_sub], dim=1),
                                   extra_options, mask)
        if status.recorder is not None:
            share = appended_key_share(q_r, k_r, k_sub, extra_options["n_heads"], kept_bias)
            sigma = extra_options.get("sigmas")
            sigma = float(sigma.flatten()[0]) if sigma is not None else float("nan")
            status.recorder.add(self.slot, sigma, share, _token_grid(extra_options, q_r.shape[1]),
                                statistic_latent_difference(v_sub, v_r))
        return out


def install_recycling(model_patcher, slots: list[TransformerSlot]) -> None:
    """Put a RecyclingAttention on each slot of a (cloned) ModelPatcher, chaining any previous occupant.

    A 2-tuple ``(block, id)`` replacement (PAG's form) on the same block is chained too: our 3-tuple key would
    otherwise shadow it.
    """
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for slot in slots:
        previous = replace.get(slot.key) or replace.get(slot.key[:2])
        if isinstance(previous, RecyclingAttention):
            raise ValueError(f"self-attention layer {slot.name} is already recycling a subject; apply AnyLogo "
                             "once per model")
        model_patcher.set_model_attn1_replace(RecyclingAttention(slot, previous), *slot.key)


def replacements_at_call_time(model_options, slots: list[TransformerSlot]) -> tuple[list[str], dict]:
    """Compare the attn1 replacements of one evaluation with ours.

    Returns (layers where a later node overwrote our 3-tuple entry, {slot key: replacement} for layers where
    this evaluation carries a 2-tuple ``(block, id)`` replacement we did not chain, e.g. PAG's perturbed pass).
    The latter take their layer over for that evaluation: our 3-tuple key would otherwise shadow them.
    """
    replace = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    lost, takeovers = [], {}
    for slot in slots:
        ours = replace.get(slot.key)
        if not isinstance(ours, RecyclingAttention):
            lost.append(f"{slot.name} (replaced by {getattr(ours, '__qualname__', type(ours).__name__)})")
            continue
        two = replace.get(slot.key[:2])
        if two is not None and ours.previous is not two:
            takeovers[slot.key] = two
    return lost, takeovers


def with_attn1_replacements(model_options: dict, updates: dict) -> dict:
    """A copy of model_options whose attn1 replacements have ``updates`` (the original is not touched)."""
    transformer_options = dict(model_options.get("transformer_options", {}))
    patches_replace = dict(transformer_options.get("patches_replace", {}))
    patches_replace["attn1"] = {**patches_replace.get("attn1", {}), **updates}
    transformer_options["patches_replace"] = patches_replace
    return {**model_options, "transformer_options": transformer_options}
