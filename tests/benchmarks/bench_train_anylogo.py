"""AnyLogo trainer step cost against a plain denoising step on the same UNet and batch, with and without checkpointing.

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_train_anylogo.py [--resolution 64 --batch 2]

Variants, each in a fresh process (so peak memory is its own), all on the tiny SD1.5-inpainting checkpoint with
the same trainable weights (``--train-layers``, default the paper's full UNet) and AdamW:
  plain       a hand-written loop: one 9-channel UNet pass on fixed latents with a cross-attention context as
              long as AnyLogo's token groups, epsilon-MSE, backward, AdamW;
  anylogo     the engine running the AnyLogo method with cached inputs (zoom-in and augmentation off): subject
              pass + generation pass, sparse recycling (Λ=0.6), DINOv2 projection, condition dropout;
  anylogo+gc  the same with gradient_checkpointing;
  anylogo+aug zoom-in crops and subject augmentation on: every step also VAE-encodes three images per sample
              (scene crop, masked scene, subject) and runs DINOv2 on the subject and the scene.
Reported as in bench_train_step.py: median s/step after warm-up (``--threads`` torch threads on the CPU),
samples/s, the ratio to plain, bytes autograd saves for backward in one training forward, and the peak memory
growth over the timed steps. On the tiny UNet at small sizes this measures the method's structure (two UNet
passes, the extra pass's backward), not SD1.5's absolute speed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_train_step import print_table, run_variants, time_plain_steps, time_trainer  # also boots the host

import torch  # noqa: E402

VARIANTS = ("plain", "anylogo", "anylogo+gc", "anylogo+aug")


def _data(folder: Path, args) -> Path:
    from standalone import logo_scenes
    from train.prepare_manifest import cli

    pairs = logo_scenes.make_pairs(args.batch, scene_size=args.resolution, region=args.resolution // 2,
                                   subjects=range(0, 4))
    logo_scenes.write_pairs(folder / "data", pairs, scene_size=args.resolution, subject_size=args.resolution)
    manifest = folder / "data" / "manifest.jsonl"
    if cli([str(folder / "data"), "--out", str(manifest), "--method", "anylogo"]) != 0:
        raise RuntimeError("could not build the benchmark manifest")
    return manifest


def _config(args, folder: Path, manifest: Path, variant: str):
    from standalone import tiny_models
    from train.anylogo import AnyLogoConfig

    weights, config = tiny_models.build_tiny_dinov2_files(folder)
    augment = variant == "anylogo+aug"
    return AnyLogoConfig(method="anylogo", base_checkpoint=str(args.checkpoint), manifest=str(manifest),
                         output_dir=str(folder / "out"), image_encoder=str(weights), image_encoder_config=str(config),
                         resolution=args.resolution, subject_size=args.resolution, batch_size=args.batch,
                         steps=args.warmup + args.steps, train_layers=args.train_layers, zoom_in=augment,
                         augment_subject=augment, gradient_checkpointing=variant == "anylogo+gc",
                         checkpoint_every=10 ** 6, progress=False, resume="never", validation_count=0)


def run_plain(args, device) -> dict:
    from train.base_model import load_base

    base = load_base(args.checkpoint, device, compute_hash=False)
    gen = torch.Generator().manual_seed(0)
    side = args.resolution // 8
    x0 = torch.randn(args.batch, 4, side, side, generator=gen).to(device)
    concat = torch.randn(args.batch, 5, side, side, generator=gen).to(device)
    tokens = (args.image_resolution // 14) ** 2 + 2      # DINOv2 class + patch tokens + the scene's global token
    context = torch.randn(args.batch, tokens, 768, generator=gen).to(device)
    return time_plain_steps(base.model, args.train_layers, x0, context, args, device, concat=concat)


def run_trainer(args, folder: Path, manifest: Path, device, variant: str) -> dict:
    from train.anylogo import AnyLogoMethod
    from train.distributed import DistInfo
    from train.engine import Trainer

    trainer = Trainer(AnyLogoMethod(_config(args, folder, manifest, variant)), DistInfo(device=device))
    return time_trainer(trainer, args, folder, device)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.worker == "plain":
            result = run_plain(args, device)
        else:
            result = run_trainer(args, folder, _data(folder, args), device, args.worker)
    print(json.dumps({**result, "device": str(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-resolution", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--train-layers", default="full", choices=("full", "attention", "cross_attention"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--checkpoint", type=Path, help="base checkpoint (default: the tiny SD1.5-inpainting)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is None:
        from standalone import tiny_models

        args.checkpoint = tiny_models.build_sd15_checkpoint(
            tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15_inpainting.safetensors", inpainting=True)
    if args.worker:
        return worker(args)
    results = run_variants(__file__, VARIANTS, ["--checkpoint", str(args.checkpoint), "--resolution",
                                                str(args.resolution), "--batch", str(args.batch), "--steps",
                                                str(args.steps), "--warmup", str(args.warmup), "--threads",
                                                str(args.threads), "--train-layers", args.train_layers])
    print(f"AnyLogo training step, tiny SD1.5-inpainting UNet, {args.resolution}px (latent {args.resolution // 8}²), "
          f"batch {args.batch}, train_layers={args.train_layers}, {results['plain']['device']}, {args.threads} "
          f"thread(s); median of {args.steps} steps after {args.warmup}")
    print_table(results, args.batch)

if __name__ == "__main__":
    main()
