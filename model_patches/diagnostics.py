"""Reading an AttentionRecorder: accumulated subject attention (ASA) and statistic latent difference (SLD) as text,
ASA as a heatmap image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recycling import AttentionRecorder


def attention_report(recorder: AttentionRecorder) -> str:
    if not recorder.per_layer:
        return "no recycled attention was recorded (was the model sampled with recycling active?)"
    lines = ["AnyLogo accumulated subject attention (ASA: share of self-attention mass on subject tokens) and",
             "statistic latent difference (SLD: L1 between token means of delivered subject and denoising values)",
             "layer        ASA mean  first step  last step  SLD mean  steps"]
    for name, entries in recorder.per_layer.items():
        entries = sorted(entries, key=lambda e: -e[0])  # high sigma (early) first
        shares = [share for _, share, _ in entries]
        sld = sum(d for _, _, d in entries) / len(entries)
        lines.append(f"{name:<12} {sum(shares) / len(shares):.4f}    {shares[0]:.4f}      {shares[-1]:.4f}     "
                     f"{sld:.4f}    {len(shares)}")
    overall = [e for entries in recorder.per_layer.values() for e in entries]
    lines.append(f"all layers   {sum(e[1] for e in overall) / len(overall):.4f}"
                 f"{'':27}{sum(e[2] for e in overall) / len(overall):.4f}")
    return "\n".join(lines)


def share_map(recorder: AttentionRecorder, height: int, width: int) -> torch.Tensor:
    """[rows, height, width] mean share over layers and steps, each layer's grid resized to the image."""
    maps = []
    for name, total in recorder.maps.items():
        rows, gh, gw = recorder.shapes[name]
        mean = (total / recorder.map_counts[name]).reshape(rows, 1, gh, gw)
        maps.append(F.interpolate(mean, size=(height, width), mode="bilinear", align_corners=False)[:, 0])
    if not maps:
        return torch.zeros(1, height, width)
    return torch.stack(maps).mean(dim=0)


def attention_heatmap(recorder: AttentionRecorder, height: int, width: int) -> torch.Tensor:
    """IMAGE [rows, H, W, 3]: the share map scaled to its maximum, dark blue (none) → yellow (most)."""
    shares = share_map(recorder, height, width)
    peak = shares.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    t = (shares / peak).clamp(0, 1)
    return torch.stack([t.sqrt(), t, (1 - t) * 0.6], dim=-1).float()
