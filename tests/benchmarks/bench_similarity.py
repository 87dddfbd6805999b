"""Images per second of the Subject Similarity scores (CLIP-I, DINO-I, LPIPS), tiny and full-size encoders.

Full size = CLIP ViT-L/14 and DINOv2-large files with random weights loaded by ComfyUI's own loader (speed does
not depend on the weights), LPIPS-AlexNet with random weights. Each generated 512x512 image is scored against
one 512x512 reference (both are encoded: 2 encoder passes per image per metric). Device: ComfyUI's (CPU here).

    COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_similarity.py [--images 8] [--full]
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

from image_ops import similarity as sim  # noqa: E402
from image_ops.lpips import random_lpips  # noqa: E402
from standalone import tiny_models  # noqa: E402


def rate(encoders, images: int, side: int = 512) -> float:
    gen = torch.rand(images, 3, side, side, generator=torch.Generator().manual_seed(0))
    ref = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    sim.score(gen[:1], ref, encoders)  # warm-up
    start = time.perf_counter()
    sim.score(gen, ref, encoders)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="also the full-size random encoders (slow on CPU)")
    args = parser.parse_args()
    import comfy.clip_vision
    import comfy.model_management as mm

    torch.set_grad_enabled(False)
    print(f"device: {mm.get_torch_device()}, threads: {torch.get_num_threads()}, {args.images} images 512x512")
    sets = [("tiny", tiny_models.tiny_clip_vision(0), tiny_models.tiny_dinov2(0))]
    if args.full:
        folder = tiny_models.default_cache_dir() / "clip_vision"
        clip = comfy.clip_vision.load(str(tiny_models.build_full_layout_vision_file(
            folder / "random_clip_vit_l.safetensors", "clip_vit_l")))
        dino = comfy.clip_vision.load(str(tiny_models.build_full_layout_vision_file(
            folder / "random_dinov2_large.safetensors", "dinov2_large")))
        sets.append(("full (ViT-L/14, DINOv2-L)", clip, dino))
    lpips = random_lpips("alex").to(mm.get_torch_device())
    print(f"LPIPS-AlexNet (256 px): {rate(sim.Encoders(lpips=lpips), args.images):.2f} images/s")
    for name, clip, dino in sets:
        print(f"{name}: CLIP-I {rate(sim.Encoders(clip_vision=clip), args.images):.2f} images/s, "
              f"DINO-I (224 px) {rate(sim.Encoders(dinov2=dino), args.images):.2f} images/s")


if __name__ == "__main__":
    main()
