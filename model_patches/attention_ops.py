"""Attention helpers shared by the patches: the host's own attention kernel, row chunks, key bias, shares.

Patches call ComfyUI's ``optimized_attention`` (looked up at call time, so a user's choice of kernel applies)
rather than their own softmax, so a patched layer that does nothing extra computes exactly what the stock
layer computes.
"""
from __future__ import annotations

import math

import torch


def host_attention(q, k, v, extra_options, mask=None):
    """ComfyUI's attention on projected q/k/v ([B, L, heads*dim]) with the layer's heads and precision."""
    import comfy.ldm.modules.attention as attention

    heads = extra_options["n_heads"]
    precision = extra_options.get("attn_precision")
    if mask is None:
        return attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                             transformer_options=extra_options)
    return attention.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                                transformer_options=extra_options)


def row_chunks(extra_options, batch: int) -> list[tuple[int, slice]]:
    """(cond index, rows) for each chunk of the batch, in batch order.

    ComfyUI batches one chunk per conditioning (``cond_or_uncond``, uncond usually first); the chunks arriving
    in one call change from call to call, so this is recomputed every time.
    """
    flags = list(extra_options.get("cond_or_uncond") or [0])
    if batch % len(flags):
        raise RuntimeError(f"batch of {batch} rows does not split into {len(flags)} conditioning chunks")
    size = batch // len(flags)
    return [(flag, slice(i * size, (i + 1) * size)) for i, flag in enumerate(flags)]


def extended_key_mask(content_len: int, extra_len: int, extra_bias: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask [rows, 1, content_len + extra_len]: 0 on content keys, ``extra_bias[r]`` on row r's
    appended keys. A bias of log(s) multiplies the appended keys' unnormalised attention by s; -inf removes them.
    """
    rows = extra_bias.shape[0]
    zeros = torch.zeros(rows, 1, content_len, dtype=dtype, device=extra_bias.device)
    return torch.cat([zeros, extra_bias.to(dtype).view(rows, 1, 1).expand(rows, 1, extra_len)], dim=-1)


def log_strength(strength: float) -> float:
    return -math.inf if strength <= 0 else math.log(strength)


@torch.no_grad()
def appended_key_share(q, k_content, k_extra, heads: int, extra_bias=None, query_chunk: int = 1024):
    """``key_share`` without a graph (sampling-time diagnostics)."""
    return key_share(q, k_content, k_extra, heads, extra_bias, query_chunk)


def key_share(q, k_content, k_extra, heads: int, extra_bias=None, query_chunk: int = 1024):
    """Share of each query's attention mass that falls on the appended keys, averaged over heads: [B, Lq].

    Computed from log-sum-exps over the two key sets, so the full [Lq, Lk] map is never held at once;
    differentiable (a training loss may use it).
    """
    b, lq, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(t.shape[0], -1, heads, d).transpose(1, 2).float()

    qh, kc, ke = split(q), split(k_content), split(k_extra)
    scale = 1.0 / math.sqrt(d)
    shares = []
    for start in range(0, lq, query_chunk):
        qs = qh[:, :, start:start + query_chunk]
        lse_c = torch.logsumexp(qs @ kc.transpose(-1, -2) * scale, dim=-1)
        lse_e = torch.logsumexp(qs @ ke.transpose(-1, -2) * scale, dim=-1)
        if extra_bias is not None:
            lse_e = lse_e + extra_bias.float().view(b, 1, 1)
        shares.append(torch.sigmoid(lse_e - lse_c).mean(dim=1))
    return torch.cat(shares, dim=1)
