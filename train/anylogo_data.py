"""AnyLogo training data: (scene, region, subject) rows, the scene zoom-in crop, subject augmentation, sources.

Folder layout, turned into a checked manifest by ``python -m train.prepare_manifest DATA --out
DATA/manifest.jsonl --method anylogo``::

    DATA/[SOURCE/]NAME.png               the scene (any size)
    DATA/[SOURCE/]NAME_mask.png          the region, white where the subject goes, the scene's size; and/or
    DATA/[SOURCE/]NAME_box.json          the region as a box [x0, y0, x1, y1] in scene pixels (x1, y1 exclusive)
    DATA/[SOURCE/]NAME_subject.png       the subject image (required; any size)
    DATA/[SOURCE/]NAME_subject_mask.png  optional subject mask (outside becomes white, as in AnyDoor)

The first sub-folder names the row's data source for weighted sampling (``source_weights``); rows at the top
level belong to the source ``"default"``. A manifest can also be written by hand: rows with ``scene``,
``subject``, ``mask`` and/or ``box``, optional ``subject_mask`` and ``source``. Every row needs a region; a box
must lie inside the scene; a mask without a box is read once and must not be empty, and its bounding box is
kept in the row (``prepare_manifest`` writes it, so starting a run does not decode every mask).

Random draws (crop, augmentation) take a per-sample ``torch.Generator`` and a fixed number of uniforms each,
so the engine's per-sample streams stay aligned whatever the settings.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from image_ops.subject_preprocess import MASK_THRESHOLD, crop_filled, resize

from .manifest import FieldSpec, ManifestSchema
from .prepare_manifest import Companion, FolderLayout

DEFAULT_SOURCE = "default"
SCENE_FILL = (0.5, 0.5, 0.5)  # outside the scene (a crop larger than the image): the inpainting grey


def load_rgb(path) -> torch.Tensor:
    """[3, H, W] float 0..1."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).clone()


def load_mask(path) -> torch.Tensor:
    """[H, W] float 0..1 from the file's luminance."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


def mask_bounds(mask: torch.Tensor) -> list[int] | None:
    """[x0, y0, x1, y1] (x1, y1 exclusive) of ``mask > MASK_THRESHOLD``, or None for an empty mask."""
    on = mask > MASK_THRESHOLD
    rows, cols = torch.nonzero(on.any(dim=1)).flatten(), torch.nonzero(on.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def box_mask(box, height: int, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = box
    mask = torch.zeros(height, width)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def check_region(row: dict, sizes: dict) -> list[str]:
    """Manifest row check: a region (mask or box) inside the scene, a non-empty subject mask; derives ``box``
    from the region mask when the row has none."""
    problems = []
    if "subject_mask" in row and mask_bounds(load_mask(row["subject_mask"])) is None:
        problems.append(f"subject mask {Path(row['subject_mask']).name!r} is empty (no pixel above "
                        f"{MASK_THRESHOLD})")
    width, height = sizes["scene"]
    box = row.get("box")
    if box is None:
        if "mask" not in row:
            return problems + ["no region: give a mask file or a box [x0, y0, x1, y1]"]
        bounds = mask_bounds(load_mask(row["mask"]))
        if bounds is None:
            return problems + [f"mask {Path(row['mask']).name!r} is empty (no pixel above {MASK_THRESHOLD})"]
        row["box"] = bounds
    elif (not isinstance(box, list) or len(box) != 4
          or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)):
        problems.append(f"box must be four integers [x0, y0, x1, y1], got {box!r}")
    elif not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        problems.append(f"box {box} is empty or outside the {width}x{height} scene")
    return problems


MANIFEST_SCHEMA = ManifestSchema(
    fields={"scene": FieldSpec("image"), "subject": FieldSpec("image"), "mask": FieldSpec("mask", False),
            "box": FieldSpec("list", False), "subject_mask": FieldSpec("mask", False),
            "source": FieldSpec("text", False)},
    same_size=(("scene", "mask"), ("subject", "subject_mask")), row_check=check_region)

FOLDER_LAYOUT = FolderLayout("scene", (
    Companion("subject", ("_subject.png", "_subject.jpg", "_subject.webp"), "path", required=True),
    Companion("subject_mask", ("_subject_mask.png",), "path"),
    Companion("mask", ("_mask.png",), "path"),
    Companion("box", ("_box.json",), "json"),
), source_field="source")


class AnyLogoDataset(torch.utils.data.Dataset):
    """Items are the row's full-size tensors; cropping and augmentation are random and happen per step."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        scene = load_rgb(row["scene"])
        mask = load_mask(row["mask"]) if "mask" in row else box_mask(row["box"], *scene.shape[-2:])
        return {"index": index, "scene": scene, "mask": mask, "box": list(row["box"]),
                "subject": load_rgb(row["subject"]),
                "subject_mask": load_mask(row["subject_mask"]) if "subject_mask" in row else None,
                "source": row.get("source") or DEFAULT_SOURCE}


