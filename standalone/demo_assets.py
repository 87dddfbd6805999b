"""The example workflows' input images: drawn here, shipped as PNG files in example_inputs/.

The shipped files are what users and the tests get (the pack copies the missing ones into ComfyUI's input
folder when it loads: nodes/example_inputs.py). The drawing code is how they were made; after changing it,
`python -m standalone.demo_assets` rewrites example_inputs/. Files are not redrawn at run time because Pillow's
default font differs between Pillow versions.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def two_badges_scene(size: tuple[int, int] = (384, 256)) -> Image.Image:
    """A grey scene with two identical red badges carrying a white glyph: one to pick, one twin to reject."""
    width, height = size
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, height // 6))
    side = height // 3
    for left in (width // 8, width - width // 8 - side):
        top = (height - side) // 2
        draw.rounded_rectangle([left, top, left + side, top + side], radius=side // 6, fill=(200, 30, 40))
        draw.text((left + side // 2, top + side // 2), "A", fill=(255, 255, 255), font=font, anchor="mm")
    return image


def logo(size: int = 192) -> Image.Image:
    """A flat two-colour logo with a glyph: the kind of subject AnyLogo inserts."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size // 12, size // 12, size - size // 12, size - size // 12], fill=(20, 60, 170))
    draw.text((size // 2, size // 2), "SC", fill=(250, 200, 30), font=ImageFont.load_default(size=size // 3),
              anchor="mm")
    return image


def shirt_scene(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A plain shirt on a wall: the scene a logo goes on."""
    width, height = size
    image = Image.new("RGB", size, (205, 200, 190))
    draw = ImageDraw.Draw(image)
    body = [width * 0.25, height * 0.2, width * 0.75, height * 0.95]
    draw.polygon([(width * 0.1, height * 0.35), (body[0], body[1]), (body[2], body[1]), (width * 0.9, height * 0.35),
                  (width * 0.8, height * 0.45), (body[2], height * 0.4), (body[2], body[3]), (body[0], body[3]),
                  (body[0], height * 0.4), (width * 0.2, height * 0.45)], fill=(235, 235, 240))
    return image


def shirt_region(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """White where the logo goes (the chest of the shirt), black elsewhere."""
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([width * 0.38, height * 0.38, width * 0.62, height * 0.62], fill=255)
    return mask


def product_photo(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """The logo placed on a grey canvas: the subject whose background outpainting regenerates."""
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste(logo(size[1] // 2), (size[0] // 4, size[1] // 4))
    return image


def product_mask(size: tuple[int, int] = (256, 256)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([size[0] // 4, size[1] // 4, size[0] // 4 + size[1] // 2 - 1,
                                    size[1] // 4 + size[1] // 2 - 1], fill=255)
    return mask


# EqDiff: three views of one toy cat (striped orange fur, green eyes) on different backgrounds, with their
# masks; the subject photos of eqdiff_train_subject and the reference photo of eqdiff_stylized_subject.
EQDIFF_VIEWS = (  # (centre x, centre y, head radius, background, floor)
    (128, 112, 52, (90, 140, 200), (60, 100, 60)),
    (100, 120, 44, (230, 220, 190), (150, 110, 80)),
    (150, 104, 58, (70, 70, 80), (120, 120, 130)),
)


def _toy_cat(view: int, size: int, draw_photo: bool) -> Image.Image:
    cx, cy, r, background, floor = (v * size // 256 if isinstance(v, int) else v for v in EQDIFF_VIEWS[view])
    image = Image.new("RGB" if draw_photo else "L", (size, size), background if draw_photo else 0)
    draw = ImageDraw.Draw(image)
    fur, on = (235, 140, 40), 255
    if draw_photo:
        draw.rectangle([0, size * 3 // 4, size, size], fill=floor)
    body = [cx - r, cy + r // 2, cx + r, cy + 2 * r + r // 3]
    ears = [[(cx - r, cy - r // 4), (cx - r // 2, cy - r - r // 3), (cx - r // 8, cy - r + r // 8)],
            [(cx + r, cy - r // 4), (cx + r // 2, cy - r - r // 3), (cx + r // 8, cy - r + r // 8)]]
    for polygon in ears:
        draw.polygon(polygon, fill=fur if draw_photo else on)
    draw.ellipse(body, fill=fur if draw_photo else on)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur if draw_photo else on)
    if draw_photo:  # the texture RRA should hold: dark stripes, green eyes, pink nose
        for k in (-2, -1, 0, 1, 2):
            x = cx + k * r // 3
            draw.line([(x, cy - r + r // 6), (x, cy - r // 2)], fill=(120, 60, 20), width=max(2, r // 10))
            draw.arc([body[0] + r // 4, body[1] + (k + 2) * r // 6, body[2] - r // 4, body[1] + (k + 2) * r // 6 + r],
                     200, 340, fill=(120, 60, 20), width=max(2, r // 12))
        for sx in (-1, 1):
            ex = cx + sx * r * 2 // 5
            draw.ellipse([ex - r // 7, cy - r // 7, ex + r // 7, cy + r // 7], fill=(60, 170, 60))
            draw.ellipse([ex - r // 20, cy - r // 8, ex + r // 20, cy + r // 8], fill=(10, 10, 10))
        draw.polygon([(cx - r // 10, cy + r // 4), (cx + r // 10, cy + r // 4), (cx, cy + r // 3)],
                     fill=(230, 120, 140))
    return image


def eqdiff_cat(view: int, size: int = 256) -> Image.Image:
    return _toy_cat(view, size, True)


def eqdiff_cat_mask(view: int, size: int = 256) -> Image.Image:
    return _toy_cat(view, size, False)


DEMO_INPUTS = {"two_badges.png": two_badges_scene, "anylogo_logo.png": logo, "shirt_scene.png": shirt_scene,
               "shirt_region.png": shirt_region, "product_photo.png": product_photo,
               "product_mask.png": product_mask,
               **{f"eqdiff_cat_{i + 1}.png": (lambda i=i: eqdiff_cat(i)) for i in range(len(EQDIFF_VIEWS))},
               **{f"eqdiff_cat_{i + 1}_mask.png": (lambda i=i: eqdiff_cat_mask(i)) for i in range(len(EQDIFF_VIEWS))}}


EXAMPLE_INPUTS_DIR = Path(__file__).resolve().parent.parent / "example_inputs"


def write_demo_inputs(input_dir: Path | str) -> list[Path]:
    """Copy the shipped example images into input_dir, keeping any file already there under the same name."""
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DEMO_INPUTS:
        path = input_dir / name
        if not path.exists():
            shutil.copyfile(EXAMPLE_INPUTS_DIR / name, path)
        written.append(path)
    return written


def main() -> int:
    EXAMPLE_INPUTS_DIR.mkdir(exist_ok=True)
    for name, draw in DEMO_INPUTS.items():
        draw().save(EXAMPLE_INPUTS_DIR / name, optimize=True)
        print(f"wrote example_inputs/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
