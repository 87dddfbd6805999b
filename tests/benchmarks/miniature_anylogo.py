"""AnyLogo's ablations in miniature (Table 3: recycling vs blocked flow; Table 4: decoder vs encoder positions).

Run: COMFYUI_PATH=/opt/ComfyUI $V/bin/python tests/benchmarks/miniature_anylogo.py   (about 80 min on 2 cores)

Data (``standalone/logo_scenes.py``, bundled material only): scikit-image photos as 64 px scenes; scikit-image's
logo and Pillow letter badges as subjects, pasted into a 32 px square region. AnyLogo training pairs use the logo
and six letters; held-out pairs are new (photo, subject, position) draws that include three letters never trained
on. The model is the tiny SD1.5-inpainting checkpoint (ComfyUI's real UNet at 320 channels, two levels) with
random weights. Its VAE's latents come out about 7.5x smaller than SD's, which would leave the noise schedule
almost no signal to learn, so the runs use a copy whose latent scale is multiplied by LATENT_GAIN (quant_conv mean
channels x7.5, post_quant_conv /7.5: the same encoder/decoder pair up to that gain).

1. Base. The paper fine-tunes SD1.5-inpainting, whose self-attention already fetches matching content from
   elsewhere in an image: that correspondence is what model recycling reuses. A random UNet has none, so the base
   is first trained here on plain inpainting (no subject input: Λ=0 and every condition dropped) of "hinted"
   scenes, in which the region's subject is also pasted, visible, elsewhere in the scene (logo, six training
   letters and three letters used nowhere else). The printed copy check compares the base's region error on
   held-out scenes with and without that visible copy.
2. Three AnyLogo runs fork from the base with the same seed and data order: (a) recycling at the decoder, (b) at
   the encoder, both Λ=0.6, (c) blocked flow (Λ=0), each trained with the AnyLogo trainer; the tiny DINOv2
   (width 64) gives the image conditioning. Zoom-in and augmentation are off, so latents are encoded once and
   shared by the runs (encoding is deterministic).

Evaluation on the held-out pairs, without sampling (CFG sampling of barely trained models swung region distances
4x between settings in earlier versions of this script): the region error is the squared error, inside the
region, of the clean latent the model predicts in one step, at six high-noise timesteps (where the region is
mostly noise and only the condition can tell what belongs there) x two noises, the same for every run. Each of ten
candidate subjects is given in turn as the condition (its latent for the signatures, its DINOv2 tokens); the
table shows the error with the true subject, the mean error with the nine others, and "identified": the share of
pairs whose lowest error comes from the true subject (chance 0.10; tied candidates share the credit). (a) and (b)
are evaluated with complete transmission as at inference, (c) blocked, (a) also blocked (Fig. 4), and the base
both ways with the unconditional (zero) DINOv2 features it was trained with. Fixed seeds throughout.
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
PRETRAIN_SUBJECTS = [*SUBJECTS_SEEN, 10, 11, 12]  # never the held-out's unseen letters 7-9
EVAL_STEPS = (999, 899, 799, 699, 599, 499)  # timesteps where the region is mostly noise: the subject matters
NOISE_DRAWS = 2
LATENT_GAIN = 7.5
RUNS = {"(a) recycling, decoder": ("decoder", 0.6), "(b) recycling, encoder": ("encoder", 0.6),
        "(c) blocked flow": ("decoder", 0.0)}


def build_data(root: Path, args) -> dict:
    """Manifests (and the held-out pairs) of the four sets: pretraining scenes with a visible copy of the region's
    subject, AnyLogo training pairs, held-out pairs, and held-out hinted scenes with their plain twins."""
    import dataclasses

    from standalone import logo_scenes
    from train.prepare_manifest import cli

    held_hinted = logo_scenes.make_hint_pairs(args.held_out, scene_size=64, region=32, subjects=SUBJECTS_ALL,
                                              seed=3, prefix="held_hinted")
    sets = {
        "pretrain": logo_scenes.make_hint_pairs(args.pretrain_pairs, scene_size=64, region=32,
                                                subjects=PRETRAIN_SUBJECTS, seed=2, prefix="pretrain"),
        "train": logo_scenes.make_pairs(args.train_pairs, scene_size=64, region=32, subjects=SUBJECTS_SEEN,
                                        seed=0, prefix="train"),
        "held": logo_scenes.make_pairs(args.held_out, scene_size=64, region=32, subjects=SUBJECTS_ALL, seed=1,
                                       prefix="held"),
        "held_hinted": held_hinted,
        "held_plain": [dataclasses.replace(pair, hint=None) for pair in held_hinted],
    }
    out = {}
    for name, pairs in sets.items():
        logo_scenes.write_pairs(root / name, pairs, scene_size=64, subject_size=args.subject_size)
        if cli([str(root / name), "--out", str(root / name / "manifest.jsonl"), "--method", "anylogo"]) != 0:
            raise RuntimeError(f"could not build the {name} manifest")
        out[name] = (root / name / "manifest.jsonl", pairs)
    return out


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


def pretrained_checkpoint(root: Path, trainer) -> Path:
    """The gained checkpoint with the UNet weights the pretraining left in ``trainer``'s model."""
    import safetensors.torch

    path = root / "tiny_sd15_inpainting_pretrained.safetensors"
    sd = safetensors.torch.load_file(str(root / "tiny_sd15_inpainting_gain.safetensors"))
    for name, value in trainer.ctx.base.model.diffusion_model.state_dict().items():
        sd[f"model.diffusion_model.{name}"] = value.detach().to(torch.float32).cpu().contiguous()
    safetensors.torch.save_file(sd, str(path))
    return path


