"""AnyLogo's image conditioning (App. A): DINOv2 layer groups replace the text in every cross-attention.

Group ``g`` (shallow to deep) conditions the UNet level ``g`` (finest first) in the encoder and, mirrored, the
decoder; the middle block takes the deepest group. Each group is the subject's tokens at one DINOv2 layer plus
one global token of the scene at the same layer, projected 1024→768 by a trained linear map. The
unconditional rows (classifier-free guidance, Eq. 7) get the projection of all-zero features, which is what
condition dropout feeds the model in training.
"""
from __future__ import annotations

import torch

from .attention_ops import row_chunks
from .unet_layout import MIDDLE, TransformerSlot

POSITIVE_COND_KEY = "subject_customization.positive_cond"  # cond index of the positive prompt in this call


class ImageProjection(torch.nn.Module):
    """The trainable map from vision-encoder width to the UNet's cross-attention width."""

    def __init__(self, in_features: int = 1024, out_features: int = 768):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def group_of_slots(slots: list[TransformerSlot], groups: int) -> dict[tuple, int]:
    """Slot key → group index: level ``l`` takes group ``min(l, groups-1)``, the middle block the deepest."""
    return {slot.key: groups - 1 if slot.block == MIDDLE else min(slot.level, groups - 1) for slot in slots}


def group_tokens(groups, background=None) -> list[torch.Tensor]:
    """Per group ``[B, T(+1), D]``: the subject's tokens, followed by the scene's global token when given."""
    if background is None:
        return list(groups)
    return [torch.cat([g, background[:, i:i + 1].to(g).expand(g.shape[0], -1, -1)], dim=1)
            for i, g in enumerate(groups)]


class ImageContextPatch:
    """``attn2_patch`` callable: swaps each layer's cross-attention context for its projected token group.

    Projections are recomputed while gradients are on (training) and cached per device/dtype otherwise.
    """

    def __init__(self, projection: ImageProjection, tokens: list[torch.Tensor], group_of: dict[tuple, int]):
        self.projection = projection
        self.tokens = tokens          # per group [B_s, T, D] features (subject + scene global token)
        self.group_of = group_of
        self._cache: dict = {}

    def __deepcopy__(self, memo):  # held in model_options, which ModelPatcher.clone deep-copies
        return self

    def projected(self, group: int, positive: bool, device, dtype) -> torch.Tensor:
        key = (group, positive, device, dtype)
        if not torch.is_grad_enabled() and key in self._cache:
            return self._cache[key]
        weight = self.projection.proj.weight
        features = self.tokens[group].to(weight.device, weight.dtype)
        if not positive:
            features = torch.zeros_like(features[:1])
        out = self.projection(features).to(device, dtype)
        if not torch.is_grad_enabled():
            self._cache[key] = out
        return out

    def __call__(self, n, context, value, extra_options):
        block, block_index = extra_options.get("block"), extra_options.get("block_index", 0)
        group = self.group_of.get((block[0], block[1], block_index)) if block is not None else None
        if group is None:
            return n, context, value
        positive = extra_options.get(POSITIVE_COND_KEY, 0)
        parts = []
        for flag, rows in row_chunks(extra_options, n.shape[0]):
            tokens = self.projected(group, flag == positive, n.device, n.dtype)
            rows_n = rows.stop - rows.start
            if tokens.shape[0] not in (1, rows_n):
                raise ValueError(f"{tokens.shape[0]} subject embeddings for {rows_n} images in the batch; give one "
                                 "subject or one per image")
            parts.append(tokens.expand(rows_n, -1, -1))
        context = torch.cat(parts, dim=0)
        return n, context, context