def collate_lists(items: list[dict]) -> dict:
    """Scenes and subjects differ in size: every field stays a list (one entry per sample)."""
    return {key: [item[key] for item in items] for key in items[0]}


def source_weights(sources: list[str], weights: dict[str, float]) -> list[float] | None:
    """Per-row sampling weights giving each source a share of the draws proportional to its weight (sources not
    named weigh 1); rows within a source are equally likely. None when no weights are configured."""
    if not weights:
        return None
    counts = Counter(sources)
    return [weights.get(s, 1.0) / counts[s] for s in sources]


# ---- the scene zoom-in crop ----------------------------------------------------------------------------------

def _axis_start(lo_edge: int, hi_edge: int, side: int, length: int, u: float) -> int:
    """Start of a crop of ``side`` on an axis of ``length`` that contains [lo_edge, hi_edge), staying inside the
    image where it fits (else covering the whole axis); ``u`` in [0, 1] picks the position in that range."""
    first = max(hi_edge - side, min(0, length - side))
    last = min(lo_edge, max(0, length - side))
    return first + round(u * (last - first))


def zoom_window(box, height: int, width: int, generator: torch.Generator | None, fill_range=(0.3, 1.0)):
    """(top, left, side) of a square crop around the region ``box`` of a ``height`` x ``width`` scene.

    With a generator, the region's longer side fills a uniform fraction of ``fill_range`` of the crop side (the
    crop never cuts the region and is at most the scene's shorter side unless the region is larger) and the crop
    takes a uniform position among those that contain the region. Without one: the largest such square, centred
    on the admissible range (the deterministic crop of validation and of cached latents).
    """
    x0, y0, x1, y1 = box
    region = max(x1 - x0, y1 - y0)
    if generator is None:
        u, side = [0.5, 0.5], max(region, min(height, width))
    else:
        fraction, *u = torch.rand(3, generator=generator).tolist()
        lo, hi = fill_range
        side = max(region, min(round(region / (hi - (hi - lo) * fraction)), min(height, width)))
    return _axis_start(y0, y1, side, height, u[1]), _axis_start(x0, x1, side, width, u[0]), side


def zoom_crop(scene: torch.Tensor, mask: torch.Tensor, box, size: int, generator: torch.Generator | None,
              fill_range=(0.3, 1.0)):
    """The ``zoom_window`` crop of the scene and its region mask, resized to ``size``: ([3, size, size],
    [size, size]); outside the scene the crop is grey and unmasked."""
    top, left, side = zoom_window(box, *scene.shape[-2:], generator, fill_range)
    crop = (top, left, top + side, left + side)
    pixels = resize(crop_filled(scene, crop, SCENE_FILL)[None], size, size)[0]
    region_mask = crop_filled(mask[None].expand(3, -1, -1), crop, (0.0, 0.0, 0.0))[:1]
    region_mask = F.interpolate(region_mask[None], size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0, 0].clamp(0, 1)
    return pixels, region_mask


# ---- subject augmentation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectAugmentation:
    flip_probability: float = 0.5
    max_rotation: float = 10.0       # degrees, uniform in ±
    max_distortion: float = 0.1      # radial coefficient k, uniform in ±: k > 0 barrel, k < 0 pincushion
    min_scale: float = 0.5           # resolution change: down to a uniform factor in [min_scale, 1], back up


def augment_subject(image: torch.Tensor, generator: torch.Generator, settings: SubjectAugmentation) -> torch.Tensor:
    """[3, S, S] prepared subject (white background) → the same size after a random horizontal flip, rotation,
    optical (radial) distortion and resolution change. Areas brought in from outside are white."""
    u = torch.rand(4, generator=generator).tolist()
    side = image.shape[-1]
    angle = math.radians((2 * u[1] - 1) * settings.max_rotation)
    k = (2 * u[2] - 1) * settings.max_distortion
    scale = settings.min_scale + (1 - settings.min_scale) * u[3]
    coords = torch.linspace(-1 + 1 / side, 1 - 1 / side, side)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    # output pixel p samples the input at the inverse rotation of p, radially distorted, mirrored when flipped
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = cos * x + sin * y, -sin * x + cos * y
    radial = 1 + k * (sx * sx + sy * sy)
    sx, sy = sx * radial, sy * radial
    if u[0] < settings.flip_probability:
        sx = -sx
    grid = torch.stack([sx, sy], dim=-1)[None].to(image)
    # sample (image - 1) with zero padding, so whatever comes from outside the image is white
    out = F.grid_sample(image[None] - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    low = max(1, round(side * scale))
    if low < side:
        out = resize(resize(out.clamp(0, 1), low, low), side, side)
    return out[0].clamp(0, 1)
