"""P3S RNGR input (Eq. 3–5): the reference with its negatives removed, given a spatial bias from CLIP.

``I'' = I' + Attn(W_Q·Z(I'), W_K·c_s, W_V·c_s)`` where ``I'`` is the latent of the reference image with the
look-alike (negative) regions inpainted away, ``c_s`` the CLIP image encoder's last hidden state (all tokens) and
``Z`` a 1×1 convolution whose weight and bias start at zero (Eq. 5). The paper fixes only Z's initialisation;
``W_V`` starts at zero here too, so that the attention term is exactly 0 at initialisation and ``I'' = I'``
bit for bit (with Z = 0 alone the queries are 0, the softmax is uniform and the term would be the token mean of
``W_V c_s``, a random offset of the copy's input). Training still starts: the first step's gradient reaches
``W_V`` (the attention weights are uniform, not zero), and Z and W_Q follow once W_V is non-zero — the same
two-step start as ControlNet's zero convolutions.

The module is tiny (a few hundred thousand weights) and is trained with the injection copy; at sampling it runs
once per evaluation on the stored reference (cached while no gradient is needed).
"""
from __future__ import annotations

import math

import torch

DEFAULT_WIDTH = 64   # query/key width of the attention: the latent has 4 channels, CLIP-L 1024


class RNGREncoder(torch.nn.Module):
    def __init__(self, clip_width: int = 1024, width: int = DEFAULT_WIDTH, latent_channels: int = 4):
        super().__init__()
        self.z = torch.nn.Conv2d(latent_channels, width, 1)
        self.to_q = torch.nn.Linear(width, width, bias=False)
        self.to_k = torch.nn.Linear(clip_width, width, bias=False)
        self.to_v = torch.nn.Linear(clip_width, latent_channels, bias=False)
        self.reset_parameters()

    @property
    def clip_width(self) -> int:
        return self.to_k.in_features

    @property
    def width(self) -> int:
        return self.to_q.in_features

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Z and W_V zero (see the module doc); W_Q, W_K drawn like torch's Linear default, from ``generator``."""
        with torch.no_grad():
            for zeroed in (self.z.weight, self.z.bias, self.to_v.weight):
                zeroed.zero_()
            for linear in (self.to_q, self.to_k):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.copy_(torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=generator))

    def attention_term(self, latent: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        """``Softmax(Q K^T / sqrt(d)) V`` of Eq. 4 as a latent-shaped tensor [B, 4, h, w]."""
        b, c, h, w = latent.shape
        dtype = self.to_q.weight.dtype
        queries = self.to_q(self.z(latent.to(dtype)).flatten(2).transpose(1, 2))          # [B, hw, d]
        states = clip_states.to(latent.device, dtype)
        if states.shape[0] not in (1, b):
            raise ValueError(f"{states.shape[0]} CLIP state sets for {b} reference latents")
        keys, values = self.to_k(states), self.to_v(states)                              # [B|1, N, d], [.., 4]
        weights = torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1]), dim=-1)
        return (weights @ values).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, latent: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        """``I''`` (Eq. 4) from ``I'`` [B, 4, h, w] (model space) and ``c_s`` [B or 1, N, clip_width]."""
        if clip_states.ndim != 3 or clip_states.shape[-1] != self.clip_width:
            raise ValueError(f"the CLIP states must be [batch, tokens, {self.clip_width}] (the CLIP image "
                             f"encoder's last hidden state), got {tuple(clip_states.shape)}")
        return latent + self.attention_term(latent, clip_states).to(latent.dtype)
