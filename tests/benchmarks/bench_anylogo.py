"""Cost of an AnyLogo sampling step relative to the same model without the patch, measured in the same run.

CFG on, batch 1, euler. Sizes: the tiny test UNet, and a full-size SD1.5 UNet (random weights are fine for speed
and memory). On CPU the absolute times mean little; the ratios are what to read. With CUDA available it also
reports peak memory.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_anylogo.py [--full] [--side 512] [--steps 3]
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


def full_size_sd15_patcher(inpainting: bool):
    """A ModelPatcher around a full-size SD1.5(-inpainting) UNet with random weights, built by ComfyUI."""
    import comfy.model_detection
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(image_size=32, in_channels=9 if inpainting else 4, out_channels=4, model_channels=320,
                     num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768,
                     use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1, legacy=False,
                     operations=comfy.ops.manual_cast)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return comfy.sd.load_diffusion_model_state_dict(unet.state_dict())


def run(model, positive, negative, side, steps, seed=1):
    import comfy.sample

    latent = torch.zeros(1, 4, side // 8, side // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=seed,
                        disable_pbar=True)
    return (time.perf_counter() - start) / steps


def measure(label, model, positive, negative, side, steps, repeats):
    from model_patches.anylogo import RecyclingSettings, build_patch

    subject = torch.randn(1, 4, side // 8, side // 8)
    variants = {"unpatched": model}
    for positions in ("decoder", "encoder", "encoder+decoder"):
        patched = model.clone()
        build_patch(patched, subject, RecyclingSettings(positions=positions)).install(patched)
        variants[f"recycling {positions}"] = patched
    run(model, positive, negative, side, 1)  # warm up: loads weights, allocators
    best = {name: float("inf") for name in variants}
    peaks = {}
    for _ in range(repeats):  # interleaved so load changes hit every variant alike
        for name, m in variants.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], run(m, positive, negative, side, steps))
            if torch.cuda.is_available():
                peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"\n{label}, {side}x{side} px, CFG on, batch 1, best of {repeats} x {steps} steps")
    print(f"{'variant':<28}{'s/step':>10}{'ratio':>8}" + (f"{'peak GiB':>10}" if peaks else ""))
    for name in variants:
        line = f"{name:<28}{best[name]:>10.3f}{best[name] / best['unpatched']:>8.2f}"
        print(line + (f"{peaks[name]:>10.2f}" if peaks else ""))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 UNet (slow on CPU)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    nodes = init_comfyui(extra_model_dirs={"checkpoints": tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors").parent})
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = nodes.CLIPTextEncode().encode(clip, "a logo on a shirt")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    for side in (64, 256):
        measure("tiny SD1.5 UNet", model, positive, negative, side, args.steps, args.repeats)
    if args.full:
        measure("full-size SD1.5 UNet (random weights)", full_size_sd15_patcher(False), positive, negative,
                args.side, args.steps, args.repeats)


if __name__ == "__main__":
    main()
