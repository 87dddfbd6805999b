"""Trainer step cost against a plain denoising step on the same UNet and batch, with and without checkpointing.

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/bench_train_step.py [--resolution 128 --batch 2]

Variants, each in a fresh process (so peak memory is its own):
  plain     a hand-written loop: latents and text embeddings computed once, torch.randn noise, apply_model,
            epsilon-MSE, backward, AdamW on the same parameters the finetune trains (attention projections);
  trainer   the engine running the finetune method (per-sample generators, cached encoders, clipping, LR
            schedule, NaN guard, metrics line per step);
  trainer+gc  the same with gradient_checkpointing.
Reported: median wall time per optimizer step after warm-up (one torch thread on the CPU), samples/s, the
ratio to plain, bytes the autograd graph saves for backward in one training forward (saved_tensors_hooks;
what checkpointing trades for recomputation), and the peak memory growth over the timed steps above what was
allocated before them (weights, optimizer state, caches): CUDA max_memory_allocated, or on the CPU the RSS
high-water mark (VmHWM after malloc_trim and a reset through /proc/self/clear_refs; Linux only).
On the tiny UNet (320 channels, 2 levels) at small sizes this is a plumbing-cost measurement, not SD1.5's.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, as in tests/conftest.py

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

VARIANTS = ("plain", "trainer", "trainer+gc")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device) -> int:
    """Start measuring: CUDA resets its peak counter; on the CPU, glibc returns freed heap to the system and the
    kernel's RSS high-water mark is reset to the current RSS (Linux /proc/self/clear_refs). Returns the base."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kb("VmRSS:") * 1024


