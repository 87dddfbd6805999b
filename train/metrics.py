"""The run's JSONL metrics log and its validation images (written by the first process only).

``metrics.jsonl`` gets one object per logged step (``step``, ``loss``, ``lr``, ``grad_norm``,
``samples_per_s``, ``elapsed_s`` and the method's metrics) and one per event (``{"event": "checkpoint",
"step": …, "path": …}``, also ``resume``, ``validation``, ``export``, ``stopped``). On resume the lines after
the resumed step are dropped, so the log reads as if the run had never been interrupted.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


class MetricsLog:
    def __init__(self, path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= ``step`` (rewritten atomically)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def to_hwc_uint8(image: torch.Tensor):
    """``[H,W,3]`` or ``[3,H,W]`` (or with a leading batch of 1) float 0..1 → uint8 numpy ``[H,W,3]``."""
    image = image.detach().float().cpu()
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"a validation image must be [H,W,3] or [3,H,W], got shape {tuple(image.shape)}")
    if image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.movedim(0, -1)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_images(folder, samples) -> list[Path]:
    """Write ``[(name, image)]`` as PNGs into ``folder``; returns the paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in samples:
        array = to_hwc_uint8(image)
        path = folder / f"{name}.png"
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
        paths.append(path)
    return paths
