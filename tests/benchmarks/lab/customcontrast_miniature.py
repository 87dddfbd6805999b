"""CustomContrast miniature: do CSCL + MACL make a subject's views embed closer together than different subjects
(seed 003's t-SNE claim, Fig. 6), compared with L_LDM alone?

Every arm trains, from the same seeded initialisation and on the same batches, timesteps and noises, the MFI
encoder and K_v/V_v on the pretrained micro base (``micro_base``; UNet and text encoder frozen) through
``train.customcontrast_step.customcontrast_loss`` — the trainer's own Eq. 9 with the Apply node's patch
(``BatchPatch``), per-layer S+ through ComfyUI's CLIP object, the decoupled visual attention. Arms:

  ldm   λ1 = 0 (L_LDM alone);
  mcl   λ1 = --lambda1 (default the paper's 1e-2): L_LDM + λ1 (CSCL + MACL);
  macl, cscl   one of the two terms only (the paper's Table 4 ablates them so);
  mcl_other, cscl_other   as mcl / cscl with the trainer's ``cscl_negatives: other_subjects`` (a subject's other
               view is not one of CSCL's negatives; not the paper's Eq. 4 as printed).
λ2 = 0 in both (L_loc is not what is asked about). τ 0.07, MACL's r clamp 0.25 as in the trainer.

Data: textured glyphs (``subjects.textured_subject``) as subjects; a *view* of a subject is the glyph flipped or
not, with its grey levels scaled and shifted (gain 0.75–1, offset ±0.15) and moved by up to 1 px inside its crop,
placed at an even position on its own background (16 px scene = its own 4x8x8 latent); the encoder sees the
view's crop (micro DINOv2, layers 2,3,4 concatenated, 28 px); MACL's appearance embedding is the crop's last-layer
class token (the stand-in for CLIP's image embedding). Each step: ``--subjects`` training subjects x 2 views.
Caption "a photo of a sks".

Measure, on 32 held-out subjects x 4 views (indices the training range never reaches), at timestep 500: the
ratio mean intra-subject / mean inter-subject cosine distance of (a) S+ (per-layer cosine distance averaged over
layers), (b) the textual CLS token, (c) the visual CLS token. Lower = views of a subject closer together than
different subjects. Reported per seed, mean ± sd over seeds, and the paired difference mcl - ldm.

  COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/customcontrast_miniature.py --quick
  COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/customcontrast_miniature.py --out results/ --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[3]))  # the pack root, behind ComfyUI
from standalone.host import bootstrap  # noqa: E402

bootstrap()
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/benchmarks: the lab package

from lab import subjects as S  # noqa: E402
from lab.micro_base import pretrained_base  # noqa: E402
from lab.micro_models import MICRO_DINOV2_RESOLUTION, build_micro_image_encoder  # noqa: E402

CAPTION = "a photo of a sks"
HELD_SUBJECTS, HELD_VIEWS = 32, 4


def view(subject: int, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scene latent [4, 8, 8], latent mask [8, 8], crop pixels [1, 8, 8]) of view ``index`` of ``subject``."""
    g = torch.Generator().manual_seed(subject * 7919 + index * 104729 + 17)
    glyph = S.textured_subject(subject)
    if torch.rand((), generator=g) < 0.5:
        glyph = glyph.flip(-1)
    gain = 0.75 + 0.25 * float(torch.rand((), generator=g))
    offset = 0.3 * float(torch.rand((), generator=g)) - 0.15
    glyph = (glyph * gain + offset).clamp(-1, 1)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    glyph = torch.roll(glyph, (dy, dx), dims=(-2, -1))
    y, x = (int(v) * S.BLOCK for v in torch.randint(0, (S.SCENE_PX - S.SUBJECT_PX) // S.BLOCK + 1, (2,),
                                                     generator=g))
    scene = S.place(S.background(3_000_000 + subject * 16 + index), glyph, y, x)
    mask = F.avg_pool2d(S.box_mask(scene.shape[-2:], y, x)[None], S.BLOCK)[0, 0]
    return S.space_to_depth(scene), mask, glyph


class Views:
    """Encoder inputs of views, computed once (the image encoder is frozen)."""

    def __init__(self, encoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, subject: int, index: int):
        key = (subject, index)
        if key not in self.cache:
            from image_ops.hierarchical_encode import encode_dinov2_hierarchical

            latent, mask, crop = view(subject, index)
            with torch.no_grad():
                embeds = encode_dinov2_hierarchical(self.encoder, S.as_rgb01(crop)[None], layers="2,3,4",
                                                    size=MICRO_DINOV2_RESOLUTION)
            features = embeds.concatenated()[0].float()
            self.cache[key] = (latent, mask, features, embeds.groups[-1][0, 0].float())
        return self.cache[key]


def inputs_of(views: Views, pairs, prompt, clip_context):
    from train.customcontrast_step import StepInputs

    rows = [views(s, v) for s, v in pairs]
    z0, masks, features, appearance = (torch.stack([r[k] for r in rows]) for k in range(4))
    ids = torch.tensor([s for s, _ in pairs])
    return StepInputs(z0, masks, features, appearance, ids, [prompt] * len(pairs),
                      clip_context.expand(len(pairs), -1, -1))


