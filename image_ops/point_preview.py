"""Preview of a point selection: the image dimmed outside the mask, tinted inside, the points drawn on top."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .point_parsing import Point

POSITIVE_RGB = (0.0, 1.0, 0.0)
NEGATIVE_RGB = (1.0, 0.0, 0.0)
TINT_RGB = (0.25, 0.55, 1.0)
TINT_ALPHA = 0.35
OUTSIDE_BRIGHTNESS = 0.45


def point_radius(height: int, width: int) -> int:
    return max(3, round(min(height, width) / 80))


def draw_preview(image: torch.Tensor, mask: torch.Tensor, positives: tuple[Point, ...],
                 negatives: tuple[Point, ...] = ()) -> torch.Tensor:
    """image [3,H,W] 0..1, mask [H,W] 0/1 → [3,H,W]: positives green, negatives red (discs with a dark rim)."""
    rgb = image.permute(1, 2, 0).float().cpu().numpy()
    inside = mask.float().cpu().numpy()[..., None]
    tinted = (1 - TINT_ALPHA) * rgb + TINT_ALPHA * np.asarray(TINT_RGB, dtype=np.float32)
    out = np.ascontiguousarray(inside * tinted + (1 - inside) * OUTSIDE_BRIGHTNESS * rgb, dtype=np.float32)
    radius = point_radius(*out.shape[:2])
    for points, colour in ((negatives, NEGATIVE_RGB), (positives, POSITIVE_RGB)):
        for x, y in points:
            centre = (int(x), int(y))
            cv2.circle(out, centre, radius + 1, (0.0, 0.0, 0.0), thickness=-1, lineType=cv2.LINE_AA)
            cv2.circle(out, centre, radius, colour, thickness=-1, lineType=cv2.LINE_AA)
    return torch.from_numpy(out).clamp(0, 1).permute(2, 0, 1)
