"""EqDiff's ablation directions in the lab: RRA and MGDP on per-subject fine-tunes of a pretrained micro base.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/eqdiff_miniature.py --quick          # smoke run
    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/eqdiff_miniature.py --out RESULTS    # the table
    ... --out RESULTS --table-only

Per seed, one subject (a textured glyph of the held-out index range, never in the base's data) photographed in
a few training views (its 8 px box at a random even position on a different background each) and in held-out
views (new positions, new backgrounds). Every arm fine-tunes the same pretrained micro base (``micro_base``:
ComfyUI's UNetModel, 4 channels, text context 64 from ComfyUI's CLIP text model at micro width) with the
trainer's own ``EqDiffMethod.training_loss`` — FDTE band tokens in the SD1 tokenizer's prompt
"a photo of sks toy", MGDP input and masked loss, RRA on the middle/decoder self-attention through the pack's
extra pass, Custom Diffusion K/V, prior preservation on class images, the cross-attention and reference-attention
losses. Arms:

* ``full``    — the method as trained by ``python -m train.eqdiff`` (subject masks, RRA);
* ``no_rra``  — RRA left at its zero initialisation (exactly the stock attention) and its loss weight 0;
* ``no_mgdp`` — no masks: the trainer's own behaviour for photos without masks (the whole image noised and in
  the loss; the attention losses then see a full mask);
* ``full_indep`` — ``full`` with the training reference noised by its own noise draw (``reference_noise:
  independent``), not the target's: not the official recipe, the check of the shortcut described below.

Why the ``full_indep`` arm: in the official training (and the trainer's), the reference — another photo of the
subject — is noised at t − 2 with *the same noise* as the target. The noise is then readable, position by
position, from the reference, so RRA can lower the loss by copying it; at inference the reference is clean
(official pipeline, the node's default) and that shortcut is gone. Measure (a) is therefore also taken with the
reference in the training mode (``held_training_reference``: training view 0 at t − 2 with the target's noise),
which shows how much of RRA's training gain is that shortcut, and with another subject's photo in that mode
(``held_training_other_reference``): if that is as good, what RRA reads is the noise, not the subject.

Mask dilation: official 5 iterations of a 5×5 max-pool on the 64×64 latent grow the mask by 10 cells, 1/6.4 of the
side; the lab's 8×8 latent scales that to 1.25 cells, so the miniature dilates once with a 3×3 window (1 cell; one
5×5 pool would grow by 2 cells, 1/4 of the side, and 5 of them cover the whole latent). The held-out views are
noised inside the same dilated box and scored inside the box.

Measures (fixed noises, the same for every arm of a seed):

* **(a) held-out view texture error**: a held-out view noised inside the subject box only (the rest is known,
  the MGDP input), one-step clean prediction at t ∈ {800, 650, 500, 350}, squared error inside the box; the
  reference for RRA is training view 0 (clean, the official inference mode). Also with the reference of
  another subject and with RRA at strength 0 (what the reference itself brings).
* **(b) background leakage**: images the token generates (ComfyUI's sampler, euler 20 steps, CFG 5, the prompt
  with the token against "", no reference): the squared error outside the subject box to the nearest training
  view, against the nearest of control views (the same boxes and subject, held-out backgrounds). Leakage =
  control − training (> 0: the generated backgrounds are the training ones).
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

from lab import evaluation, subjects as S  # noqa: E402
from lab.micro_base import CLASS_PROMPT, CLASS_WORD, class_scene, pretrained_base  # noqa: E402
from model_patches import eqdiff_tokens as fdte  # noqa: E402
from model_patches.custom_diffusion import cross_attention_replacements, kv_parameter_names  # noqa: E402
from model_patches.eqdiff_mask import latent_mask, mgdp_input  # noqa: E402
from model_patches.eqdiff_rra import RRAModules, install_rra, reference_input, rra_slots  # noqa: E402
from train.diffusion import TextCache, noised  # noqa: E402
from train.eqdiff import EqDiffConfig, EqDiffMethod  # noqa: E402
from train.eqdiff_step import eqdiff_forward  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.randomness import SampleRandom  # noqa: E402

ARMS = {"full": "EqDiff as trained (masks, RRA)", "no_rra": "RRA at zero init (stock attention), no RRA loss",
        "no_mgdp": "no masks: whole image noised and in the loss",
        "full_indep": "full, training reference with its own noise (not official)"}
EVAL_TIMESTEPS = (800, 650, 500, 350)
PLACEHOLDER = "sks"
PROMPT = f"a photo of {PLACEHOLDER} {CLASS_WORD}"


class PixelLatents:
    """The lab's stand-in for the trainer's ``LatentCache`` (VAE encode): an image [H, W, 3] in 0..1 is its own
    latent by space-to-depth of its grey level in -1..1. Same call signature, same caching by key."""

    def __init__(self):
        self.store = {}

    def __call__(self, key, pixels: torch.Tensor) -> torch.Tensor:
        if key not in self.store:
            grey = pixels[..., :3].float().mean(-1) * 2 - 1
            self.store[key] = S.space_to_depth(grey[None])
        return self.store[key]


def to_rgb01(pixels: torch.Tensor) -> torch.Tensor:
    """[1, H, W] in -1..1 -> [H, W, 3] in 0..1 (what the trainer's datasets hand over)."""
    return ((pixels[0] + 1) / 2).clamp(0, 1)[..., None].expand(-1, -1, 3).contiguous()


def subject_views(seed: int, train_views: int, held_views: int) -> dict:
    """The subject of ``seed`` in training and held-out views, plus control scenes and another subject's view."""
    sid = S.HELD_OUT_SUBJECTS[100 + seed]
    glyph = S.textured_subject(sid)
    gen = torch.Generator().manual_seed(900 + seed)
    slots = (S.SCENE_PX - S.SUBJECT_PX) // S.BLOCK + 1

    def views(count, background_base):
        out = []
        for i in range(count):
            y, x = (int(v) * S.BLOCK for v in torch.randint(0, slots, (2,), generator=gen))
            out.append((S.place(S.background(background_base + i), glyph, y, x),
                        S.box_mask((S.SCENE_PX, S.SCENE_PX), y, x), (y, x)))
        return out

    train = views(train_views, 7_000_000 + 1000 * seed)
    held = views(held_views, 8_000_000 + 1000 * seed)
    control = [(S.place(S.background(9_000_000 + 1000 * seed + i), glyph, *pos), mask, pos)
               for i, (_, mask, pos) in enumerate(train)]
    other = S.place(S.background(9_500_000 + seed), S.textured_subject(S.HELD_OUT_SUBJECTS[500 + seed]), 4, 4)
    return {"subject_id": sid, "glyph": glyph, "train": train, "held": held, "control": control, "other": other}


def build_method(arm: str, args, model, patcher, clip, data: dict, device) -> EqDiffMethod:
    """``EqDiffMethod`` with what its ``build``/``make_dataset`` would attach, from the lab's objects instead of a
    checkpoint file, a VAE and a class-image folder (its ``training_loss`` is then the trainer's, unchanged)."""
    cfg = EqDiffConfig(class_word=CLASS_WORD, placeholder=PLACEHOLDER, dilation=args.dilation,
                       dilation_kernel=args.dilation_kernel, steps=args.steps,
                       reference_noise="independent" if arm == "full_indep" else "same",
                       batch_size=args.batch, learning_rate=args.lr, num_class_images=args.class_images,
                       reference_attention_weight=0.0 if arm == "no_rra" else 0.1, seed=args.seed_offset)
    method = EqDiffMethod(cfg)
    method.clip = clip
    method.placeholder_positions = fdte.placeholder_positions(clip, PROMPT, PLACEHOLDER)
    init = fdte.init_vector(clip, CLASS_WORD)
    method.tokens = torch.nn.Parameter(torch.stack([init, init.clone()]).to(device))
    method.slots = rra_slots(patcher)
    method.rra = RRAModules.for_model(patcher, method.slots).to(device)
    method.kv_names = kv_parameter_names(model)
    hooked = patcher.clone()
    install_rra(hooked, method.slots)
    for key, replacement in cross_attention_replacements(hooked).items():
        hooked.set_model_attn2_replace(replacement, *key)
    method.transformer_options = hooked.model_options["transformer_options"]
    method.latents = PixelLatents()
    method.texts = TextCache(clip)
    method.class_pixels = [to_rgb01(class_scene(i, stream_seed=1)[0]) for i in range(args.class_images)]
    masked = arm != "no_mgdp"
    method._dataset = [{"index": i, "pixels": to_rgb01(pixels),
                        "mask": mask[0] if masked else torch.ones_like(mask[0])}
                       for i, (pixels, mask, _) in enumerate(data["train"])]
    return method


def trainable(method: EqDiffMethod, model, arm: str) -> list[torch.nn.Parameter]:
    params = dict(model.named_parameters())
    kv = [params[n] for n in method.kv_names]
    for p in kv:
        p.requires_grad_(True)
    out = [method.tokens] + kv
    if arm != "no_rra":
        out += list(method.rra.parameters())
    else:
        method.rra.requires_grad_(False)
    return out


@torch.no_grad()
def held_out_errors(method, model, data, device, reference: str = "view", strength: float = 1.0,
                    mode: str = "clean") -> torch.Tensor:
    """[timesteps, held views] box error of the one-step clean prediction (see the module doc); ``mode`` is the
    reference's: clean (official inference, the node's default) or training (t − 2, the target's noise)."""
    from model_patches.eqdiff import REFERENCE_TIME_GAP
    from model_patches.eqdiff_mask import dilate

    held = data["held"]
    x0 = torch.stack([S.space_to_depth(p) for p, _, _ in held]).to(device)
    cells = torch.stack([latent_mask(m, tuple(x0.shape[-2:]))[0] for _, m, _ in held]).to(device)
    noised_cells = dilate(cells, method.config.dilation, method.config.dilation_kernel)
    ref_pixels = data["train"][0][0] if reference == "view" else data["other"]
    ref0 = S.space_to_depth(ref_pixels)[None].to(device)
    context = fdte.encode_with_vector(method.clip, PROMPT, PLACEHOLDER,
                                      fdte.band_token(method.tokens.detach(), fdte.ORIGINAL)).float().to(device)
    context = context.expand(len(held), -1, -1)
    rows = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5000 + t)).to(device)
        sigma = model.model_sampling.sigmas[t].float().expand(len(held)).to(device)
        x = mgdp_input(noised(model, x0, noise, sigma), x0, noised_cells)
        if mode == "clean":
            ref_x, ref_sigma = reference_input(model, ref0, sigma[:1], "clean")
        else:  # one reference per row, each noised with its row's noise, as in training
            ref_x, ref_sigma = reference_input(model, ref0.expand(len(held), -1, -1, -1), sigma, "training",
                                               noise=noise, gap=REFERENCE_TIME_GAP)
        out = eqdiff_forward(model, method.transformer_options, method.slots, method.rra, x, sigma, context,
                             ref_x, ref_sigma, context[:ref_x.shape[0]], strength=strength)
        rows.append(evaluation.region_error(out, x0, cells).cpu())
    return torch.stack(rows)