def make_trainer(args, root: Path, manifest: Path, checkpoint: Path, name: str, positions: str,
                 threshold: float, **overrides):
    from standalone import tiny_models
    from train.anylogo import AnyLogoConfig, AnyLogoMethod
    from train.distributed import DistInfo
    from train.engine import Trainer

    weights, config = tiny_models.build_tiny_dinov2_files(root)
    settings = dict(
        method="anylogo", base_checkpoint=str(checkpoint), manifest=str(manifest),
        output_dir=str(root / name), image_encoder=str(weights), image_encoder_config=str(config),
        resolution=64, subject_size=args.subject_size, batch_size=args.batch, steps=args.steps,
        learning_rate=args.lr, train_layers=args.train_layers, recycling_positions=positions,
        sparse_threshold=threshold, zoom_in=False, augment_subject=False, seed=args.seed,
        checkpoint_every=10 ** 6, progress=False, resume="never", validation_count=0)
    settings.update(overrides)
    trainer = Trainer(AnyLogoMethod(AnyLogoConfig(**settings)), DistInfo())
    trainer.prepare()
    return trainer


def held_out_rows(manifest: Path):
    from train.anylogo_data import MANIFEST_SCHEMA, AnyLogoDataset
    from train.manifest import read_manifest

    return AnyLogoDataset(read_manifest(manifest, MANIFEST_SCHEMA).rows)


def subject_pixels(index: int, size: int) -> torch.Tensor:
    import numpy as np

    from standalone import logo_scenes

    return torch.from_numpy(np.asarray(logo_scenes.subject(index, size), dtype=np.float32) / 255.0).movedim(-1, 0)