def _peak_growth(device, base: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _rss_kb("VmHWM:") * 1024 - base


def _saved_bytes(fn, module: torch.nn.Module) -> int:
    """Bytes of distinct storages, other than ``module``'s parameters, that autograd keeps for backward while
    ``fn`` runs its forward (the activations)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def _dataset(folder: Path, count: int, size: int) -> Path:
    from PIL import Image

    from train.prepare_manifest import build_rows, write_manifest
    from train.finetune import FinetuneMethod

    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        image = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(image).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a photo number {i}")
    rows, _ = build_rows(folder, FinetuneMethod.folder_layout)
    return write_manifest(rows, folder / "manifest.jsonl")


def _config(args, folder: Path, manifest: Path, gradient_checkpointing: bool):
    from train.finetune import FinetuneConfig

    return FinetuneConfig(method="finetune", base_checkpoint=str(args.checkpoint), manifest=str(manifest),
                          output_dir=str(folder / "out"), steps=args.warmup + args.steps, batch_size=args.batch,
                          resolution=args.resolution, checkpoint_every=10 ** 6, progress=False,
                          gradient_checkpointing=gradient_checkpointing, learning_rate=1e-5)


def run_plain(args, folder, manifest, device) -> dict:
    from train.base_model import load_base
    from train.finetune import FinetuneMethod, ImageCaptionDataset
    from train.manifest import read_manifest

    base = load_base(args.checkpoint, device, compute_hash=False)
    rows = read_manifest(manifest, FinetuneMethod.manifest_schema).rows
    data = ImageCaptionDataset(rows, args.resolution)
    with torch.no_grad():
        pixels = torch.stack([data[i]["pixels"] for i in range(args.batch)])
        x0 = base.model.process_latent_in(base.vae.encode(pixels)).to(device)
        context = torch.cat([base.clip.encode_from_tokens(base.clip.tokenize(data[i]["caption"]))
                             for i in range(args.batch)]).to(device)
    return time_plain_steps(base.model, "attention", x0, context, args, device)


def time_plain_steps(model, train_layers: str, x0, context, args, device, concat=None) -> dict:
    """A hand-written denoising step on fixed latents (eps-MSE, backward, AdamW on the ``train_layers`` UNet
    weights), timed over ``args.steps`` after ``args.warmup``, with the same memory measurements as the engine."""
    from train.finetune import LAYER_SETS

    params = [p for n, p in model.named_parameters()
              if n.startswith("diffusion_model.") and any(m in n for m in LAYER_SETS[train_layers])]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    sigmas = model.model_sampling.sigmas

    def loss_fn():
        noise = torch.randn_like(x0)
        sigma = sigmas[torch.randint(0, len(sigmas), (x0.shape[0],))].to(device)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        denoised = model.apply_model(x, sigma, c_concat=concat, c_crossattn=context, transformer_options={})
        return torch.nn.functional.mse_loss((x - denoised) / sigma.view(-1, 1, 1, 1), noise)

    times, base_bytes = [], 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            base_bytes = _reset_peak(device)
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = _peak_growth(device, base_bytes)
    return {"step_s": statistics.median(times[args.warmup:]), "peak_bytes": peak,
            "saved_bytes": _saved_bytes(loss_fn, model)}


def run_trainer(args, folder, manifest, device, gradient_checkpointing: bool) -> dict:
    from train.distributed import DistInfo
    from train.engine import Trainer
    from train.finetune import FinetuneMethod

    trainer = Trainer(FinetuneMethod(_config(args, folder, manifest, gradient_checkpointing)),
                      DistInfo(device=device))
    return time_trainer(trainer, args, folder, device)


def time_trainer(trainer, args, folder, device) -> dict:
    """Median engine step time (from metrics.jsonl) after ``args.warmup`` steps, peak memory growth over the timed
    steps, and the bytes autograd saves for backward in one training forward of ``args.batch`` samples."""
    from train.randomness import SampleRandom

    trainer.prepare()
    trainer.cfg.steps = args.warmup          # warm-up: optimizer state and the input caches get allocated
    trainer.train()
    trainer.start_step, trainer.cfg.steps = args.warmup, args.warmup + args.steps
    base_bytes = _reset_peak(device)
    trainer.train()
    peak = _peak_growth(device, base_bytes)
    log = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_s"] for r in log if "step_s" in r and r["step"] > args.warmup]
    batch = trainer.method.collate([trainer.dataset[i] for i in range(args.batch)])
    rng = SampleRandom(0, 0, range(args.batch), device)
    saved = _saved_bytes(lambda: trainer.method.training_loss(batch, trainer.ctx, rng)[0], trainer.ctx.base.model)
    return {"step_s": statistics.median(times), "peak_bytes": peak, "saved_bytes": saved}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = _dataset(folder, args.batch, args.resolution)
        if args.worker == "plain":
            result = run_plain(args, folder, manifest, device)
        else:
            result = run_trainer(args, folder, manifest, device, args.worker == "trainer+gc")
    print(json.dumps({**result, "device": str(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--checkpoint", type=Path, help="base checkpoint (default: the tiny SD1.5)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is None:
        from standalone import tiny_models

        args.checkpoint = tiny_models.build_sd15_checkpoint(
            tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors")
    if args.worker:
        return worker(args)
    results = run_variants(__file__, VARIANTS, ["--checkpoint", str(args.checkpoint), "--resolution",
                                                str(args.resolution), "--batch", str(args.batch), "--steps",
                                                str(args.steps), "--warmup", str(args.warmup), "--threads",
                                                str(args.threads)])
    print(f"finetune step, tiny SD1.5 UNet, {args.resolution}px (latent {args.resolution // 8}²), batch "
          f"{args.batch}, {results['plain']['device']}, {args.threads} thread(s); median of {args.steps} steps "
          f"after {args.warmup}")
    print_table(results, args.batch)


def run_variants(script: str, variants, arguments: list[str]) -> dict:
    """Each variant in a fresh process of ``script --worker VARIANT`` (so peak memory is its own): its JSON."""
    results = {}
    for variant in variants:
        out = subprocess.run([sys.executable, script, "--worker", variant, *arguments], capture_output=True,
                             text=True, check=False, cwd=PACK_ROOT)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def print_table(results: dict, batch: int) -> None:
    print(f"{'variant':<12} {'s/step':>8} {'samples/s':>10} {'x plain':>8} {'saved for bwd MB':>17} "
          f"{'peak growth MB':>15}")
    plain = results["plain"]["step_s"]
    for variant, r in results.items():
        print(f"{variant:<12} {r['step_s']:>8.3f} {batch / r['step_s']:>10.2f} {r['step_s'] / plain:>8.2f} "
              f"{r['saved_bytes'] / 2**20:>17.1f} {r['peak_bytes'] / 2**20:>15.1f}")

if __name__ == "__main__":
    main()
