"""AnyLogo's ablations in miniature (Table 3: recycling vs blocked flow; Table 4: decoder vs encoder positions).

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/miniature_anylogo.py [--steps 150 --batch 4]

Data: logo-in-scene pairs built from bundled material (``standalone/logo_scenes.py``: scikit-image photos as
scenes, scikit-image's logo and Pillow letter badges as subjects pasted into a 32 px square region of a 64 px
scene). Training pairs use the logo and six letters; held-out pairs are new (photo, subject, position) draws that
include three letters never seen in training. Three runs train the tiny SD1.5-inpainting checkpoint (ComfyUI's
real UNet at 320 channels, two levels) from the same initialisation, seed and data order with the AnyLogo
trainer: (a) recycling at the decoder, (b) recycling at the encoder, both with Λ=0.6, (c) blocked flow (Λ=0).
The tiny DINOv2 (width 64) gives the image conditioning; zoom-in and augmentation are off so every row's latents
are encoded once and shared by the three runs (encoding is deterministic, so sharing changes nothing but time).
The checkpoint's VAE has random weights whose latents come out about 7.5x smaller than SD's (model-space std
~0.13 instead of ~1), which would leave the noise schedule almost no signal to learn; the runs use a copy whose
VAE latent scale is multiplied by LATENT_GAIN (its quant_conv mean channels x7.5, post_quant_conv /7.5: the
same encoder/decoder pair up to that gain). The printed "latent std" is measured on the training scenes.

Evaluation on the held-out pairs, each sampled as the nodes sample it (AnyLogo patch + inpainting conditioning +
noise mask; DDIM 20 steps, CFG 5, fixed seed per pair), (a)/(b) with complete transmission as at inference,
(c) with the flow blocked, plus (a) with its flow blocked to show it still generates (Fig. 4):
* region L1: mean |generated - target| inside the region, in the UNet's latent space (process_latent_in) — the
  VAE has random weights and does not reconstruct images, so pixel distances would measure its decoder, not the
  UNet; the target is the latent of the scene with the subject pasted;
* identified: share of pairs whose generated region is nearer (L1) to the true subject pasted there than to any
  of the other nine subjects pasted in the same place;
* region loss: the noise-prediction MSE inside the region at 8 fixed (sigma, noise) draws per pair.
For scale, the table adds what an uninformed guess scores: the mean of the ten candidates' region latents
(identification by chance: 0.10).
Prints each run's training loss (mean of the first and last 10 steps) and the table. Fixed seeds throughout.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, as in tests/conftest.py

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

SUBJECTS_SEEN, SUBJECTS_ALL = range(0, 7), range(0, 10)
LATENT_GAIN = 7.5
RUNS = {"(a) recycling, decoder": ("decoder", 0.6), "(b) recycling, encoder": ("encoder", 0.6),
        "(c) blocked flow": ("decoder", 0.0)}


def build_data(root: Path, args):
    from standalone import logo_scenes
    from train.prepare_manifest import cli

    train_pairs = logo_scenes.make_pairs(args.train_pairs, scene_size=64, region=32, subjects=SUBJECTS_SEEN,
                                         seed=0, prefix="train")
    held = logo_scenes.make_pairs(args.held_out, scene_size=64, region=32, subjects=SUBJECTS_ALL, seed=1,
                                  prefix="held")
    logo_scenes.write_pairs(root / "train", train_pairs, scene_size=64, subject_size=args.subject_size)
    logo_scenes.write_pairs(root / "held", held, scene_size=64, subject_size=args.subject_size)
    for name in ("train", "held"):
        if cli([str(root / name), "--out", str(root / name / "manifest.jsonl"), "--method", "anylogo"]) != 0:
            raise RuntimeError(f"could not build the {name} manifest")
    return root / "train" / "manifest.jsonl", root / "held" / "manifest.jsonl", held


def gained_checkpoint(root: Path) -> Path:
    """The tiny SD1.5-inpainting checkpoint with its VAE's latent scale multiplied by LATENT_GAIN."""
    import safetensors.torch

    from standalone import tiny_models

    path = root / "tiny_sd15_inpainting_gain.safetensors"
    source = tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15_inpainting.safetensors", inpainting=True)
    sd = safetensors.torch.load_file(str(source))
    for key in ("first_stage_model.quant_conv.weight", "first_stage_model.quant_conv.bias"):
        value = sd[key].float()
        value[:4] *= LATENT_GAIN  # the mean channels: ComfyUI's VAE encode returns the posterior mode
        sd[key] = value.half()
    sd["first_stage_model.post_quant_conv.weight"] = (sd["first_stage_model.post_quant_conv.weight"].float()
                                                      / LATENT_GAIN).half()
    safetensors.torch.save_file(sd, str(path))
    return path


