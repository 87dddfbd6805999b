"""P3S's selective-generation claim in the lab: one photo, two look-alikes, a click on one.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/p3s_miniature.py --quick
    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/p3s_miniature.py --out RESULTS [--table-only]

Per seed, a 24 px photo holds the clicked subject A (a textured glyph of the held-out range) at (8, 2) and its
look-alike B (A mirrored left-right) at (8, 14) on a smooth background. The frozen pretrained micro base
(``micro_base``) gets the pack's P3S patch (``P3SPatch``: injection copy built from the base, RNGR encoder, Eq. 7
widening, cross-attention enhancement) and the copy + RNGR train with the trainer's own
``P3SMethod.training_loss`` (L_LDM + 0.1·L_ac, 10 % condition dropout, "a photo of sks toy"). Arms:

* ``removal`` — the RNGR negatives removal: B's box (given as the mask, see below) filled by the pack's OpenCV
  inpainting (``removed_negatives``), that image is the training image and the reference I';
* ``none``    — no negative: the photo as it is (both look-alikes) is the training image and the reference.

Evaluation: ComfyUI's sampler (euler, 20 steps, CFG 5, "a photo of sks toy" against "") on the patched model
(the paper's ε_t curve) and, as a control, on the unpatched base; squared error of A's box to A and of B's box to
B in the generated images. The paper's claim: with the removal the copy reproduces A and not B.

Point-to-mask: the lab's CLIP vision is a random micro CLIP (``standalone.tiny_models``); the pack's
point-to-mask ranks patches by similarity of its tokens to the clicked patch's, which with random weights is a
similarity of raw local pixel statistics, not of objects. Its mask for a click on B (and on A as the negative)
is computed and its IoU with B's box reported, but the training uses B's box as the ready mask (the trainer's
``negatives_mask`` input), so the result does not depend on a random encoder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

LAB_PARENT = Path(__file__).resolve().parents[1]
PACK_ROOT = Path(__file__).resolve().parents[3]
sys.path.append(str(PACK_ROOT))
sys.path.append(str(LAB_PARENT))

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from image_ops import vision_features as vf  # noqa: E402
from image_ops.p3s_reference import removed_negatives  # noqa: E402
from image_ops.point_features import squash_to_square  # noqa: E402
from lab import evaluation, subjects as S  # noqa: E402
from lab.micro_base import CLASS_WORD, pretrained_base  # noqa: E402
from model_patches.p3s_copy import InjectionCopy  # noqa: E402
from model_patches.p3s_rngr import RNGREncoder  # noqa: E402
from model_patches.unet_layout import transformer_slots  # noqa: E402
from standalone.tiny_models import tiny_clip_vision  # noqa: E402
from train.diffusion import TextCache  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.p3s import P3SConfig, P3SMethod, negatives_mask_from_points  # noqa: E402
from train.randomness import SampleRandom  # noqa: E402

ARMS = {"removal": "negatives removed (B inpainted)", "none": "no removal (both look-alikes)"}
PHOTO_PX, A_POS, B_POS = 24, (8, 2), (8, 14)


def photo(seed: int) -> dict:
    glyph = S.textured_subject(S.HELD_OUT_SUBJECTS[200 + seed])
    look_alike = glyph.flip(-1)
    coarse = torch.nn.functional.interpolate(S.background(9_800_000 + seed)[None], size=(PHOTO_PX, PHOTO_PX),
                                             mode="bilinear", align_corners=False)[0]
    pixels = S.place(S.place(coarse, glyph, *A_POS), look_alike, *B_POS)
    return {"pixels": pixels, "a": glyph, "b": look_alike, "a_mask": S.box_mask((PHOTO_PX, PHOTO_PX), *A_POS),
            "b_mask": S.box_mask((PHOTO_PX, PHOTO_PX), *B_POS)}


def rgb01(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels + 1) / 2).clamp(0, 1).expand(3, -1, -1).contiguous()


def point_mask_iou(clip_vision, data) -> dict:
    """The pack's point-to-mask for a click on B (A's centre as the negative), IoU with B's and A's boxes."""
    cy, cx = B_POS[0] + 4, B_POS[1] + 4
    ay, ax = A_POS[0] + 4, A_POS[1] + 4
    mask, _ = negatives_mask_from_points(clip_vision, rgb01(data["pixels"]), f"{ax},{ay}", f"{cx},{cy}",
                                         encoder_size=224)
    out = {}
    for name in ("b_mask", "a_mask"):
        truth = data[name][0] > 0.5
        m = mask > 0.5
        out[name] = float((m & truth).sum() / (m | truth).sum().clamp_min(1))
    return out


def build_method(arm: str, args, model, patcher, clip, clip_vision, data, device) -> P3SMethod:
    """``P3SMethod`` with what its ``build`` and ``make_dataset`` attach, from the lab's objects (no checkpoint,
    no VAE: I' is its own latent); ``training_loss`` is then the trainer's, unchanged."""
    cfg = P3SConfig(class_word=CLASS_WORD, identifier="sks", learning_rate=args.lr, steps=args.steps,
                    batch_size=args.batch, seed=0)
    method = P3SMethod(cfg)
    method.clip_vision = clip_vision
    method.copy = InjectionCopy(patcher).to(device).float()
    info = vf.describe(clip_vision)
    method.rngr = RNGREncoder(clip_width=info.width, width=cfg.rngr_width).to(device)
    method.rngr.reset_parameters(torch.Generator().manual_seed(31))
    method.record_slots = (transformer_slots(patcher)[-1].key,)
    method.texts = TextCache(clip)
    image = rgb01(data["pixels"])
    mask = (torch.nn.functional.max_pool2d(data["b_mask"][None], 3, 1, 1)[0, 0] if arm == "removal" else None)
    reference = removed_negatives(image, mask)
    method.reference_pixels = reference
    method.reference_latent = S.space_to_depth(reference.mean(0, keepdim=True) * 2 - 1)[None]
    states = vf.layer_states(clip_vision, squash_to_square(reference[None], 224), [info.depth])[info.depth]
    method.clip_states = states.float().cpu()
    ctx = types.SimpleNamespace(base=types.SimpleNamespace(model=model, patcher=patcher), device=device, step=0)
    method.patch = method.make_patch(ctx, strength=1.0, curve=cfg.train_curve)
    method.patched = patcher.clone()
    method.patch.install(method.patched)
    method.ctx = ctx
    return method


@torch.no_grad()
def generated(patcher, clip, samples: int, steps: int, cfg: float, seed: int = 21) -> torch.Tensor:
    import comfy.sample

    positive = [[clip.encode_from_tokens(clip.tokenize(f"a photo of sks {CLASS_WORD}")).float(), {}]]
    negative = [[clip.encode_from_tokens(clip.tokenize("")).float(), {}]]
    latent = torch.zeros(samples, 4, PHOTO_PX // S.BLOCK, PHOTO_PX // S.BLOCK)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                              disable_pbar=True)
    return S.depth_to_space(patcher.model.process_latent_in(out.float().cpu()))  # sampler returns latent_out


def box_errors(images: torch.Tensor, data) -> dict:
    def err(pos, glyph):
        y, x = pos
        return (images[:, :, y:y + 8, x:x + 8] - glyph).square().mean(dim=(1, 2, 3)).tolist()

    return {"a_at_a": err(A_POS, data["a"]), "b_at_b": err(B_POS, data["b"]), "a_at_b": err(B_POS, data["a"]),
            "photo": (images - data["pixels"]).square().mean(dim=(1, 2, 3)).tolist()}


def run_arm(arm: str, seed: int, args, device) -> dict:
    model, patcher, clip = pretrained_base(args.cache, device=device, steps=args.base_steps,
                                           log=lambda m: print(m, flush=True))
    clip_vision = tiny_clip_vision(seed=0)
    data = photo(seed)
    method = build_method(arm, args, model, patcher, clip, clip_vision, data, device)
    ctx = method.ctx
    params = list(method.copy.parameters()) + list(method.rngr.parameters())
    for p in params:  # the engine sets requires_grad on what build() returns; the copy inherits the frozen base's
        p.requires_grad_(True)
    optimizer, scheduler = build_optimizer(params, method.config)
    result = {"arm": arm, "seed": seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "point_mask_iou": point_mask_iou(clip_vision, data)}
    if arm == "removal":
        result["base"] = box_errors(generated(patcher, clip, args.samples, args.sample_steps, args.cfg), data)
    started, window, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        ctx.step = step
        rng = SampleRandom(seed, step, list(range(args.batch)), device)
        loss, metrics = method.training_loss({"index": torch.zeros(args.batch, dtype=torch.long)}, ctx, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, method.config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        window.append({"loss": float(loss.detach()), "ldm": metrics["ldm"], "l_ac": metrics["l_ac"]})
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            point = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            point.update(step=step + 1, seconds=time.perf_counter() - started)
            curve.append(point)
            window = []
            print(f"  {arm} seed {seed} step {step + 1}: loss {point['loss']:.4f} ldm {point['ldm']:.4f} "
                  f"l_ac {point['l_ac']:.5f} ({point['seconds']:.0f} s)", flush=True)
    result["train_seconds"] = time.perf_counter() - started
    result["curve"] = curve
    sampled = patcher.clone()
    method.make_patch(ctx, strength=1.0, curve="paper").install(sampled)
    result["patched"] = box_errors(generated(sampled, clip, args.samples, args.sample_steps, args.cfg), data)
    result["eval_seconds"] = time.perf_counter() - started - result["train_seconds"]
    return result


def _m(x) -> float:
    return float(torch.tensor(x).mean())


def print_table(results: list[dict]) -> None:
    by_arm: dict = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    rows = [("base, unpatched (control)", [r["base"] for r in by_arm.get("removal", []) if "base" in r])]
    rows += [(f"P3S, {ARMS[a]}", [r["patched"] for r in by_arm.get(a, [])]) for a in ARMS]
    print("\ngenerated images: squared error of A's box to A (clicked) and B's box to B (look-alike), "
          "mean ± sd over seeds")
    print(f"{'model':<46} {'seeds':>5} {'A at A ↓':>14} {'B at B':>14} {'B − A':>14} {'to photo':>14}")
    for name, rs in rows:
        if not rs:
            continue
        ms = lambda f: evaluation.format_pm(*evaluation.mean_spread([f(r) for r in rs]))
        print(f"{name:<46} {len(rs):>5} {ms(lambda r: _m(r['a_at_a'])):>14} {ms(lambda r: _m(r['b_at_b'])):>14} "
              f"{ms(lambda r: _m(r['b_at_b']) - _m(r['a_at_a'])):>14} {ms(lambda r: _m(r['photo'])):>14}")
    print("\npaired per seed, over the same sampling noises (± standard error over samples):")
    for ra in by_arm.get("removal", []):
        rb = next((r for r in by_arm.get("none", []) if r["seed"] == ra["seed"]), None)
        if rb is None:
            continue
        pa = evaluation.paired(torch.tensor(ra["patched"]["b_at_b"]), torch.tensor(rb["patched"]["b_at_b"]))
        pb = evaluation.paired(torch.tensor(ra["patched"]["a_at_a"]), torch.tensor(rb["patched"]["a_at_a"]))
        print(f"  seed {ra['seed']}: B at B, removal − none {pa['mean_diff']:+.4f} ± {pa['se']:.4f}; "
              f"A at A, removal − none {pb['mean_diff']:+.4f} ± {pb['se']:.4f}")
    print("\npoint-to-mask with the random micro CLIP (click on B, A as the negative): IoU with B's box / A's box")
    for r in results:
        if r["arm"] == "removal":
            print(f"  seed {r['seed']}: {r['point_mask_iou']['b_mask']:.2f} / {r['point_mask_iou']['a_mask']:.2f}")
    print("\ntraining (last window) and time:")
    for r in results:
        last = r["curve"][-1]
        print(f"  {r['arm']} seed {r['seed']}: loss {last['loss']:.4f} ldm {last['ldm']:.4f} l_ac {last['l_ac']:.5f}; "
              f"train {r['train_seconds']:.0f} s, evaluation {r['eval_seconds']:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="removal,none")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--base-steps", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, 100 steps, 8 samples")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.samples = "0", 100, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if not args.cache:
        import tempfile

        args.cache = str(out) if out else tempfile.mkdtemp(prefix="lab_base_")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("p3s_*.json"))] if out else []
    if args.table_only:
        print_table(results)
        return
    device = torch.device(args.device)
    started = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            path = out / f"p3s_{arm}_seed{seed}.json" if out else None
            if path and path.exists():
                continue
            result = run_arm(arm, seed, args, device)
            results.append(result)
            if path:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
    print(f"total {time.perf_counter() - started:.0f} s")
    print_table(results)


if __name__ == "__main__":
    main()