def region_errors(trainer, item: dict, subjects: list[torch.Tensor], *, read: bool, zero_tokens: bool,
                  seed: int) -> torch.Tensor:
    """Squared error of the predicted clean latent inside the region of ``item``'s scene (the one-step prediction
    of what the region holds), one value per candidate subject given as the condition (its latent for the
    recycled signatures, its DINOv2 tokens), averaged over EVAL_STEPS timesteps x NOISE_DRAWS noises that are the
    same for every candidate and every run. ``read``: complete transmission (every recycled layer reads the
    signature), else blocked flow; ``zero_tokens``: the DINOv2 features condition-dropped rows train with."""
    from model_patches.image_context import ImageContextPatch
    from train.anylogo_step import anylogo_forward
    from train.diffusion import noised

    method, ctx, model = trainer.method, trainer.ctx, trainer.ctx.base.model
    z0, concat, _, _, _, _, _ = method.prepare(item, ctx, None)
    conditions = [method.prepare({**item, "subject": pixels, "subject_mask": None,
                                  "index": (item["index"], "candidate", k)}, ctx, None)
                  for k, pixels in enumerate(subjects)]
    count = len(subjects)
    subject_latents = torch.stack([c[2] for c in conditions])
    tokens = [torch.stack([c[3][g] for c in conditions]) for g in range(len(conditions[0][3]))]
    if zero_tokens:
        tokens = [torch.zeros_like(t) for t in tokens]
    image_context = ImageContextPatch(method.projection, tokens, method.layout.group_of)
    keep = None if read else torch.zeros(count, len(method.layout.slots), dtype=torch.bool)
    inside = concat[:1].bool().expand(4, -1, -1)
    gen = torch.Generator().manual_seed(seed)
    totals = torch.zeros(count)
    for t in EVAL_STEPS:
        sigma = model.model_sampling.sigmas[t].float().expand(count)
        for _ in range(NOISE_DRAWS):
            noise = torch.randn(z0.shape, generator=gen).expand(count, -1, -1, -1)
            subject_noise = torch.randn(subject_latents.shape[1:], generator=gen).expand(count, -1, -1, -1)
            x = noised(model, z0.expand(count, -1, -1, -1), noise, sigma)
            denoised = anylogo_forward(model, method.layout, x, sigma, concat.expand(count, -1, -1, -1),
                                       subject_latents, subject_noise, image_context, keep)
            totals += (denoised.float() - z0).square()[:, inside].mean(1)
    return totals / (len(EVAL_STEPS) * NOISE_DRAWS)


def evaluate(trainer, held, pairs, candidates, *, read: bool, zero_tokens: bool = False) -> dict:
    """Per held-out pair: region error with the true subject as the condition, mean region error with the nine
    other subjects, and whether the true subject gives the lowest error of the ten (identified)."""
    true, other, hits = [], [], 0.0
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            losses = region_errors(trainer, {**held[i], "index": ("held", i)}, candidates, read=read,
                                   zero_tokens=zero_tokens, seed=77 + i)
            true.append(float(losses[pair.subject]))
            other.append(float(torch.cat([losses[:pair.subject], losses[pair.subject + 1:]]).mean()))
            # ties share the credit; identical rows of one batch can differ in the last bits, hence the 1e-6
            lowest = losses <= losses.min() * (1 + 1e-6)
            hits += float(lowest[pair.subject]) / int(lowest.sum())
    return {"true": statistics.mean(true), "other": statistics.mean(other), "identified": hits / len(pairs)}


def copy_gain(trainer, hinted, plain) -> tuple[float, float]:
    """Region error of the pretrained base (blocked flow, no condition) on held-out scenes whose subject is also
    visible elsewhere (``hinted``) and on the same scenes without that copy (``plain``)."""
    out = []
    with torch.no_grad():
        for rows, tag in ((hinted, "hinted"), (plain, "plain")):
            losses = [float(region_errors(trainer, {**rows[i], "index": (tag, i)}, [rows[i]["subject"]],
                                          read=False, zero_tokens=True, seed=177 + i)[0])
                      for i in range(len(rows))]
            out.append(statistics.mean(losses))
    return out[0], out[1]


