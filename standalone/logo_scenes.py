"""A small logo-in-scene set built from bundled material, for the AnyLogo trainer's tests and benchmark.

Scenes are square crops of scikit-image's photos; subjects are scikit-image's logo and letters rendered with
Pillow on coloured badges. A pair pastes its subject (resized to the region) into a square region of its scene:
the pasted scene is the training target, the region its mask, the subject image the condition. Pairs are
written in the AnyLogo folder layout (``SOURCE/NAME.png``, ``_mask.png``, ``_subject.png``), the source being
``logo`` or ``glyphs``. scikit-image is a development requirement only.

A pair may also carry a ``hint`` box: the same subject pasted a second time, outside the region, so the region's
content is visible elsewhere in the scene. Inpainting such scenes teaches a UNet's self-attention to fetch
matching content from another place (the correspondence a pretrained SD UNet brings to model recycling).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "coins", "brick")
LETTERS = "AKRSTWXZEHMN"
BADGE_COLOURS = ((200, 30, 40), (20, 60, 170), (30, 140, 60), (230, 160, 20), (120, 40, 150), (10, 10, 10))


@dataclass(frozen=True)
class Pair:
    name: str
    photo: str
    subject: int          # 0 = scikit-image's logo, k >= 1 = the k-th letter badge
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in scene pixels
    hint: tuple[int, int, int, int] | None = None  # a second, visible copy of the subject (outside the box)

    @property
    def source(self) -> str:
        return "logo" if self.subject == 0 else "glyphs"


def photo(name: str, size: int) -> Image.Image:
    """The centre square of a scikit-image photo, RGB, resized to ``size``."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def subject(index: int, size: int) -> Image.Image:
    """scikit-image's logo (index 0) on white, or a letter badge (index >= 1), at ``size``."""
    if index == 0:
        import skimage.data

        logo = Image.fromarray(skimage.data.logo())
        canvas = Image.new("RGBA", logo.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, logo).convert("RGB").resize((size, size), Image.LANCZOS)
    letter = LETTERS[(index - 1) % len(LETTERS)]
    colour = BADGE_COLOURS[(index - 1) % len(BADGE_COLOURS)]
    big = 4 * size  # draw large, then downsample: clean edges at tiny sizes
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([big // 16, big // 16, big - big // 16, big - big // 16], radius=big // 6, fill=colour)
    draw.text((big // 2, big // 2), letter, fill=(255, 255, 255), anchor="mm",
              font=ImageFont.load_default(size=int(big * 0.62)))
    return image.resize((size, size), Image.LANCZOS)


def make_pairs(count: int, *, scene_size: int, region: int, subjects: range, photos=PHOTOS, seed: int = 0,
               prefix: str = "pair") -> list[Pair]:
    """``count`` (photo, subject, square region of side ``region``) pairs drawn with a seeded generator; the
    region sits on the 8-pixel latent grid so its mask is exact at latent size."""
    rng = np.random.default_rng(seed)
    cells = (scene_size - region) // 8 + 1
    pairs = []
    for i in range(count):
        x0, y0 = (int(v) * 8 for v in rng.integers(0, cells, size=2))
        pairs.append(Pair(f"{prefix}_{i:03d}", photos[int(rng.integers(len(photos)))],
                          int(rng.choice(list(subjects))), (x0, y0, x0 + region, y0 + region)))
    return pairs


def make_hint_pairs(count: int, *, scene_size: int, region: int, subjects: range, photos=PHOTOS, seed: int = 0,
                    prefix: str = "hint") -> list[Pair]:
    """Like ``make_pairs``, each with a ``hint`` box of the region's size on the latent grid that does not
    overlap the region."""
    rng = np.random.default_rng(seed)
    cells = (scene_size - region) // 8 + 1
    slots = [(int(x) * 8, int(y) * 8) for x in range(cells) for y in range(cells)]
    if region <= 0 or (cells - 1) * 8 < region:
        raise ValueError(f"two {region} px boxes on the 8 px grid cannot both fit, apart, in a {scene_size} px "
                         f"scene (the region may be at most half the scene, rounded down to 8 px)")
    pairs = []
    for i in range(count):
        while True:
            (x0, y0), (hx, hy) = (slots[int(k)] for k in rng.integers(0, len(slots), size=2))
            if abs(x0 - hx) >= region or abs(y0 - hy) >= region:
                break
        pairs.append(Pair(f"{prefix}_{i:03d}", photos[int(rng.integers(len(photos)))],
                          int(rng.choice(list(subjects))), (x0, y0, x0 + region, y0 + region),
                          (hx, hy, hx + region, hy + region)))
    return pairs


def render(pair: Pair, scene_size: int, subject_size: int):
    """(target scene with the subject pasted, and at its hint box if any; region mask; subject image) as PIL."""
    scene = photo(pair.photo, scene_size)
    x0, y0, x1, y1 = pair.box
    scene.paste(subject(pair.subject, x1 - x0), (x0, y0))
    if pair.hint is not None:
        scene.paste(subject(pair.subject, pair.hint[2] - pair.hint[0]), pair.hint[:2])
    mask = Image.new("L", scene.size, 0)
    ImageDraw.Draw(mask).rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return scene, mask, subject(pair.subject, subject_size)


def write_pairs(folder, pairs: list[Pair], *, scene_size: int, subject_size: int) -> Path:
    """Write the pairs in the AnyLogo folder layout under ``folder``; returns the folder."""
    folder = Path(folder)
    for pair in pairs:
        scene, mask, subject_image = render(pair, scene_size, subject_size)
        base = folder / pair.source / pair.name
        base.parent.mkdir(parents=True, exist_ok=True)
        scene.save(base.with_suffix(".png"))
        mask.save(base.parent / f"{pair.name}_mask.png")
        subject_image.save(base.parent / f"{pair.name}_subject.png")
    return folder
