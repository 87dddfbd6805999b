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


DEMO_INPUTS = {"two_badges.png": two_badges_scene, "anylogo_logo.png": logo, "shirt_scene.png": shirt_scene,
               "shirt_region.png": shirt_region, "product_photo.png": product_photo,
               "product_mask.png": product_mask}


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
