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
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L")
        scale = size / min(im.size)
        if scale != 1:
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.NEAREST)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


class SubjectDataset(torch.utils.data.Dataset):
    """Items: index, pixels [S, S, 3], mask [S, S] (ones where the row has none)."""

    def __init__(self, rows: list[dict], resolution: int):
        self.rows, self.resolution = rows, resolution
        unmasked = [Path(r["image"]).name for r in rows if not r.get("mask")]
        if unmasked:
            print(f"warning: {len(unmasked)} subject image(s) have no mask and train on the whole image "
                  f"(background included): {', '.join(unmasked[:5])}", file=sys.stderr)
        for row in rows:
            if row.get("mask") and not bool((self._mask(row) > 0.5).any()):
                from .manifest import ManifestError

                raise ManifestError(f"the mask {row['mask']} of {row['image']} is empty at {resolution} px; every "
                                    "subject image needs subject pixels")

    def _mask(self, row) -> torch.Tensor:
        if not row.get("mask"):
            return torch.ones(self.resolution, self.resolution)
        return (load_square_mask(row["mask"], self.resolution) > 0.5).float()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"index": index, "pixels": load_square_image(row["image"], self.resolution), "mask": self._mask(row)}


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
