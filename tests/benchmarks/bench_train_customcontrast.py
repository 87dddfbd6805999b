"""CustomContrast trainer step cost against a plain denoising step on the same UNet and batch, and the MFI
encoder's forward time at the paper's size.

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_train_customcontrast.py [--batch 4]

Variants, each in a fresh process (so peak memory is its own), on the tiny SD1.5 checkpoint at 64 px:
  plain        a hand-written loop: one UNet pass on fixed latents with a 77-token context, eps-MSE, backward,
               AdamW on the UNet's cross-attention projections (a backward through the whole UNet, as
               CustomContrast's K_v/V_v and S+ need);
  customcontrast     the engine running the CustomContrast method (cached inputs): the MFI encoder at each
               sample's timestep, the caption encoded once per cross-attention layer and sample with that
               layer's S+ (through the text encoder, with gradients), the decoupled visual attention, the
               location recorder, CSCL + MACL + L_loc; UNet, text encoder and CLIP vision frozen;
  customcontrast+gc  the same with gradient_checkpointing.
The text encoder is the tiny checkpoint's random CLIP-L cut to ``--text-layers`` blocks (default 2; 12 is the
real depth, about 6x the text cost): S+ puts l = 16 text-encoder passes per sample into every step, which on
the tiny UNet dominates. Then the MFI encoder alone (paper size: width 768, 4 Perceiver layers per Q-Former,
16 S+ layers, 16 visual tokens, 3 CLIP ViT-L layers of 257 tokens): ``encode_image`` (once per subject) and
``forward_step`` (once per sampling step), median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_train_step import print_table, run_variants, time_plain_steps, time_trainer  # also boots the host

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the tiny CustomContrast data
VARIANTS = ("plain", "customcontrast", "customcontrast+gc")


def run_plain(args, device) -> dict:
    from train.base_model import load_base

    base = load_base(args.checkpoint, device, compute_hash=False)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, 8, 8, generator=gen).to(device)
    context = torch.randn(args.batch, 77, 768, generator=gen).to(device)
    return time_plain_steps(base.model, "cross_attention", x0, context, args, device)


def run_trainer(args, folder: Path, device, variant: str) -> dict:
    from customcontrast_tiny import write_config, write_files
    from train.config import parse_command_line
    from train.customcontrast import CustomContrastConfig, CustomContrastMethod
    from train.distributed import DistInfo
    from train.engine import Trainer

    class Cut(CustomContrastMethod):
        def build(self, ctx):
            from standalone.tiny_models import shallow_text_encoder

            shallow_text_encoder(ctx.base.clip, args.text_layers)
            return super().build(ctx)

    files = write_files(folder / "data")
    cfg = write_config(folder / "cfg.yaml", {"checkpoints": args.checkpoint.parent}, files,
                       batch_size=args.batch, steps=args.warmup + args.steps, checkpoint_every=10 ** 6,
                       gradient_checkpointing=variant.endswith("+gc"), method="customcontrast",
                       base_checkpoint=str(args.checkpoint))
    config, _ = parse_command_line(CustomContrastConfig, ["--config", str(cfg), "--output_dir",
                                                          str(folder / "out")])
    return time_trainer(Trainer(Cut(config), DistInfo(device=device)), args, folder, device)


def encoder_times(args, device) -> dict:
    from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder

    encoder = MFIEncoder(EncoderConfig(feature_dim=3 * 1024, layers=16)).to(device).eval()
    features = torch.randn(1, 257, 3 * 1024, device=device)
    timestep = torch.tensor([500.0], device=device)
    image, step = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            state = encoder.encode_image(features)
            image.append(time.perf_counter() - start)
            start = time.perf_counter()
            encoder.forward_step(state, timestep)
            step.append(time.perf_counter() - start)
    return {"parameters": sum(p.numel() for p in encoder.parameters()),
            "encode_image_s": statistics.median(image[1:]), "forward_step_s": statistics.median(step[1:])}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "plain":
            result = run_plain(args, device)
        elif args.worker == "encoder":
            result = encoder_times(args, device)
        else:
            result = run_trainer(args, Path(tmp), device, args.worker)
    print(json.dumps({**result, "device": str(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="global batch (>= 2 subjects x 2 views)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--text-layers", type=int, default=2, help="text-encoder blocks kept (12 = CLIP-L)")
    parser.add_argument("--repeats", type=int, default=3, help="MFI encoder timings")
    parser.add_argument("--checkpoint", type=Path, help="base checkpoint (default: the tiny SD1.5)")
    parser.add_argument("--worker", choices=VARIANTS + ("encoder",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = 64
    if args.checkpoint is None:
        from standalone import tiny_models

        args.checkpoint = tiny_models.build_sd15_checkpoint(
            tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors")
    if args.worker:
        return worker(args)
    common = ["--checkpoint", str(args.checkpoint), "--batch", str(args.batch), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads), "--text-layers", str(args.text_layers),
              "--repeats", str(args.repeats)]
    results = run_variants(__file__, VARIANTS, common)
    print(f"CustomContrast training step, tiny SD1.5 UNet, 64px (latent 8²), batch {args.batch}, text encoder "
          f"{args.text_layers} block(s), {results['plain']['device']}, {args.threads} thread(s); median of "
          f"{args.steps} steps after {args.warmup}")
    print_table(results, args.batch)
    enc = run_variants(__file__, ("encoder",), common)["encoder"]
    print(f"MFI encoder, paper size ({enc['parameters'] / 1e6:.1f}M parameters), one subject, {enc['device']}: "
          f"encode_image {enc['encode_image_s'] * 1e3:.1f} ms, forward_step {enc['forward_step_s'] * 1e3:.1f} ms "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
