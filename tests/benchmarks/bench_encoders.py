"""Cost of the hierarchical encoders against one plain forward of the same model (target about 1.0x).

Full-size random-weight files (DINOv2-large, CLIP ViT-L/14; the speed does not depend on the weights), loaded
by ComfyUI's own loader. "Plain" is ComfyUI's ``clip_vision.encode_image`` on an image already at the model's
input side (so its resize is a no-op): 518 px for DINOv2, 224 for CLIP. ComfyUI cannot run DINOv2 at 224 (its
position embeddings are not interpolated), so the 224-px DINOv2 row is compared with a plain 224-px forward
written out (interpolated positions, all 24 blocks: standalone.vision_reference). The second table gives
per-image times of the whole node path (mask preprocessing of a 512² or 1024² image, then encoding).

    COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_encoders.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from image_ops.hierarchical_encode import encode_clip_hierarchical, encode_dinov2_hierarchical  # noqa: E402
from image_ops.subject_preprocess import prepare_subject  # noqa: E402
from standalone import tiny_models  # noqa: E402
from standalone.vision_reference import BlockCalls, reference_dinov2_states  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_seconds(plain, ours, repeats: int) -> tuple[float, float]:
    """Fastest of ``repeats`` runs of each, the two interleaved (after one warm-up each), so that load from
    other processes on a shared CPU hits both alike; the minimum is the least disturbed run."""
    plain(), ours()
    times = [(seconds(plain), seconds(ours)) for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def load(kind: str):
    import comfy.clip_vision

    path = tiny_models.default_cache_dir() / "clip_vision" / f"random_{kind}.safetensors"
    tiny_models.build_full_layout_vision_file(path, kind)
    return comfy.clip_vision.load(str(path))


def blocks_per_batch(model, encode) -> str:
    with BlockCalls(model) as calls:
        encode()
    return ", ".join(f"{runs}x" for runs in sorted(set(calls.blocks)))


def ratio_table(dino, clip, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    image518, image224 = torch.rand(1, 518, 518, 3), torch.rand(1, 224, 224, 3)
    pixels518, pixels224 = image518.movedim(-1, 1), image224.movedim(-1, 1)
    cases = [
        ("DINOv2-L", 518, "encode_image @518", dino, lambda: dino.encode_image(image518),
         lambda: encode_dinov2_hierarchical(dino, pixels518, size=518)),
        ("DINOv2-L", 224, "plain forward @224", dino, lambda: reference_dinov2_states(dino, pixels224, (24,)),
         lambda: encode_dinov2_hierarchical(dino, pixels224, size=224)),
        ("CLIP ViT-L", 224, "encode_image @224", clip, lambda: clip.encode_image(image224),
         lambda: encode_clip_hierarchical(clip, pixels224)),
    ]
    rows = []
    for model_name, size, baseline, model, plain, ours in cases:
        plain_s, ours_s = paired_seconds(plain, ours, repeats)
        rows.append((model_name, size, baseline, plain_s, ours_s, blocks_per_batch(model, ours)))
    return rows


def per_image_table(dino, clip, repeats: int) -> list[tuple]:
    """Whole node path per image (models already warm from the ratio table)."""
    rows = []
    for side in (512, 1024):
        torch.manual_seed(side)
        image = torch.rand(1, 3, side, side)
        mask = torch.zeros(1, side, side)
        mask[:, side // 4:side * 3 // 4, side // 8:side * 7 // 8] = 1.0  # a wide subject: the pad fit squares it

        def dinov2(size):
            pixels, info = prepare_subject(image, mask, size=size, fit="pad", margin=0.1)
            return encode_dinov2_hierarchical(dino, pixels, size=size, background_pixels=image, preprocessing=info)

        def clip_path():
            pixels, info = prepare_subject(image, mask, size=224, fit="center_crop")
            return encode_clip_hierarchical(clip, pixels, preprocessing=info)

        prep = min(seconds(lambda: prepare_subject(image, mask, size=224, fit="pad", margin=0.1)) for _ in range(5))
        for path, fn in (("DINOv2-L @224, subject + background", lambda: dinov2(224)),
                         ("DINOv2-L @518, subject + background", lambda: dinov2(518)),
                         ("CLIP ViT-L @224", clip_path)):
            rows.append((f"{side}²", path, prep, min(seconds(fn) for _ in range(repeats))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per ratio measurement (fastest kept)")
    parser.add_argument("--image-repeats", type=int, default=1, help="timed runs per node-path measurement")
    args = parser.parse_args(argv)
    # as in ComfyUI's executor, which runs every node under inference mode: no autograd records for either side
    with torch.inference_mode():
        return report(args)


def report(args) -> int:
    dino, clip = load("dinov2_large"), load("clip_vit_l")
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch 1, fastest of {args.repeats} "
          "interleaved runs\n")

    print("| model | input | baseline | baseline s | hierarchical s | ratio | block runs per batch |")
    print("|---|---|---|---|---|---|---|")
    for model, size, baseline, plain, ours, blocks in ratio_table(dino, clip, args.repeats):
        print(f"| {model} | {size} | {baseline} | {plain:.3f} | {ours:.3f} | {ours / plain:.2f}x | {blocks} |")

    print("\n| input image | path (mask preprocessing + encode) | preprocessing s | total s per image |")
    print("|---|---|---|---|")
    for side, path, prep, total in per_image_table(dino, clip, args.image_repeats):
        print(f"| {side} | {path} | {prep:.3f} | {total:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