@torch.no_grad()
def generated(method, patcher, samples: int, steps: int, cfg: float, seed: int = 11) -> torch.Tensor:
    """[samples, 1, 16, 16] images the token generates with the fine-tuned K/V (ComfyUI's sampler, no RRA)."""
    import comfy.sample

    token = fdte.band_token(method.tokens.detach(), fdte.ORIGINAL)
    positive = [[fdte.encode_with_vector(method.clip, PROMPT, PLACEHOLDER, token).float().cpu(), {}]]
    negative = [[method.clip.encode_from_tokens(method.clip.tokenize("")).float().cpu(), {}]]
    latent = torch.zeros(samples, 4, S.SCENE_PX // S.BLOCK, S.SCENE_PX // S.BLOCK)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                              seed=seed, disable_pbar=True)
    # the sampler hands back process_latent_out(x) (SD1.5: x / 0.18215); the lab's latents are the model's own
    return S.depth_to_space(patcher.model.process_latent_in(out.float().cpu()))


def nearest_outside(images: torch.Tensor, scenes: list) -> torch.Tensor:
    """Per image, the smallest squared error outside the subject box over ``scenes`` [(pixels, box mask, pos)]."""
    errors = []
    for pixels, mask, _ in scenes:
        outside = 1 - mask
        errors.append(((images - pixels).square() * outside).sum(dim=(1, 2, 3)) / outside.sum())
    return torch.stack(errors, dim=1).min(dim=1).values


def subject_match(images: torch.Tensor, glyph: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest squared error of any 8 px window (even positions) to the subject."""
    best = []
    for y in range(0, S.SCENE_PX - S.SUBJECT_PX + 1, S.BLOCK):
        for x in range(0, S.SCENE_PX - S.SUBJECT_PX + 1, S.BLOCK):
            window = images[:, :, y:y + S.SUBJECT_PX, x:x + S.SUBJECT_PX]
            best.append((window - glyph).square().mean(dim=(1, 2, 3)))
    return torch.stack(best, dim=1).min(dim=1).values


def leakage(images: torch.Tensor, data: dict) -> dict:
    to_train, to_control = nearest_outside(images, data["train"]), nearest_outside(images, data["control"])
    return {"to_train": to_train.tolist(), "to_control": to_control.tolist(),
            "leakage": (to_control - to_train).tolist(), "subject_match": subject_match(images, data["glyph"]).tolist()}


def evaluate(method, model, patcher, data, args, device) -> dict:
    out = {"held": held_out_errors(method, model, data, device).tolist(),
           "held_other_reference": held_out_errors(method, model, data, device, reference="other").tolist(),
           "held_no_reference": held_out_errors(method, model, data, device, strength=0.0).tolist(),
           "held_training_reference": held_out_errors(method, model, data, device, mode="training").tolist(),
           "held_training_other_reference": held_out_errors(method, model, data, device, reference="other",
                                                            mode="training").tolist()}
    out["generation"] = leakage(generated(method, patcher, args.samples, args.sample_steps, args.cfg), data)
    return out


def run_arm(arm: str, seed: int, args, device) -> dict:
    model, patcher, clip = pretrained_base(args.cache, device=device, log=lambda m: print(m, flush=True),
                                           steps=args.base_steps)
    data = subject_views(seed, args.train_views, args.held_views)
    method = build_method(arm, args, model, patcher, clip, data, device)
    params = trainable(method, model, arm)
    optimizer, scheduler = build_optimizer(params, method.config)
    ctx = types.SimpleNamespace(base=types.SimpleNamespace(model=model, patcher=patcher), device=device, step=0)
    result = {"arm": arm, "seed": seed, "subject_id": data["subject_id"], "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "train_views": args.train_views, "held_views": args.held_views,
              "dilation": args.dilation, "dilation_kernel": args.dilation_kernel}
    if arm == "full":  # the untouched base with the initial tokens (RRA at zero init): what fine-tuning starts from
        result["base"] = evaluate(method, model, patcher, data, args, device)
    order = torch.Generator().manual_seed(10_000 + seed)  # the same sample order for every arm of a seed
    started, window, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        index = torch.randint(0, len(method._dataset), (args.batch,), generator=order)
        items = [method._dataset[int(i)] for i in index]
        batch = {"index": index, "pixels": torch.stack([it["pixels"] for it in items]),
                 "mask": torch.stack([it["mask"] for it in items])}
        ctx.step = step
        rng = SampleRandom(seed, step, list(range(args.batch)), device)
        loss, metrics = method.training_loss(batch, ctx, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, method.config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        window.append({"loss": float(loss.detach()), **{k: v for k, v in metrics.items() if "loss" in k}})
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            point = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            point.update(step=step + 1, seconds=time.perf_counter() - started)
            curve.append(point)
            window = []
            print(f"  {arm} seed {seed} step {step + 1}: " + " ".join(
                f"{k} {v:.4f}" for k, v in point.items() if "loss" in k) + f" ({point['seconds']:.0f} s)", flush=True)
    result["train_seconds"] = time.perf_counter() - started
    result["curve"] = curve
    result.update(evaluate(method, model, patcher, data, args, device))
    fusion = [float(m.fusion.weight.detach().abs().max()) for m in method.rra.values()]
    result["rra_fusion_max_abs"] = max(fusion)
    result["eval_seconds"] = time.perf_counter() - started - result["train_seconds"]
    return result


def _mean(x) -> float:
    return float(torch.tensor(x).float().mean())


def print_table(results: list[dict]) -> None:
    by_arm: dict = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    rows = [("base (no fine-tune)", [r["base"] for r in by_arm.get("full", []) if "base" in r])]
    rows += [(f"{a}: {ARMS[a]}", by_arm.get(a, [])) for a in ARMS]
    print(f"\n(a) held-out view box error (one-step clean prediction, mean over t in {EVAL_TIMESTEPS}) and (b) "
          f"generation, mean ± sd over seeds")
    print(f"{'arm':<58} {'seeds':>5} {'held-out ↓':>14} {'other ref':>14} {'no ref':>14} {'train-mode ref':>14} "
          f"{'leakage ↓':>16} "
          f"{'bg→train':>8} {'bg→ctrl':>8} {'subject↓':>8}")
    for name, rs in rows:
        if not rs:
            continue
        cell = lambda key: evaluation.format_pm(*evaluation.mean_spread([_mean(r[key]) for r in rs]))
        gen = lambda key: evaluation.mean_spread([_mean(r["generation"][key]) for r in rs])
        train_mode = cell('held_training_reference') if all('held_training_reference' in r for r in rs) else "-"
        print(f"{name:<58} {len(rs):>5} {cell('held'):>14} {cell('held_other_reference'):>14} "
              f"{cell('held_no_reference'):>14} {train_mode:>14} {evaluation.format_pm(*gen('leakage'), 4):>16} "
              f"{gen('to_train')[0]:>8.4f} {gen('to_control')[0]:>8.4f} {gen('subject_match')[0]:>8.4f}")
    print("\npaired, per seed (a − b; negative: a lower), ± standard error over held-out views × timesteps or "
          "over generated samples")
    for a, b, key, label in (("full", "no_rra", "held", "(a) held-out error, full − no_rra"),
                             ("full", "no_mgdp", "leakage", "(b) leakage, full − no_mgdp"),
                             ("full", "no_mgdp", "held", "held-out error, full − no_mgdp"),
                             ("full_indep", "no_rra", "held", "(a) held-out error, full_indep − no_rra"),
                             ("full_indep", "full", "held", "held-out error, full_indep − full"),
                             ("full", "full", "ref", "full: own reference − other subject's reference")):
        parts = []
        for ra in by_arm.get(a, []):
            rb = next((r for r in by_arm.get(b, []) if r["seed"] == ra["seed"]), None)
            if rb is None:
                continue
            if key == "ref":
                x, y = torch.tensor(ra["held"]).flatten(), torch.tensor(ra["held_other_reference"]).flatten()
            elif key == "leakage":
                x, y = torch.tensor(ra["generation"]["leakage"]), torch.tensor(rb["generation"]["leakage"])
            else:
                x, y = torch.tensor(ra[key]).flatten(), torch.tensor(rb[key]).flatten()
            p = evaluation.paired(x, y)
            parts.append(f"seed {ra['seed']}: {p['mean_diff']:+.4f} ± {p['se']:.4f}")
        if parts:
            print(f"  {label}: " + "; ".join(parts))
    print("\ntraining (last logging window) and time:")
    for r in results:
        last = r["curve"][-1]
        print(f"  {r['arm']} seed {r['seed']}: " + " ".join(f"{k} {v:.4f}" for k, v in last.items() if "loss" in k)
              + f"; RRA fusion max |w| {r['rra_fusion_max_abs']:.4f}; train {r['train_seconds']:.0f} s, "
              f"evaluation {r['eval_seconds']:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="full,no_rra,no_mgdp,full_indep", help=f"comma list of {sorted(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per fine-tune (official: 600)")
    parser.add_argument("--batch", type=int, default=2, help="subject views per step, each with a class image")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dilation", type=int, default=1,
                        help="max-pools on the latent mask (official 5 of 5x5 at 64x64 latents = 10 cells; scaled "
                             "to the 8x8 latent: 1.25 cells, so one 3x3 pool)")
    parser.add_argument("--dilation-kernel", type=int, default=3, help="window of each dilation pool (odd)")
    parser.add_argument("--train-views", type=int, default=4)
    parser.add_argument("--held-views", type=int, default=8)
    parser.add_argument("--class-images", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--base-steps", type=int, default=2000, help="pretraining steps of the micro base")
    parser.add_argument("--seed-offset", type=int, default=0, help="the trainer config's seed")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="", help="folder of the pretrained micro base (default: --out, or "
                                                     "a temporary folder)")
    parser.add_argument("--out", default="", help="folder for one JSON per (arm, seed); reruns skip those present")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, 150 steps, 8 samples")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.samples, args.log_every = "0", 150, 8, 50
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if not args.cache:
        import tempfile

        args.cache = str(out) if out else tempfile.mkdtemp(prefix="lab_base_")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("eqdiff_*.json"))] if out else []
    if args.table_only:
        print_table(results)
        return
    device = torch.device(args.device)
    started = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            path = out / f"eqdiff_{arm}_seed{seed}.json" if out else None
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
