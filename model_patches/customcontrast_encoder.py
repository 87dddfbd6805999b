"""CustomContrast's MFI encoder (seed 003 §3.2): image features → per-layer S+ tokens, visual tokens, two CLS.

* **Visual Q-Former:** m+1 learnable queries; the last output is the visual CLS token (for CSCL, Eq. 4).
* **Textual Q-Former:** l+1 spatio-temporal queries = a learnable embedding per UNet cross-attention layer
  (+1 for the textual CLS) plus an MLP of a Fourier encoding of the timestep, so every layer and every step gets
  its own token. The first l outputs are S+ (one word embedding per cross-attention layer), the last the CLS.
* Each Q-Former is ``depth`` (4 in the paper) layers of Perceiver attention (Eq. 2: queries attend to
  ``[features ; queries]``) with a feed-forward, both residual.
* **TV fusion:** Eq. 2 again, ``PA(f_t, f_v)``: the visual queries attend to ``[f_t ; f_v]``, giving the refined
  visual tokens f̂_v (m of them) injected into the decoupled visual cross-attention. The output keeps the visual
  count, so the visual side is the query side.

The visual Q-Former does not depend on the timestep: ``encode_image`` runs it once per subject and sampling
caches it; ``forward_step`` runs the timestep-dependent rest (textual Q-Former, TV fusion) each step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    feature_dim: int          # width of the concatenated CLIP image features (K layers x hidden size)
    layers: int               # l: UNet cross-attention layers (16 for SD1.5)
    dim: int = 768            # Q-Former width; S+ and visual tokens come out at ``token_dim``
    token_dim: int = 768      # the text encoder's word-embedding width (= UNet context width for SD1.5)
    visual_tokens: int = 16   # m
    depth: int = 4
    heads: int = 8
    fourier_bands: int = 64   # timestep encoding: sin/cos at 64 geometric frequencies

    def to_dict(self) -> dict:
        return asdict(self)


def fourier_timestep(timestep: torch.Tensor, bands: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps (0..999) → [B, 2*bands] sin/cos features at geometric frequencies."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(bands, dtype=torch.float32, device=timestep.device)
                      / bands)
    angles = timestep.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class PerceiverAttention(nn.Module):
    """Eq. 2: softmax(Q(f_q) K([f_I; f_q])^T / sqrt(d)) V([f_I; f_q]), multi-head, with its own layer norms."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads = heads
        self.norm_features, self.norm_queries = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        f, q = self.norm_features(features), self.norm_queries(queries)
        b, lq, dim = q.shape
        k, v = self.to_kv(torch.cat([f, q], dim=1)).chunk(2, dim=-1)

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(heads(self.to_q(q)), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, lq, dim))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = PerceiverAttention(dim, heads)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, features, queries):
        queries = queries + self.attention(features, queries)
        return queries + self.ff(queries)


class QFormer(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(QFormerLayer(dim, heads) for _ in range(depth))

    def forward(self, features, queries):
        for layer in self.layers:
            queries = layer(features, queries)
        return queries


@dataclass
class MFIOutput:
    s_plus: torch.Tensor       # [B, l, token_dim]: one word embedding per cross-attention layer, forward order
    visual: torch.Tensor       # [B, m, token_dim]: tokens of the visual cross-attention
    visual_cls: torch.Tensor   # [B, dim]
    text_cls: torch.Tensor     # [B, dim]


@dataclass
class ImageState:
    """What the timestep does not change: projected image features and the visual Q-Former's output."""
    features: torch.Tensor     # [B, T, dim]
    visual: torch.Tensor       # [B, m+1, dim]


class MFIEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        c = self.config = config
        self.proj_in = nn.Linear(c.feature_dim, c.dim)
        self.visual_queries = nn.Parameter(torch.randn(c.visual_tokens + 1, c.dim) * c.dim ** -0.5)
        self.layer_queries = nn.Parameter(torch.randn(c.layers + 1, c.dim) * c.dim ** -0.5)
        self.time_mlp = nn.Sequential(nn.Linear(2 * c.fourier_bands, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.visual_qformer = QFormer(c.dim, c.heads, c.depth)
        self.textual_qformer = QFormer(c.dim, c.heads, c.depth)
        self.fusion = PerceiverAttention(c.dim, c.heads)
        self.text_out = nn.Sequential(nn.Linear(c.dim, c.token_dim), nn.LayerNorm(c.token_dim))
        self.visual_out = nn.Sequential(nn.Linear(c.dim, c.token_dim), nn.LayerNorm(c.token_dim))

    def encode_image(self, image_features: torch.Tensor) -> ImageState:
        if image_features.ndim != 3 or image_features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"the MFI encoder takes image features [B, tokens, {self.config.feature_dim}] "
                             f"(CLIP layers concatenated), got {tuple(image_features.shape)}")
        weight = self.proj_in.weight
        features = self.proj_in(image_features.to(weight.device, weight.dtype))
        queries = self.visual_queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        return ImageState(features, self.visual_qformer(features, queries))

    def spatio_temporal_queries(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """[B, l+1, dim]: each layer's learnable embedding plus the row's timestep embedding."""
        weight = self.layer_queries
        time = self.time_mlp(fourier_timestep(timestep.to(weight.device), self.config.fourier_bands).to(weight.dtype))
        time = time.expand(batch, -1) if time.shape[0] == 1 else time
        return self.layer_queries.unsqueeze(0) + time.unsqueeze(1)

    def forward_step(self, image: ImageState, timestep: torch.Tensor) -> MFIOutput:
        """The per-step part for ``timestep`` [1 | B] (the discrete UNet timestep, 0..999)."""
        batch = image.features.shape[0]
        text = self.textual_qformer(image.features, self.spatio_temporal_queries(timestep, batch))
        fused = image.visual + self.fusion(text, image.visual)
        layers, m = self.config.layers, self.config.visual_tokens
        return MFIOutput(self.text_out(text[:, :layers]), self.visual_out(fused[:, :m]),
                         image.visual[:, m], text[:, layers])

    def forward(self, image_features: torch.Tensor, timestep: torch.Tensor) -> MFIOutput:
        return self.forward_step(self.encode_image(image_features), timestep)
