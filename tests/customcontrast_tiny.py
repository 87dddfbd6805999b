"""Tiny CustomContrast training inputs shared by the trainer's tests, and a trainer entry point for them.

Data: procedural subjects (a coloured square on a plain background), views with masks and captions that hold
the placeholder at two different token positions. The method: the trainer's, with the tiny checkpoint's text
encoder cut to 2 blocks (``shallow_text_encoder``: S+ runs the text encoder once per cross-attention layer and
sample). Run as a script (``python tests/customcontrast_tiny.py --config …``, also under torchrun) it is
``python -m train.customcontrast`` with that method, for the tests that need trainer processes.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # a script: the pack root behind ComfyUI, as ``python -m train…`` from the root has it
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import json

import numpy as np
from PIL import Image

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 40, 220)]
CAPTIONS = ["a photo of sks on a table", "sks"]


class ShallowTextMethod:
    """The trainer's method with the 2-block text encoder (what the test's node side uses too)."""

    @staticmethod
    def make():
        from train.customcontrast import CustomContrastMethod

        class Shallow(CustomContrastMethod):
            def build(self, ctx):
                from standalone.tiny_models import shallow_text_encoder

                shallow_text_encoder(ctx.base.clip)
                return super().build(ctx)

        return Shallow


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_views(folder: Path, views=(2, 2, 2), seed=0):
    rng = np.random.default_rng(seed)
    for s, count in enumerate(views):
        for v in range(count):
            img = np.zeros((64, 64, 3), np.uint8)
            img[:] = rng.integers(60, 200, 3)
            y, x = rng.integers(4, 30, 2)
            img[y:y + 24, x:x + 24] = COLOURS[s % 3]
            mask = np.zeros((64, 64), np.uint8)
            mask[y:y + 24, x:x + 24] = 255
            _png(folder / f"s{s}" / f"v{v}.png", img)
            _png(folder / f"s{s}" / f"v{v}_mask.png", mask)
            # the placeholder at another token position in every other view: per-row positions are exercised
            (folder / f"s{s}" / f"v{v}.txt").write_text(CAPTIONS[v % 2])
    return folder


def write_files(folder: Path) -> Path:
    """Views, their manifest (through ``prepare_manifest``), and the tiny CLIP vision as a file with its config."""
    from model_patches.weight_files import save_weights
    from standalone import tiny_models
    from train.prepare_manifest import cli

    write_views(folder)
    assert cli([str(folder), "--out", str(folder / "manifest.jsonl"), "--method", "customcontrast"]) == 0
    clip = tiny_models.tiny_clip_vision(seed=0)
    save_weights(folder / "clip.safetensors", {k: v.contiguous() for k, v in clip.get_sd().items()}, {"t": "clip"})
    (folder / "clip.json").write_text(json.dumps(tiny_models.TINY_CLIP_VISION_CONFIG))
    return folder


def write_config(path, model_dirs, folder, **overrides):
    import yaml

    values = {"base_checkpoint": str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"),
              "manifest": str(folder / "manifest.jsonl"), "clip_vision": str(folder / "clip.safetensors"),
              "clip_vision_config": str(folder / "clip.json"), "resolution": 64, "batch_size": 4,
              "learning_rate": 1e-3, "encoder_dim": 32, "visual_tokens": 4, "encoder_depth": 2, "encoder_heads": 4,
              "fourier_bands": 8, "progress": False, "steps": 2, "checkpoint_every": 2, **overrides}
    Path(path).write_text(yaml.safe_dump(values))
    return path


def main(argv=None) -> int:
    import train  # noqa: F401  (puts ComfyUI in front of sys.path)
    from train.engine import run

    return run(ShallowTextMethod.make(), argv)


if __name__ == "__main__":
    sys.exit(main())
