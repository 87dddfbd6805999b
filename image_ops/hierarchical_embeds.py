"""SUBJECT_EMBEDS: hidden states of several layers of a vision encoder, the type method nodes consume.

One value carries everything a consumer needs to refuse the wrong input with a clear message: which kind of
model produced it (DINOv2 or CLIP vision), which layers, at which input size, and how the image was prepared.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .vision_features import CLIP, DINOV2, VisionModelError

COMFY_TYPE = "SUBJECT_EMBEDS"
_KIND_NAMES = {DINOV2: "DINOv2", CLIP: "CLIP vision"}


@dataclass(frozen=True)
class HierarchicalEmbeds:
    kind: str                                # vision_features.DINOV2 or vision_features.CLIP
    layers: tuple[int, ...]                  # 1-based block outputs, shallow to deep
    groups: tuple[torch.Tensor, ...]         # one [B, 1+patches, D] per layer; token 0 is the class token
    input_size: tuple[int, int]              # (height, width) the encoder ran at
    preprocessing: dict = field(default_factory=dict)  # how the subject image was prepared (documented keys)
    background: torch.Tensor | None = None   # [B, len(layers), D]: the background image's class token per layer

    def __post_init__(self):
        if len(self.groups) != len(self.layers):
            raise ValueError(f"{len(self.groups)} token groups for {len(self.layers)} layers")
        if self.background is not None and self.background.shape[1] != len(self.layers):
            raise ValueError(f"background carries {self.background.shape[1]} tokens for {len(self.layers)} layers")
        if self.background is not None and self.background.shape[0] != self.groups[0].shape[0]:
            raise ValueError(f"{self.background.shape[0]} background rows for {self.groups[0].shape[0]} subjects")

    @property
    def batch_size(self) -> int:
        return self.groups[0].shape[0]

    @property
    def width(self) -> int:
        return self.groups[0].shape[-1]

    def require(self, kind: str, purpose: str, *, groups: int | None = None) -> "HierarchicalEmbeds":
        """Self, or a clear error when a consumer gets embeds of the wrong model kind or group count."""
        if self.kind != kind:
            raise VisionModelError(f"{purpose} needs {_KIND_NAMES[kind]} embeds, but these come from a "
                                   f"{_KIND_NAMES.get(self.kind, self.kind)} model (layers {list(self.layers)})")
        if groups is not None and len(self.groups) != groups:
            raise VisionModelError(f"{purpose} needs {groups} layer groups, these embeds have "
                                   f"{len(self.groups)} (layers {list(self.layers)})")
        return self

    def concatenated(self) -> torch.Tensor:
        """All layers concatenated along the channel axis: [B, 1+patches, D*len(layers)] (CustomContrast)."""
        return torch.cat(self.groups, dim=-1)
