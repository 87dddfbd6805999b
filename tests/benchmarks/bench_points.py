"""Per-image CPU time of the point → mask node's stages, at 512² and 1024² inputs.

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_points.py [--repeats N]

Two encoders: the tiny CLIP vision test model and a full-size ViT-L/14 with random weights, loaded through
ComfyUI's own clip_vision.load: as the stock loader gives it (fp16, ComfyUI's default for vision encoders even
on the CPU) and in fp32 (ComfyUI's --fp32-text-enc). Stages: squashing the
image to the encoder input, the encoder pass, similarity → mask (Eq. 2, Gaussian, Otsu, components, pixels,
dilation) and the preview. Times are process CPU time (``time.process_time``) on one torch thread by default,
so that other work on a shared machine does not inflate them; median of the repeats after one warm-up call.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, as in tests/conftest.py

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from image_ops.point_features import squash_to_square  # noqa: E402
from image_ops.point_mask import points_to_mask  # noqa: E402
from image_ops.point_preview import draw_preview  # noqa: E402
from image_ops.vision_features import describe, layer_states  # noqa: E402
from standalone import tiny_models  # noqa: E402

ENCODER_SIZE = 224


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def bench(name, clip_vision, side, repeats):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, side, side, generator=gen)
    depth = describe(clip_vision).depth
    positives, negatives = ((side * 0.3, side * 0.5),), ((side * 0.7, side * 0.5),)
    squashed = squash_to_square(image, ENCODER_SIZE)
    tokens = layer_states(clip_vision, squashed, [depth])[depth][0, 1:]
    grid = (ENCODER_SIZE // describe(clip_vision).patch_size,) * 2
    mask = points_to_mask(tokens, grid, side, side, positives, negatives, dilation_px=8)
    stages = {
        "resize": _median_ms(lambda: squash_to_square(image, ENCODER_SIZE), repeats),
        "encoder": _median_ms(lambda: layer_states(clip_vision, squashed, [depth]), repeats),
        "mask": _median_ms(lambda: points_to_mask(tokens, grid, side, side, positives, negatives,
                                                  dilation_px=8), repeats),
        "preview": _median_ms(lambda: draw_preview(image[0], mask, positives, negatives), repeats),
    }
    total = sum(stages.values())
    share = (total - stages["encoder"]) / total
    print(f"| {name:<24} | {side:>5}² | {stages['resize']:8.1f} | {stages['encoder']:9.1f} | "
          f"{stages['mask']:7.1f} | {stages['preview']:8.1f} | {total:9.1f} | {share:14.1%} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import comfy.cli_args
    import comfy.clip_vision

    path = str(tiny_models.build_full_layout_vision_file(
        tiny_models.default_cache_dir() / "clip_vision" / "random_clip_vit_l.safetensors", "clip_vit_l"))
    stock = comfy.clip_vision.load(path)  # ComfyUI picks fp16 for vision encoders, on the CPU too
    comfy.cli_args.args.fp32_text_enc = True  # what --fp32-text-enc does
    fp32 = comfy.clip_vision.load(path)
    comfy.cli_args.args.fp32_text_enc = False
    models = [("tiny CLIP (64-d, 6 lay.)", tiny_models.tiny_clip_vision(seed=0)),
              ("ViT-L/14 fp16 (stock)", stock), ("ViT-L/14 fp32", fp32)]
    print(f"CPU time in ms per image, {torch.get_num_threads()} torch thread(s), encoder input {ENCODER_SIZE}², "
          f"last layer, median of {args.repeats}\n")
    print("| model                    | image  | resize   | encoder   | mask    | preview  | total     | "
          "non-encoder    |")
    print("|--------------------------|--------|----------|-----------|---------|----------|-----------|"
          "----------------|")
    for name, model in models:
        for side in (512, 1024):
            bench(name, model, side, args.repeats)


if __name__ == "__main__":
    main()