def make_trainer(args, root: Path, manifest: Path, name: str, positions: str, threshold: float):
    from standalone import tiny_models
    from train.anylogo import AnyLogoConfig, AnyLogoMethod
    from train.distributed import DistInfo
    from train.engine import Trainer

    weights, config = tiny_models.build_tiny_dinov2_files(root)
    checkpoint = root / "tiny_sd15_inpainting_gain.safetensors"
    cfg = AnyLogoConfig(
        method="anylogo", base_checkpoint=str(checkpoint), manifest=str(manifest),
        output_dir=str(root / name.split()[0].strip("()")), image_encoder=str(weights),
        image_encoder_config=str(config), resolution=64, subject_size=args.subject_size, batch_size=args.batch,
        steps=args.steps, learning_rate=args.lr, train_layers=args.train_layers, recycling_positions=positions,
        sparse_threshold=threshold, zoom_in=False, augment_subject=False, seed=args.seed,
        checkpoint_every=10 ** 6, progress=False, resume="never", validation_count=0)
    trainer = Trainer(AnyLogoMethod(cfg), DistInfo())
    trainer.prepare()
    return trainer


def held_out_rows(manifest: Path):
    from train.anylogo_data import MANIFEST_SCHEMA, AnyLogoDataset
    from train.manifest import read_manifest

    return AnyLogoDataset(read_manifest(manifest, MANIFEST_SCHEMA).rows)


def candidate_latents(trainer, pair, scene_size=64):
    """Latents (model space) of the pair's scene with each of the ten subjects pasted in its region."""
    import numpy as np

    from standalone import logo_scenes

    out = []
    for s in SUBJECTS_ALL:
        scene, _, _ = logo_scenes.render(logo_scenes.Pair(pair.name, pair.photo, s, pair.box), scene_size, 64)
        pixels = torch.from_numpy(np.asarray(scene, dtype=np.float32) / 255.0)[None]
        with torch.no_grad():
            out.append(trainer.ctx.base.model.process_latent_in(trainer.ctx.base.vae.encode(pixels).float()))
    return torch.cat(out)


def reference_l1(pairs, candidates, regions) -> float:
    """Region L1 of the mean of the ten candidate latents: a guess that knows the scene but not the subject."""
    return statistics.mean(float((c.mean(0) - c[p.subject])[r].abs().mean())
                           for p, c, r in zip(pairs, candidates, regions))