def distance_ratios(encoder, views: Views) -> dict:
    """intra / inter mean cosine distance of S+, text CLS and visual CLS on the held-out views, at t = 500."""
    subjects = list(S.HELD_OUT_SUBJECTS[:HELD_SUBJECTS])
    pairs = [(s, 1000 + v) for s in subjects for v in range(HELD_VIEWS)]
    features = torch.stack([views(s, v)[2] for s, v in pairs])
    with torch.no_grad():
        out = encoder.forward_step(encoder.encode_image(features), torch.tensor([500.0]))
    ids = torch.tensor([s for s, _ in pairs])
    same = ids[:, None] == ids[None, :]
    off = ~torch.eye(len(ids), dtype=torch.bool)

    def ratio(dist):
        return float(dist[same & off].mean() / dist[~same].mean())

    s = F.normalize(out.s_plus.float(), dim=-1)
    splus = 1 - torch.einsum("ild,jld->ijl", s, s).mean(-1)
    cos = lambda t: 1 - F.normalize(t.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T  # noqa: E731
    return {"splus": ratio(splus), "text_cls": ratio(cos(out.text_cls)), "visual_cls": ratio(cos(out.visual_cls))}


def run_arm(arm: str, seed: int, args, base) -> dict:
    from model_patches.customcontrast import VisualAttention
    from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
    from model_patches.customcontrast_text import PlaceholderPrompt
    from model_patches.unet_layout import transformer_slots
    from train.customcontrast_step import LossWeights, batch_patch, customcontrast_loss

    model, patcher, clip, views, context = base
    slots = transformer_slots(model)
    config = EncoderConfig(feature_dim=3 * 32, layers=len(slots), dim=64, token_dim=64, visual_tokens=4, depth=2,
                           heads=4, fourier_bands=16)
    torch.manual_seed(seed)
    encoder, visual = MFIEncoder(config), VisualAttention(slots, 64)
    prompt = PlaceholderPrompt.of(clip, CAPTION, "sks")
    patch, patched = batch_patch(patcher, slots, encoder, visual, prompt)
    terms = {"mcl": ("cscl", "macl"), "macl": ("macl",), "cscl": ("cscl",)}.get(arm.removesuffix("_other"), ())
    weights = LossWeights(contrastive=args.lambda1 if terms else 0.0, location=0.0, terms=terms,
                          cscl_negatives="other_subjects" if arm.endswith("_other") else "all")
    params = list(encoder.parameters()) + list(visual.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    before = distance_ratios(encoder, views)
    g = torch.Generator().manual_seed(10_000 + seed)   # the same batches, timesteps and noises in every arm
    sigmas = model.model_sampling.sigmas
    start, log = time.time(), []
    for step in range(1, args.steps + 1):
        picked = torch.randperm(args.pool, generator=g)[:args.subjects].tolist()
        pairs = [(S.TRAIN_SUBJECTS[i], int(v)) for i in picked
                 for v in torch.randperm(8, generator=g)[:2].tolist()]
        inputs = inputs_of(views, pairs, prompt, context)
        sigma = sigmas[torch.randint(0, len(sigmas), (len(pairs),), generator=g)].float()
        noise = torch.randn(inputs.z0.shape, generator=g)
        loss, parts = customcontrast_loss(patch, patched, inputs, sigma, noise, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, **{k: float(v) for k, v in parts.items()}, "s": round(time.time() - start, 1)}
            log.append(row)
            print(f"[{arm} seed {seed}] {row}", flush=True)
    return {"arm": arm, "seed": seed, "steps": args.steps, "lambda1": weights.contrastive, "before": before,
            "after": distance_ratios(encoder, views), "log": log, "seconds": round(time.time() - start, 1)}


def print_table(results: list[dict]) -> None:
    keys = ("splus", "text_cls", "visual_cls")
    print("intra/inter cosine-distance ratio on held-out subjects (lower = views of a subject closer together)")
    print(f"{'arm':<10} {'seeds':>5} " + " ".join(f"{k:>18}" for k in keys))
    by_arm = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    init = [r["before"] for r in results]
    if init:
        print(f"{'init':<10} {len(init):>5} " + " ".join(f"{statistics.mean(b[k] for b in init):>18.4f}" for k in keys))

    def fmt(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    for arm, runs in sorted(by_arm.items()):
        print(f"{arm:<10} {len(runs):>5} " + " ".join(f"{fmt([r['after'][k] for r in runs.values()]):>18}"
                                                    for k in keys))
    for arm in sorted(set(by_arm) - {"ldm"}):
        seeds = sorted(set(by_arm.get("ldm", {})) & set(by_arm[arm]))
        if seeds:
            diffs = {k: [by_arm[arm][s]["after"][k] - by_arm["ldm"][s]["after"][k] for s in seeds] for k in keys}
            print(f"{arm + '-ldm':<13} {len(seeds):>2} " + " ".join(f"{fmt(diffs[k]):>18}" for k in keys)
                  + "   (paired, per seed)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="ldm,mcl")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--subjects", type=int, default=8, help="subjects per step (x 2 views)")
    parser.add_argument("--pool", type=int, default=512, help="training subjects drawn from")
    parser.add_argument("--lambda1", type=float, default=1e-2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="", help="folder of the pretrained micro base (default: --out)")
    parser.add_argument("--out", default="", help="one JSON per (arm, seed); reruns skip those present")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 20 steps")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.log_every = "0", 20, 10
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("customcontrast_*.json"))] if out else []
    if args.table_only:
        return print_table(results)
    from train.text_gradients import enable_text_gradients

    model, patcher, clip = pretrained_base(args.cache or (str(out) if out else "."), log=print)
    enable_text_gradients(clip)   # S+ trains through the text encoder
    with torch.no_grad():
        context = clip.encode_from_tokens(clip.tokenize(CAPTION)).float()
    base = (model, patcher, clip, Views(build_micro_image_encoder(seed=0)), context)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            path = out / f"customcontrast_{arm}_seed{seed}.json" if out else None
            if path and path.exists():
                continue
            result = run_arm(arm, seed, args, base)
            results.append(result)
            if path:
                path.write_text(json.dumps(result, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