def training_curve(trainer) -> tuple[float, float, float, float]:
    log = [json.loads(line) for line in (Path(trainer.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    region = [r["region_loss"] for r in log if "region_loss" in r]
    return (statistics.mean(losses[:10]), statistics.mean(losses[-10:]), statistics.mean(region[:10]),
            statistics.mean(region[-10:]))


def report(*row) -> None:
    """One result as soon as it exists (a full run takes about 80 minutes on two cores)."""
    print("  ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=500,
                        help="inpainting steps of the base on scenes with a visible copy of the region (0: none)")
    parser.add_argument("--pretrain-pairs", type=int, default=96)
    parser.add_argument("--pretrain-lr", type=float, default=5e-4)
    parser.add_argument("--pretrain-layers", default="attention", choices=("attention", "full"),
                        help="attention: from the random initialisation this learns far faster than full")
    parser.add_argument("--steps", type=int, default=300, help="AnyLogo steps of each of the three runs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-layers", default="attention", choices=("attention", "cross_attention", "full"))
    parser.add_argument("--train-pairs", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=24)
    parser.add_argument("--subject-size", type=int, default=32,
                        help="side of the subject image (32 = the region's own scale; 64 = twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, curves, shared = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_data(root, args)
        base = gained_checkpoint(root)
        held, pairs = held_out_rows(data["held"][0]), data["held"][1]
        candidates = [subject_pixels(k, args.subject_size) for k in SUBJECTS_ALL]
        if args.pretrain_steps:
            started = time.perf_counter()
            trainer = make_trainer(args, root, data["pretrain"][0], base, "base", "decoder", 0.0,
                                   steps=args.pretrain_steps, learning_rate=args.pretrain_lr,
                                   train_layers=args.pretrain_layers,
                                   condition_dropout=1.0)
            trainer.train()
            curves["base (pretraining)"] = training_curve(trainer) + (time.perf_counter() - started,)
            report("base (pretraining)", *curves["base (pretraining)"])
            hinted, plain = copy_gain(trainer, held_out_rows(data["held_hinted"][0]),
                                      held_out_rows(data["held_plain"][0]))
            print(f"base on held-out scenes, region error: subject also visible elsewhere {hinted:.4f}, not "
                  f"visible {plain:.4f} (lower with the copy = its self-attention fetches it)", flush=True)
            for read in (False, True):
                rows.append(("base, no AnyLogo training", "complete" if read else "blocked",
                             evaluate(trainer, held, pairs, candidates, read=read, zero_tokens=True)))
                report(*rows[-1])
            # the pretraining rows' cache keys (dataset indices) would collide with the AnyLogo set's
            shared.update({k: v for k, v in trainer.method.cache.items() if not isinstance(k[0], int)})
            base = pretrained_checkpoint(root, trainer)
            del trainer
            gc.collect()
        for name, (positions, threshold) in RUNS.items():
            started = time.perf_counter()
            trainer = make_trainer(args, root, data["train"][0], base, name.split()[0].strip("()"), positions,
                                   threshold)
            trainer.method.cache = shared
            trainer.train()
            curves[name] = training_curve(trainer) + (time.perf_counter() - started,)
            report(name, *curves[name])
            rows.append((name, "complete" if threshold > 0 else "blocked",
                         evaluate(trainer, held, pairs, candidates, read=threshold > 0)))
            report(*rows[-1])
            if name.startswith("(a)"):
                rows.append((name, "blocked", evaluate(trainer, held, pairs, candidates, read=False)))
                report(*rows[-1])
            del trainer
            gc.collect()

    print(f"AnyLogo miniature: tiny SD1.5-inpainting UNet, 64 px scenes (8x8 latents), 32 px regions, subject "
          f"{args.subject_size} px; base pretraining {args.pretrain_steps} steps (lr {args.pretrain_lr}, "
          f"{args.pretrain_pairs} hinted scenes, {args.pretrain_layers}); AnyLogo runs {args.steps} steps, "
          f"{args.train_pairs} pairs, batch {args.batch}, lr {args.lr}, train_layers={args.train_layers}; "
          f"seed {args.seed}, CPU {args.threads} threads")
    print(f"{'run':<26} {'loss first10':>12} {'last10':>8} {'region first10':>15} {'last10':>8} {'train s':>8}")
    for name, (l0, l1, r0, r1, seconds) in curves.items():
        print(f"{name:<26} {l0:>12.4f} {l1:>8.4f} {r0:>15.4f} {r1:>8.4f} {seconds:>8.0f}")
    if args.pretrain_steps:
        print(f"\nbase on held-out scenes, region error: subject also visible elsewhere {hinted:.4f}, "
              f"not visible {plain:.4f}")
    print(f"\nheld-out pairs: {args.held_out}; region error = squared error of the predicted clean latent in the "
          f"region at t in {EVAL_STEPS} x {NOISE_DRAWS} noises; identified = the true subject gives the lowest "
          "error of 10 candidates (chance 0.10)")
    print(f"{'run':<26} {'flow at test':>12} {'true subject':>13} {'other subjects':>15} {'identified':>11}")
    for name, flow, r in rows:
        print(f"{name:<26} {flow:>12} {r['true']:>13.4f} {r['other']:>15.4f} {r['identified']:>11.2f}")


if __name__ == "__main__":
    main()
