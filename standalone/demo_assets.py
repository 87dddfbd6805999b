"""Input images the demo and the workflow tests write into ComfyUI's input folder (drawn, not shipped)."""
from __future__ import annotations

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


DEMO_INPUTS = {"two_badges.png": two_badges_scene}


def write_demo_inputs(input_dir: Path | str) -> list[Path]:
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in DEMO_INPUTS.items():
        path = input_dir / name
        if not path.exists():
            draw().save(path)
        written.append(path)
    return written
