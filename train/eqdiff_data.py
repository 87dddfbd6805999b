"""EqDiff training data: the subject's photos with masks, and the class (prior-preservation) images.

Subject rows come from a manifest or a folder (``photo.png`` + optional ``photo_mask.png``). A photo without a
mask trains on the whole image (a warning says so: the background then enters the token). Class images come
from ``prior_dir``; when it holds fewer than ``num_class_images``, the missing ones are generated with the base
model through ComfyUI's own sampler from ``class_prompt`` and saved there (the DreamBooth habit), so a second
run reuses them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .finetune import load_square_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_square_mask(path, size: int) -> torch.Tensor:
    """A mask file as [size, size] in 0..1, cropped like ``load_square_image`` (luminance, or alpha if any)."""
    from PIL import Image

    with Image.open(path) as im:
        return square_mask(im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L"), size)


def square_mask(im, size: int) -> torch.Tensor:
    """A PIL "L" mask centre-cropped and resized (nearest) to [size, size] in 0..1, as the photos are cropped."""
    import numpy as np
    from PIL import Image

    scale = size / min(im.size)
    if scale != 1:
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.NEAREST)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def mask_from_points(clip_vision, image_path, positive_text: str, negative_text: str, *, encoder_size: int = 224,
                     blur_sigma: float = 1.0, dilation_px: int = 0) -> torch.Tensor:
    """The subject mask [H, W] (0/1, the photo's pixels) of the clicked points, by the helper Points to Mask uses.

    Points are in the photo's pixels, in the formats Points to Mask accepts (``x,y; x,y`` or points-editor JSON).
    Raises PointsError / VisionModelError with what was wrong (the caller adds the manifest line)."""
    import numpy as np
    from PIL import Image

    from image_ops.point_mask import select_subject
    from image_ops.point_parsing import PIXELS, batch_points

    with Image.open(image_path) as im:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).movedim(-1, 0)
    height, width = pixels.shape[-2:]
    positives, negatives = batch_points(positive_text or "", negative_text or "", 1, width, height, PIXELS)[0]
    return select_subject(clip_vision, pixels, positives, negatives, encoder_size=encoder_size,
                          blur_sigma=blur_sigma, dilation_px=dilation_px)


class SubjectDataset(torch.utils.data.Dataset):
    """Items: index, pixels [S, S, 3], mask [S, S] (ones where the row has none).

    ``point_masks`` maps a row index to the [H, W] mask made from that row's clicked points (used when the row
    gives no mask file)."""

    def __init__(self, rows: list[dict], resolution: int, point_masks: dict | None = None):
        self.rows, self.resolution = rows, resolution
        self.point_masks = {}
        for index, mask in (point_masks or {}).items():
            from PIL import Image

            pil = Image.fromarray(((mask > 0.5).cpu().numpy() * 255).astype("uint8"), mode="L")
            self.point_masks[index] = (square_mask(pil, resolution) > 0.5).float()
        unmasked = [Path(r["image"]).name for i, r in enumerate(rows)
                    if not r.get("mask") and i not in self.point_masks]
        if unmasked:
            print(f"warning: {len(unmasked)} subject image(s) have no mask and train on the whole image "
                  f"(background included): {', '.join(unmasked[:5])}", file=sys.stderr)
        for index, row in enumerate(rows):
            if (row.get("mask") or index in self.point_masks) and not bool((self._mask(index) > 0.5).any()):
                from .manifest import ManifestError

                what = f"the mask {row['mask']}" if row.get("mask") else "the mask made from the points"
                raise ManifestError(f"manifest line {row.get('_line', index + 1)}: {what} of {row['image']} is "
                                    f"empty at {resolution} px; every subject image needs subject pixels")

    def _mask(self, index: int) -> torch.Tensor:
        row = self.rows[index]
        if index in self.point_masks and not row.get("mask"):
            return self.point_masks[index]
        if not row.get("mask"):
            return torch.ones(self.resolution, self.resolution)
        return (load_square_mask(row["mask"], self.resolution) > 0.5).float()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"index": index, "pixels": load_square_image(row["image"], self.resolution), "mask": self._mask(index)}


def class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def ensure_class_images(folder: Path, count: int, *, patcher, clip, vae, prompt: str, resolution: int, steps: int,
                        cfg: float, seed: int) -> list[Path]:
    """The first ``count`` class images of ``folder``, generating the missing ones (ComfyUI's sampler, euler /
    normal, seed ``seed + i`` for the i-th image, written atomically as PNG)."""
    import comfy.sample
    import numpy as np
    from PIL import Image

    from model_patches.weight_files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    existing = class_images(folder)
    if len(existing) >= count:
        return existing[:count]
    positive = [[clip.encode_from_tokens(clip.tokenize(prompt)), {}]]
    negative = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    size = resolution // 8
    print(f"generating {count - len(existing)} class images of {prompt!r} in {folder}", file=sys.stderr)
    for i in range(len(existing), count):
        latent = torch.zeros(1, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, seed + i)
        with torch.no_grad():
            out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                      disable_pbar=True, seed=seed + i)
            image = vae.decode(out)[0].clamp(0, 1)
        target = folder / f"class_{i:04d}.png"
        with atomic_write(target) as tmp:
            Image.fromarray((image.float().cpu().numpy() * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return class_images(folder)[:count]
