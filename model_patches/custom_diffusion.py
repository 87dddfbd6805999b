"""The Custom Diffusion base of EqDiff: the K/V projections of every cross-attention layer train, with the
gradient blocked at the start (BOS) token, and the placeholder's cross-attention map for EqDiff's loss.

``CrossAttentionKV`` is an ``attn2`` replacement used in training only: its forward equals the stock layer
(the detach changes gradients, not values), and with a ``TokenMapRecorder`` it also computes the softmax
probability of one token position per query, which the cross-attention loss compares with the subject mask.
The trained weights leave as ``diffusion_model.<module>.diff`` weight differences, the form the stock
LoraLoaderModelOnly applies (``weight += strength · diff``); SD1.5's to_k/to_v have no bias, so no ``.diff_b``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .attention_ops import host_attention
from .unet_layout import TransformerSlot, transformer_slots

RECORDER_KEY = "subject_customization.custom_diffusion"


def kv_parameter_names(model) -> list[str]:
    """BaseModel parameter names of every attn2 to_k / to_v weight (32 for SD1.5's 16 layers)."""
    return sorted(n for n, _ in model.named_parameters()
                  if n.startswith("diffusion_model.") and ".attn2.to_" in n
                  and (n.endswith("to_k.weight") or n.endswith("to_v.weight")))


def diff_key(param_name: str) -> str:
    if not param_name.endswith(".weight"):
        raise ValueError(f"{param_name} is not a weight; the K/V export holds weight differences only")
    return param_name[:-len(".weight")] + ".diff"


@dataclass
class TokenMapRecorder:
    """Per-row placeholder positions and, per layer, [rows, Lq] probability of that key (mean over heads)."""
    positions: list                    # one token index per row (None: the row has no placeholder)
    grids: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self


class CrossAttentionKV:
    def __init__(self, slot: TransformerSlot, previous=None):
        self.slot, self.previous = slot, previous

    def __call__(self, q, k, v, extra_options):
        # values unchanged, gradient stopped at position 0 (the official Custom Diffusion detach)
        k = torch.cat([k[:, :1].detach(), k[:, 1:]], dim=1)
        v = torch.cat([v[:, :1].detach(), v[:, 1:]], dim=1)
        out = self.previous(q, k, v, extra_options) if self.previous else host_attention(q, k, v, extra_options)
        recorder = extra_options.get(RECORDER_KEY)
        if isinstance(recorder, TokenMapRecorder):
            self._record(recorder, q, k, extra_options)
        return out

    def _record(self, recorder, q, k, extra_options):
        heads = extra_options["n_heads"]
        b, lq, inner = q.shape
        d = inner // heads
        rows = [i for i, p in enumerate(recorder.positions) if p is not None]
        if not rows or len(recorder.positions) != b:
            return
        qh = q[rows].reshape(len(rows), lq, heads, d).transpose(1, 2).float()
        kh = k[rows].reshape(len(rows), -1, heads, d).transpose(1, 2).float()
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [r, heads, Lq, Lk]
        index = torch.tensor([recorder.positions[i] for i in rows], device=q.device)
        picked = probs[torch.arange(len(rows), device=q.device), :, :, index]  # [r, heads, Lq]
        recorder.maps[self.slot.name] = (rows, picked.mean(dim=1))
        from .eqdiff_rra import token_grid

        recorder.grids[self.slot.name] = token_grid(extra_options, lq)


def cross_attention_replacements(model) -> dict:
    """{slot key: CrossAttentionKV} for every transformer layer, to put under patches_replace["attn2"]."""
    current = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return {slot.key: CrossAttentionKV(slot, current.get(slot.key)) for slot in transformer_slots(model)}