def evaluate(trainer, held, pairs, candidates, threshold: float, args) -> dict:
    from model_patches.image_context import ImageContextPatch
    from model_patches.anylogo import RecyclingSettings
    from train.anylogo_preview import sample_insertion
    from train.anylogo_step import anylogo_forward, latent_mask
    from train.diffusion import implied_noise, noised

    method, ctx, model = trainer.method, trainer.ctx, trainer.ctx.base.model
    cfg = method.config
    l1s, hits, losses = [], 0, []
    for i, pair in enumerate(pairs):
        item = {**held[i], "index": ("held", i)}
        z0, concat, subject_latent, tokens, scene, region, _ = method.prepare(item, ctx, None)
        image_context = ImageContextPatch(method.projection, [t[None] for t in tokens], method.layout.group_of)
        settings = RecyclingSettings(positions=cfg.recycling_positions, threshold=threshold, seed=args.seed)
        latent = sample_insertion(ctx.base.patcher, ctx.base.vae, scene, region, subject_latent[None],
                                  image_context, settings, steps=20, cfg=5.0, sampler="ddim",
                                  scheduler="ddim_uniform", seed=1000 + i)
        latent = model.process_latent_in(latent)
        inside = latent_mask(region, *latent.shape[-2:]).bool().expand(4, -1, -1)
        distances = [(latent[0] - c)[inside].abs().mean() for c in candidates[i]]
        l1s.append(float(distances[pair.subject]))
        hits += int(min(range(len(distances)), key=lambda k: distances[k]) == pair.subject)
        gen = torch.Generator().manual_seed(77 + i)
        keep = None if threshold > 0 else torch.zeros(1, len(method.layout.slots), dtype=torch.bool)
        with torch.no_grad():
            for _ in range(8):
                sigma = model.model_sampling.sigmas[torch.randint(0, 1000, (1,), generator=gen)].float()
                noise = torch.randn((1,) + z0.shape, generator=gen)
                subject_noise = torch.randn((1,) + subject_latent.shape, generator=gen)
                x = noised(model, z0[None], noise, sigma)
                denoised = anylogo_forward(model, method.layout, x, sigma, concat[None], subject_latent[None],
                                           subject_noise, image_context, keep)
                error = (implied_noise(x, denoised, sigma) - noise).square()[0]
                losses.append(float(error[inside].mean()))
    return {"l1": statistics.mean(l1s), "identified": hits / len(pairs), "region_loss": statistics.mean(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-layers", default="attention", choices=("attention", "cross_attention", "full"))
    parser.add_argument("--train-pairs", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--subject-size", type=int, default=64,
                        help="side of the subject image and of its latent x8 (32 = the region's own scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, held_manifest, pairs = build_data(root, args)
        gained_checkpoint(root)
        held, shared, candidates = held_out_rows(held_manifest), {}, None
        for name, (positions, threshold) in RUNS.items():
            started = time.perf_counter()
            trainer = make_trainer(args, root, manifest, name, positions, threshold)
            trainer.method.cache = shared
            trainer.train()
            seconds = time.perf_counter() - started
            log = [json.loads(line) for line in
                   (Path(trainer.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in log if "loss" in r]
            region = [r["region_loss"] for r in log if "region_loss" in r]
            curves[name] = (statistics.mean(losses[:10]), statistics.mean(losses[-10:]),
                            statistics.mean(region[:10]), statistics.mean(region[-10:]), seconds)
            if candidates is None:
                from train.anylogo_step import latent_mask

                candidates = [candidate_latents(trainer, pair) for pair in pairs]
                regions = [latent_mask(held[i]["mask"], 8, 8).bool().expand(4, -1, -1) for i in range(len(pairs))]
                latent_std = float(torch.stack([entry[0] for entry in shared.values()]).std())
            with torch.no_grad():
                rows.append((name, "complete" if threshold > 0 else "blocked",
                             evaluate(trainer, held, pairs, candidates, 1.0 if threshold > 0 else 0.0, args)))
                if name.startswith("(a)"):
                    rows.append((name, "blocked", evaluate(trainer, held, pairs, candidates, 0.0, args)))
            del trainer
            gc.collect()

    print(f"AnyLogo miniature: tiny SD1.5-inpainting UNet, 64 px scenes (8x8 latents), {args.train_pairs} training "
          f"pairs, subject {args.subject_size} px, batch {args.batch}, {args.steps} steps, lr {args.lr}, "
          f"train_layers={args.train_layers}, seed "
          f"{args.seed}, CPU {args.threads} threads; latent std of the training scenes {latent_std:.3f}")
    print(f"{'run':<24} {'loss first10':>12} {'last10':>8} {'region first10':>15} {'last10':>8} {'train s':>8}")
    for name, (l0, l1, r0, r1, seconds) in curves.items():
        print(f"{name:<24} {l0:>12.4f} {l1:>8.4f} {r0:>15.4f} {r1:>8.4f} {seconds:>8.0f}")
    print(f"\nheld-out pairs: {args.held_out} (DDIM 20 steps, CFG 5); latent-space region metrics")
    print(f"{'run':<24} {'flow at test':>12} {'region L1':>10} {'identified':>11} {'region loss':>12}")
    for name, flow, r in rows:
        print(f"{name:<24} {flow:>12} {r['l1']:>10.4f} {r['identified']:>11.2f} {r['region_loss']:>12.4f}")
    print(f"{'reference: candidate mean':<37} {reference_l1(pairs, candidates, regions):>10.4f} {0.1:>11.2f}")


if __name__ == "__main__":
    main()
