"""Cost of EqDiff, measured against the unpatched model in the same run.

Sampling: a step with RRA (one batch-1 reference pass per model evaluation + the fusion in the middle/decoder
self-attention) relative to the same model unpatched, CFG on, batch 1, euler. Training: one EqDiff training
step (FDTE token encode with gradient, reference pass, 2-row UNet pass with RRA, four losses, backward) relative
to a plain denoising step of the same UNet on the same rows (one apply_model, eps-MSE, backward into the same
K/V weights). On CPU the absolute times mean little; read the ratios. With CUDA it also reports peak memory.
Every variant is run once untimed before the timed repeats (the first call loads the RRA layers through
ComfyUI's model management, builds the reference bank's buffers and warms the allocator), and the repeats are
interleaved, so loading and machine load do not land on one variant.

``--default-run`` times ``python -m train.eqdiff`` with the trainer's own default config
(``train/configs/eqdiff_sd15.yaml``: 600 steps, batch 2, 512 px, 200 class images generated with the base) on the
tiny test checkpoint and three synthetic 512 px photos with masks: class images and steps reported apart.
``--default-run-steps N --default-run-class-images K`` run the same config shortened and extrapolate linearly
to 600 steps and 200 class images (printed as an estimate).

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_eqdiff.py [--full] [--side 512] [--train]
    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_eqdiff.py --tiny-sides '' --default-run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parent))
from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from bench_anylogo import full_size_sd15_patcher, run  # noqa: E402


def rra_patched(model, side, record=False):
    from model_patches.eqdiff import EqDiffSettings, EqDiffWeights, build_patch
    from model_patches.eqdiff_rra import RRAModules, rra_slots

    slots = rra_slots(model)
    modules = RRAModules.for_model(model, slots)
    with torch.no_grad():
        for m in modules.values():  # a nonzero head, so the fusion does real work
            m.fusion.weight.normal_(0, 0.01)
            m.fusion.bias.fill_(0.3)
    weights = EqDiffWeights("bench", modules, [s.name for s in slots], {})
    patched = model.clone()
    build_patch(patched, weights, torch.randn(1, 4, side // 8, side // 8),
                EqDiffSettings(record=record)).install(patched)
    return patched


def measure_sampling(label, model, positive, negative, side, steps, repeats, record=True):
    variants = {"unpatched": model, "EqDiff RRA": rra_patched(model, side)}
    if record:
        variants["EqDiff RRA + record"] = rra_patched(model, side, record=True)
    warm = {name: run(m, positive, negative, side, 1) for name, m in variants.items()}  # untimed warm-up
    print(f"warm-up (first call, not counted): " + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()))
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
    print(f"{'variant':<24}{'s/step':>10}{'ratio':>8}" + (f"{'peak GiB':>10}" if peaks else ""))
    for name in variants:
        line = f"{name:<24}{best[name]:>10.3f}{best[name] / best['unpatched']:>8.2f}"
        print(line + (f"{peaks[name]:>10.2f}" if peaks else ""))


def measure_training(repeats):
    """EqDiff training step vs a plain denoising step, tiny model, 64 px, batch 2 (+2 prior rows)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from standalone import tiny_models
    from train.config import parse_command_line
    from train.diffusion import implied_noise, noised
    from train.distributed import DistInfo
    from train.engine import Trainer
    from train.eqdiff import EqDiffConfig, EqDiffMethod
    from train.prepare_manifest import cli
    from train.randomness import SampleRandom

    root = Path(tempfile.mkdtemp(prefix="bench_eqdiff_"))
    for i in range(3):
        image = np.full((64, 64, 3), 60 * i, np.uint8)
        image[16:48, 16:48] = (220, 30, 30)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(image).save(root / f"s{i}.png")
        Image.fromarray(mask).save(root / f"s{i}_mask.png")
    cli([str(root), "--out", str(root / "manifest.jsonl"), "--method", "eqdiff"])
    ckpt = tiny_models.build_sd15_checkpoint(tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors")
    config, _ = parse_command_line(EqDiffConfig, [
        "--base_checkpoint", str(ckpt), "--manifest", str(root / "manifest.jsonl"), "--output_dir", str(root / "out"),
        "--class_word", "cat", "--resolution", "64", "--num_class_images", "2", "--prior_steps", "1",
        "--progress", "false"])
    config.method = "eqdiff"
    trainer = Trainer(EqDiffMethod(config), DistInfo())
    trainer.prepare()
    method, ctx = trainer.method, trainer.ctx
    batch = method.collate([trainer.dataset[0], trainer.dataset[1]])
    model = ctx.base.model
    context = torch.cat([method.texts("photo of a sks cat")[None]] * 4)

    def eqdiff_step(step):
        loss, _ = method.training_loss(batch, ctx, SampleRandom(0, step, [0, 1], "cpu"))
        loss.backward()

    def plain_step(step):
        rng = SampleRandom(0, step, [0, 1, 2, 3], "cpu")
        x0 = torch.randn(4, 4, 8, 8)
        sigma = model.model_sampling.sigmas[rng.randint(0, 1000)].float()
        noise = rng.randn(4, 8, 8)
        x = noised(model, x0, noise, sigma)
        out = model.apply_model(x, sigma, c_crossattn=context, transformer_options={})
        torch.nn.functional.mse_loss(implied_noise(x, out, sigma), noise).backward()

    best = {"plain denoising step (4 rows)": float("inf"), "EqDiff step (2 + 2 prior rows)": float("inf")}
    fns = dict(zip(best, (plain_step, eqdiff_step)))
    for name, fn in fns.items():
        fn(0)
    for r in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(r + 1)
            best[name] = min(best[name], time.perf_counter() - start)
            for p in trainer.params:
                p.grad = None
    plain = best["plain denoising step (4 rows)"]
    print(f"\ntraining step, tiny SD1.5 UNet, 64x64 px, best of {repeats}")
    for name, value in best.items():
        print(f"{name:<34}{value:>8.3f} s{value / plain:>8.2f}x")
    print(f"estimated default 600-step run on this machine: {600 * best['EqDiff step (2 + 2 prior rows)'] / 60:.0f} "
          "min of steps (plus class images and exports)")


def measure_default_run(timeout_s: float, steps: int = 600, class_images: int = 200):
    """Wall time of the trainer's default config on the tiny checkpoint (its own process, as a user runs it)."""
    import json
    import os
    import subprocess
    import tempfile

    import numpy as np
    from PIL import Image

    from standalone import tiny_models
    from train.prepare_manifest import cli

    pack = Path(__file__).resolve().parents[2]
    root = Path(tempfile.mkdtemp(prefix="bench_eqdiff_default_"))
    photos = root / "photos"
    photos.mkdir()
    yy, xx = np.mgrid[:512, :512]
    for i, (cy, cx, bg) in enumerate(((240, 240, 40), (200, 300, 200), (290, 210, 120))):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 110 ** 2
        image = np.full((512, 512, 3), bg, np.uint8)
        image[disc] = (220, 30, 30)
        Image.fromarray(image).save(photos / f"disc_{i}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(photos / f"disc_{i}_mask.png")
    cli([str(photos), "--out", str(photos / "manifest.jsonl"), "--method", "eqdiff"])
    ckpt = tiny_models.build_sd15_checkpoint(tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors")
    out = root / "out"
    command = [sys.executable, "-m", "train.eqdiff", "--config", str(pack / "train/configs/eqdiff_sd15.yaml"),
               "--base_checkpoint", str(ckpt), "--manifest", str(photos / "manifest.jsonl"), "--output_dir", str(out),
               "--class_word", "cat", "--export_name", "disc", "--progress", "false"]
    if steps != 600 or class_images != 200:
        command += ["--steps", str(steps), "--num_class_images", str(class_images), "--checkpoint_every", str(steps)]
    print("\ndefault run:", " ".join(command[1:]))
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=pack, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                                text=True, timeout=timeout_s)
        finished = result.returncode == 0
        if not finished:
            print(result.stderr[-3000:])
    except subprocess.TimeoutExpired:
        finished = False
    wall = time.perf_counter() - start
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    steps_wanted = steps
    steps = [r for r in log if "loss" in r]
    step_s = sum(r["step_s"] for r in steps)
    pngs = sorted((out / "class_images").glob("*.png")) if (out / "class_images").exists() else []
    classes = len(pngs)
    print(f"default run on the tiny checkpoint: {'finished' if finished else f'stopped at the {timeout_s:.0f} s limit'}"
          f" after {wall:.0f} s wall; {classes} class images; {len(steps)} of {steps_wanted} steps logged, "
          f"{step_s:.0f} s in steps ({step_s / max(1, len(steps)):.2f} s/step)")
    if steps and classes >= 2 and (not finished or steps_wanted != 600 or classes != 200):
        # one class image's time from the files' write times (images 2..K), the rest is start-up and exports
        per_class = (pngs[-1].stat().st_mtime - pngs[0].stat().st_mtime) / (classes - 1)
        fixed = wall - step_s - classes * per_class
        estimate = fixed + 200 * per_class + 600 * step_s / len(steps)
        print(f"  {per_class:.1f} s per class image, {fixed:.0f} s start-up + exports; estimated default run "
              f"(600 steps, 200 class images): {estimate:.0f} s = {estimate / 60:.0f} min "
              f"(class images {200 * per_class / 60:.0f} min, steps {600 * step_s / len(steps) / 60:.0f} min)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 UNet (slow on CPU)")
    parser.add_argument("--train", action="store_true", help="also the training step")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-sides", default="64,256", help="image sides for the tiny UNet ('' = none)")
    parser.add_argument("--no-record", action="store_true", help="leave out the record variant (full size: time)")
    parser.add_argument("--default-run", action="store_true", help="time the trainer's default 600-step run on "
                                                                   "the tiny checkpoint")
    parser.add_argument("--default-run-timeout", type=float, default=3600)
    parser.add_argument("--default-run-steps", type=int, default=600)
    parser.add_argument("--default-run-class-images", type=int, default=200)
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    nodes = init_comfyui(extra_model_dirs={"checkpoints": tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors").parent})
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = nodes.CLIPTextEncode().encode(clip, "a watercolor painting of sks cat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    for side in [int(x) for x in args.tiny_sides.split(",") if x]:
        measure_sampling("tiny SD1.5 UNet", model, positive, negative, side, args.steps, args.repeats,
                         not args.no_record)
    if args.full:
        measure_sampling("full-size SD1.5 UNet (random weights)", full_size_sd15_patcher(False), positive, negative,
                         args.side, args.steps, args.repeats, not args.no_record)
    if args.train:
        measure_training(args.repeats)
    if args.default_run:
        measure_default_run(args.default_run_timeout, args.default_run_steps, args.default_run_class_images)


if __name__ == "__main__":
    main()
