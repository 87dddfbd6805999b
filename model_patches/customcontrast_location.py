"""CustomContrast's subject-location maps (seed 003 §3.4): what the placeholder token and the visual tokens attend.

``AttentionRecorder`` is put in ``transformer_options`` under ``RECORDER_KEY``; the decoupled attention of every
cross-attention layer (``model_patches.customcontrast.DecoupledAttention``) hands it the layer's conditional-row
queries, text keys and visual keys, and it keeps, per layer and row, a map over the layer's pixels:

* **text map** A_t^p: the softmax attention of each query over the text keys, summed over the placeholder's
  positions (p), averaged over heads — the share of the text attention that goes to the subject word;
* **visual map** A_v: the share of attention the visual keys would take from the text keys in one softmax over
  both, ``sigmoid(lse(Q K_v) - lse(Q K_t))``, averaged over heads. (Eq. 3 normalises the visual attention on its
  own, so its maps summed or averaged over the visual tokens are 1 or 1/m everywhere and locate nothing; the
  share against the text keys is where the subject's visual keys match a query better than the caption does.)

``aggregate(height, width)`` gives Ā: both maps of every layer resized (bilinear) to one grid and averaged, in
0..1, differentiable — the input of L_loc in training (Eq. 8). Records arrive in forward order; a replay of a
checkpointed block in backward (gradient checkpointing) comes after ``aggregate`` closed the recorder and is
ignored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECORDER_KEY = "subject_customization.customcontrast.recorder"


class AttentionRecorder:
    def __init__(self, placeholder_positions: list[list[int]], context_lengths: list[int]):
        """``placeholder_positions[r]``: token indices of the placeholder in conditional row r's own context
        (``context_lengths[r]`` tokens; a context repeated to a common length counts every copy)."""
        self.positions = [list(p) for p in placeholder_positions]
        self.lengths = list(context_lengths)
        self.text_maps: list[torch.Tensor] = []     # per layer [rows, h, w]
        self.visual_maps: list[torch.Tensor] = []
        self.closed = False

    def __deepcopy__(self, memo):  # lives in transformer_options, which ComfyUI copies
        return self

    def _placeholder_mask(self, keys: int, device) -> torch.Tensor:
        mask = torch.zeros(len(self.positions), keys, device=device)
        for r, (positions, length) in enumerate(zip(self.positions, self.lengths)):
            for start in range(0, keys, length):
                for p in positions:
                    if start + p < keys:
                        mask[r, start + p] = 1.0
        return mask

    def record(self, q: torch.Tensor, k_text: torch.Tensor, k_visual: torch.Tensor, heads: int,
               shape: tuple[int, int]) -> None:
        """One layer's conditional rows: q [R, N, C], k_text [R, T, C], k_visual [R, m, C]; ``shape`` = (h, w)
        of the layer's N = h*w queries."""
        if self.closed:
            return
        rows, n, inner = q.shape
        if rows != len(self.positions):
            raise ValueError(f"the location recorder holds placeholder positions for {len(self.positions)} rows, "
                             f"the layer has {rows} conditional rows")
        d = inner // heads

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2).float()

        qh = split(q)
        text_logits = qh @ split(k_text).transpose(-1, -2) / math.sqrt(d)       # [R, heads, N, T]
        visual_logits = qh @ split(k_visual).transpose(-1, -2) / math.sqrt(d)   # [R, heads, N, m]
        mask = self._placeholder_mask(k_text.shape[1], q.device)
        text_share = (text_logits.softmax(dim=-1) * mask[:, None, None, :]).sum(-1).mean(1)
        visual_share = torch.sigmoid(torch.logsumexp(visual_logits, -1) - torch.logsumexp(text_logits, -1)).mean(1)
        h, w = shape
        self.text_maps.append(text_share.reshape(rows, h, w))
        self.visual_maps.append(visual_share.reshape(rows, h, w))

    def aggregate(self, height: int, width: int) -> torch.Tensor:
        """Ā [rows, height, width]: the mean over layers and over the two maps; closes the recorder."""
        self.closed = True
        if not self.text_maps:
            raise RuntimeError("no cross-attention layer recorded a location map (is CustomContrast's decoupled "
                               "attention installed and the recorder in transformer_options?)")
        maps = [F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
                for m in self.text_maps + self.visual_maps]
        return torch.stack(maps).mean(0)


def layer_shape(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of a layer's ``tokens`` queries from the SpatialTransformer's activations shape."""
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is None:
        raise RuntimeError("cannot tell the layer's spatial shape: no activations_shape/original_shape in "
                           "transformer_options")
    factor = math.sqrt(original[-2] * original[-1] / tokens)
    return round(original[-2] / factor), round(original[-1] / factor)
