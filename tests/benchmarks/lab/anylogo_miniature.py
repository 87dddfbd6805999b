"""AnyLogo's ablations in the lab: recycling vs blocked flow (Table 3), its position (Table 4), blocked-flow
generation of a model trained with sparse recycling (Fig. 4).

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/anylogo_miniature.py --quick      # smoke run
    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/lab/anylogo_miniature.py --out RESULTS  # the table
    ... --arms decoder,blocked --seeds 0,1,2 --steps 3000 --device cuda

Every arm trains a fresh micro UNet (ComfyUI's UNetModel, width 32, 1.1M parameters, seeded) from scratch plus
the DINOv2→context projection, with the trainer's own loss (``train.anylogo_step.anylogo_loss``: the pack's
RecyclingAttention, extraction pass and ImageContextPatch), AdamW, on procedural glyph subjects pasted into
16 px scenes (pixels = latents). For one seed, every arm sees the same batches, timesteps and noises (paired).
Evaluation on held-out subjects (never in training): the one-step clean prediction's squared error inside the
region at high-noise timesteps, with the true subject and with each of the other candidates as the condition
(its latent for the signatures, its image tokens), and identification = the true subject gives the lowest
error (chance 1/candidates). Each arm is evaluated with complete transmission and with blocked flow.
Results are written per (arm, seed) as they finish (``--out``), so the table can be printed from what ran.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAB_PARENT = Path(__file__).resolve().parents[1]
PACK_ROOT = Path(__file__).resolve().parents[3]
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, as in tests/conftest.py
sys.path.append(str(LAB_PARENT))

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from lab import anylogo_data, evaluation, subjects as S  # noqa: E402
from lab.attention_probe import ProbedLayout, SelectivityStats, SideBySideProbe  # noqa: E402
from lab.micro_models import MICRO_DINOV2, UNET_SHAPES, build_micro_image_encoder, build_micro_model  # noqa: E402
from lab.position_code import CodedLayout  # noqa: E402
from lab.pretraining import PRETRAIN_TASKS, pretrain  # noqa: E402
from model_patches.diagnostics import attention_report  # noqa: E402
from model_patches.image_context import ImageContextPatch, ImageProjection  # noqa: E402
from model_patches.recycling import AttentionRecorder  # noqa: E402
from model_patches.unet_layout import transformer_slots  # noqa: E402
from train.anylogo_step import RecyclingLayout, anylogo_forward, anylogo_loss, keep_decisions  # noqa: E402
from train.diffusion import noised  # noqa: E402


@dataclass(frozen=True)
class Arm:
    positions: str
    threshold: float     # Λ in training (Eq. 5)
    tokens: bool = True  # image-encoder tokens in cross-attention (App. A)
    note: str = ""
    side_by_side: bool = False  # the subject pasted beside the scene as known pixels; plain self-attention


ARMS = {
    "decoder": Arm("decoder", 0.6, note="recycling at the decoder, Λ=0.6 (the paper's choice)"),
    "encoder": Arm("encoder", 0.6, note="recycling at the encoder, Λ=0.6"),
    "both": Arm("encoder+decoder", 0.6, note="recycling at encoder and decoder, Λ=0.6"),
    "blocked": Arm("decoder", 0.0, note="blocked flow, Λ=0: image-encoder tokens only (the paper's baseline)"),
    "recycling_only": Arm("decoder", 1.0, tokens=False, note="investigation: Λ=1, no image tokens at all"),
    "side_by_side": Arm("decoder", 0.0, tokens=False, side_by_side=True,
                        note="control: no recycling, no tokens; the subject beside the scene, known, in one image"),
}
MAX_SLOTS = 8          # keep draws are taken for this many layers so every arm consumes the same random numbers
# One-step clean predictions at timesteps where the region is mostly noise (σ 5.1 … 1.0): there only the
# condition can tell what belongs in the region. t=999 (σ 14.6) is stored too but kept out of the table's mean:
# its error is σ² (≈ 214) times the noise-prediction error, so it measures noise precision, not the subject.
EVAL_TIMESTEPS = (999, 800, 650, 500, 350)
TABLE_TIMESTEPS = (800, 650, 500, 350)
CONDITION_DROPOUT = 0.1
DEFAULT_LR = 1e-3
DEFAULT_STEPS = 1500


def setup_data(args, encoder):
    train_pairs = S.make_pairs(args.train_pairs, S.TRAIN_SUBJECTS, args.train_subjects, seed=1)
    held_pairs = S.make_pairs(args.held_pairs, S.HELD_OUT_SUBJECTS, args.held_pairs, seed=2)

    def build(pairs, ids=None):
        return anylogo_data.build(pairs, encoder, ids, encoder_pool=args.encoder_pool, scale=args.scale)

    pool = build(train_pairs)
    # candidate 0 is the pair's own subject; the others are other held-out pairs' subjects, fixed per pair
    gen = torch.Generator().manual_seed(3)
    others = []
    for j in range(len(held_pairs)):
        choice = [int(i) for i in torch.randperm(len(held_pairs), generator=gen) if int(i) != j]
        others.append([held_pairs[i].subject_id for i in choice[:args.candidates - 1]])
    candidates = [build(held_pairs)] + [build(held_pairs, [o[k] for o in others]) for k in range(args.candidates - 1)]
    return pool, candidates


def side_by_side(z0, concat, subject, gap: int = 0):
    """The control's inputs: [scene | subject column] in one latent, the subject (top of an h x w_s column)
    known to the inpainting UNet (mask 0, in the masked image), so stock self-attention can copy it. ``gap``
    known grey (0) columns between the scene and the subject put the copy's source that many cells farther
    from the region (beyond the convolutions' reach, so that only attention can fetch it)."""
    column = torch.zeros(z0.shape[:2] + (z0.shape[2], gap + subject.shape[3]), dtype=z0.dtype, device=z0.device)
    column[:, :, :subject.shape[2], gap:] = subject
    mask = torch.cat([concat[:, :1], torch.zeros_like(column[:, :1])], dim=-1)
    return torch.cat([z0, column], dim=-1), torch.cat([mask, torch.cat([concat[:, 1:], column], dim=-1)], dim=1)


def set_region(layout, concat: torch.Tensor) -> None:
    """Hand the rows' region masks to the position code, where the layout carries one (``--position-code``)."""
    if hasattr(layout, "set_region"):
        layout.set_region(concat[:, :1])


def image_context(projection, tokens, layout, use_tokens: bool):
    if not use_tokens:
        tokens = [torch.zeros_like(t) for t in tokens]
    return ImageContextPatch(projection, tokens, layout.group_of)


@torch.no_grad()
def region_errors(model, layout, projection, arm: Arm, candidates, *, read: bool, timesteps=TABLE_TIMESTEPS,
                  rows=None, recorder=None, device="cpu", by_timestep: bool = False, gap: int = 0) -> torch.Tensor:
    """[pairs, candidates] region error of the one-step clean prediction, averaged over ``timesteps`` (or
    [timesteps, pairs, candidates] with ``by_timestep``); the same noises for every candidate, arm and seed."""
    first = candidates[0] if rows is None else candidates[0].rows(rows)
    n = first.z0.shape[0]
    per_t = []
    for t in timesteps:
        errors = torch.zeros(n, len(candidates))
        per_t.append(errors)
        gen = torch.Generator().manual_seed(1000 + t)
        noise = torch.randn(first.z0.shape, generator=gen).to(device)
        subject_noise = torch.randn(first.subject.shape, generator=gen).to(device)
        sigma = model.model_sampling.sigmas[t].float().expand(n).to(device)
        z0, concat = first.z0.to(device), first.concat.to(device)
        set_region(layout, concat)
        x = noised(model, z0, noise, sigma)
        for k, cand in enumerate(candidates):
            cand = (cand if rows is None else cand.rows(rows)).to(device)
            keep = None if read else torch.zeros(n, len(layout.slots), dtype=torch.bool, device=device)
            if arm.side_by_side:  # the scene part's noise is the other arms'; the column's own
                wide_z0, wide_concat = side_by_side(z0, concat, cand.subject, gap)
                column_noise = torch.randn(wide_z0.shape[:3] + (wide_z0.shape[3] - z0.shape[3],),
                                           generator=torch.Generator().manual_seed(2000 + t)).to(device)
                wide_x = noised(model, wide_z0, torch.cat([noise, column_noise], dim=-1), sigma)
                out = anylogo_forward(model, layout, wide_x, sigma, wide_concat, cand.subject, subject_noise,
                                      image_context(projection, cand.tokens, layout, arm.tokens),
                                      torch.zeros(n, len(layout.slots), dtype=torch.bool, device=device))
                errors[:, k] += evaluation.region_error(out[..., :z0.shape[-1]], z0, concat[:, :1]).cpu()
                continue
            out = anylogo_forward(model, layout, x, sigma, concat, cand.subject, subject_noise,
                                  image_context(projection, cand.tokens, layout, arm.tokens), keep,
                                  recorder=recorder if k == 0 else None)
            errors[:, k] += evaluation.region_error(out, z0, concat[:, :1]).cpu()
    stacked = torch.stack(per_t)
    return stacked if by_timestep else stacked.mean(dim=0)


@torch.no_grad()
def copy_selectivity(model, data, rows, *, device="cpu", timesteps=TABLE_TIMESTEPS, gap: int = 0) -> tuple[dict, dict]:
    """Does the model's stock self-attention, shown the subject beside the scene (the side-by-side input, no
    recycling, all-zero context), send its region queries to the subject's cells, each to its own one?
    (overall, per layer) means of the probe's measures over ``rows`` and ``timesteps`` (the evaluation noises)."""
    first = data.rows(rows).to(device)
    z0, concat = side_by_side(first.z0, first.concat, first.subject, gap)
    source = torch.zeros_like(concat[:1, :1])
    source[..., :first.subject.shape[2], first.z0.shape[-1] + gap:] = 1
    stats = SelectivityStats()
    probe = SideBySideProbe(stats, concat[:, :1], source)
    options = {"patches_replace": {"attn1": {slot.key: probe for slot in transformer_slots(model)}},
               "cond_or_uncond": [0]}
    context = torch.zeros(z0.shape[0], 1, int(model.model_config.unet_config["context_dim"]), device=device)
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1000 + t)).to(device)
        sigma = model.model_sampling.sigmas[t].float().expand(z0.shape[0]).to(device)
        model.apply_model(noised(model, z0, noise, sigma), sigma, c_concat=concat, c_crossattn=context,
                          transformer_options={**options, "sigmas": sigma})
    return stats.overall(), stats.per_layer()


def extraction_gradient_share(model, layout, projection, arm, batch, draws) -> float:
    """||g - g_detached|| / ||g||: the part of the UNet's gradient that flows back through the extraction pass."""
    grads = []
    set_region(layout, batch.concat)
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = anylogo_loss(model, layout, batch.z0, batch.concat, batch.subject,
                               image_context(projection, batch.tokens, layout, arm.tokens), *draws,
                               detach_signatures=detach)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.diffusion_model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return float((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-12))


def setting_tag(args) -> str:
    """The geometry of a run: '' for the default (scale 1, two-level UNet), else e.g. 'x2-1lvl'."""
    parts = ([f"x{args.scale}"] if args.scale != 1 else []) + (["1lvl"] if args.unet_shape == "one-level" else [])
    parts += [f"gap{args.copy_gap}"] if args.copy_gap else []
    parts += [f"pos{args.position_code:g}"] if args.position_code else []
    return "-".join(parts)


def init_tag(args) -> str:
    """What the arms start from and in which geometry: '' for random weights in the default one, else e.g.
    'pre-denoise2000' (the pretrained base) or 'x2-1lvl-pre-copy800'."""
    pre = "" if args.init == "random" else f"pre-{args.pretrain_task}{args.pretrain_steps}"
    return "-".join(part for part in (setting_tag(args), pre) if part)


def variant(name: str, init: str, lr: float, steps: int | None = None) -> str:
    """The table's (and the result file's) name of one arm trained from ``init`` with ``lr`` for ``steps``
    (the defaults, random init, DEFAULT_LR and DEFAULT_STEPS, add nothing to the arm's name)."""
    return (name + (f"@{init}" if init else "") + (f"@lr{lr:g}" if lr != DEFAULT_LR else "")
            + (f"@{steps}st" if steps is not None and steps != DEFAULT_STEPS else ""))


def pretrained_base(pool, args) -> dict:
    """The state dict of the pretrained micro UNet every arm of this run forks from; trained once and cached in
    ``--out`` (weights + a JSON with its curve and time)."""
    tag, device = init_tag(args), torch.device(args.device)
    path = Path(args.out) / f"base_{tag}.safetensors" if args.out else None
    if path and path.exists():
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    model, _ = build_micro_model(seed=args.pretrain_seed, shape=args.unet_shape, device=device)
    started = time.perf_counter()
    curve = pretrain(model, pool, steps=args.pretrain_steps, batch=args.batch, lr=args.pretrain_lr or args.lr,
                     seed=args.pretrain_seed, task=args.pretrain_task,
                     side_by_side=lambda *a: side_by_side(*a, gap=args.copy_gap), device=device,
                     log_every=args.log_every, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    print(f"pretrained base {tag}: {seconds:.0f} s", flush=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    if path:
        import safetensors.torch

        safetensors.torch.save_file(state, str(path))
        path.with_suffix(".json").write_text(json.dumps(
            {"base": tag, "task": args.pretrain_task, "steps": args.pretrain_steps, "seed": args.pretrain_seed,
             "lr": args.pretrain_lr or args.lr, "batch": args.batch, "seconds": seconds, "curve": curve}))
    return state


def train_arm(name: str, seed: int, pool, candidates, args, base: dict | None = None) -> dict:
    arm, device = ARMS[name], torch.device(args.device)
    model, _ = build_micro_model(seed=seed, shape=args.unet_shape, device=device)
    if base is not None:  # fork from the pretrained base: the same start for every arm and seed
        model.diffusion_model.load_state_dict(base)
    layout = RecyclingLayout.of(model, arm.positions, False, len(pool.tokens))
    if args.position_code:
        if arm.side_by_side:
            raise ValueError("--position-code codes a region and a separate subject pass; side_by_side has neither")
        layout = CodedLayout(layout, args.position_code)
    projection = ImageProjection(MICRO_DINOV2["hidden_size"], layout.context_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        projection.proj.reset_parameters()
    projection.to(device)
    params = list(model.diffusion_model.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(10_000 + seed)  # the data stream of this seed: identical for every arm
    column_gen = torch.Generator().manual_seed(20_000 + seed)  # the control's extra noise, outside that stream
    sigmas = model.model_sampling.sigmas.float()
    curve, window, started = [], [], time.perf_counter()
    quick_rows = torch.arange(min(16, candidates[0].z0.shape[0]))
    for step in range(1, args.steps + 1):
        index = torch.randint(0, pool.z0.shape[0], (args.batch,), generator=gen)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=gen)
        noise = torch.randn((args.batch,) + tuple(pool.z0.shape[1:]), generator=gen)
        subject_noise = torch.randn((args.batch,) + tuple(pool.subject.shape[1:]), generator=gen)
        dropped = torch.rand(args.batch, generator=gen) < CONDITION_DROPOUT
        uniform = torch.rand(args.batch, MAX_SLOTS, generator=gen)[:, :len(layout.slots)]
        batch = pool.rows(index).to(device)
        tokens = [torch.where(dropped.view(-1, 1, 1).to(device), torch.zeros_like(g), g) for g in batch.tokens]
        keep = keep_decisions(uniform, arm.threshold, dropped).to(device)
        z0, concat = batch.z0, batch.concat
        if arm.side_by_side:
            z0, concat = side_by_side(z0, concat, batch.subject, args.copy_gap)
            column = torch.randn(z0.shape[:3] + (z0.shape[3] - batch.z0.shape[3],), generator=column_gen)
            noise = torch.cat([noise, column], dim=-1)
        set_region(layout, concat)
        loss, region_loss = anylogo_loss(model, layout, z0, concat, batch.subject,
                                         image_context(projection, tokens, layout, arm.tokens),
                                         sigmas[t].to(device), noise.to(device), subject_noise.to(device), keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append((float(loss.detach()), float(region_loss)))
        if step % args.log_every == 0 or step == args.steps:
            errors = region_errors(model, layout, projection, arm, candidates, read=arm.threshold > 0,
                                   timesteps=(800, 500), rows=quick_rows, device=device, gap=args.copy_gap)
            ident = evaluation.identification(errors)
            point = {"step": step, "loss": sum(w[0] for w in window) / len(window),
                     "region_loss": sum(w[1] for w in window) / len(window),
                     "held_true": float(ident["true"].mean()), "held_other": float(ident["other"].mean()),
                     "held_identified": float(ident["hit"].mean()), "seconds": time.perf_counter() - started}
            curve.append(point)
            window = []
            print(f"  {name} seed {seed} step {step}: loss {point['loss']:.4f} region {point['region_loss']:.4f} "
                  f"held-out true {point['held_true']:.4f} other {point['held_other']:.4f} identified "
                  f"{point['held_identified']:.2f} ({point['seconds']:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - started
    result = {"arm": name, "seed": seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "encoder_pool": args.encoder_pool, "init": init_tag(args), "scale": args.scale,
              "unet_shape": args.unet_shape, "copy_gap": args.copy_gap, "position_code": args.position_code,
              "train_seconds": train_seconds, "curve": curve, "slots": [s.name for s in layout.slots]}
    result["eval_timesteps"] = list(EVAL_TIMESTEPS)
    for read in (True, False):
        errors = region_errors(model, layout, projection, arm, candidates, read=read, timesteps=EVAL_TIMESTEPS,
                               device=device, by_timestep=True, gap=args.copy_gap)
        flow = "complete" if read else "blocked"
        result[f"{flow}_by_timestep"] = errors.tolist()
        result[flow] = errors[[EVAL_TIMESTEPS.index(t) for t in TABLE_TIMESTEPS]].mean(dim=0).tolist()
    if args.out:
        import safetensors.torch

        weights = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in model.diffusion_model.state_dict().items()}
        weights.update({f"image_projection.{k}": v.detach().cpu().contiguous()
                        for k, v in projection.state_dict().items()})
        label = variant(name, result["init"], args.lr, args.steps)
        safetensors.torch.save_file(weights, str(Path(args.out) / f"{label}_seed{seed}.safetensors"))
    recorder, selectivity = AttentionRecorder(), SelectivityStats()
    probed = ProbedLayout(layout, selectivity, candidates[0].concat[quick_rows, :1])
    region_errors(model, probed, projection, arm, candidates[:1], read=True, rows=quick_rows, recorder=recorder,
                  device=device, gap=args.copy_gap)
    shares = [e[1] for entries in recorder.per_layer.values() for e in entries]
    result["asa"] = sum(shares) / len(shares) if shares else None
    result["attention_report"] = attention_report(recorder)
    result["selectivity"] = selectivity.overall() or None
    result["selectivity_per_layer"] = selectivity.per_layer()
    result["copy_selectivity"], result["copy_selectivity_per_layer"] = copy_selectivity(
        model, candidates[0], quick_rows, device=device, gap=args.copy_gap)
    if arm.threshold > 0 and not arm.side_by_side:
        first = pool.rows(torch.arange(args.batch)).to(device)
        g = torch.Generator().manual_seed(5)
        draws = (sigmas[torch.randint(0, len(sigmas), (args.batch,), generator=g)].to(device),
                 torch.randn(first.z0.shape, generator=g).to(device),
                 torch.randn(first.subject.shape, generator=g).to(device),
                 torch.ones(args.batch, len(layout.slots), dtype=torch.bool, device=device))
        result["extraction_gradient_share"] = extraction_gradient_share(model, layout, projection, arm, first, draws)
    result["eval_seconds"] = time.perf_counter() - started - train_seconds
    return result


def variant_of(name: str, group: str) -> str:
    return f"{name}@{group}" if group else name


def print_table(results: list[dict], chance: float) -> None:
    by_arm = {}
    for r in results:
        by_arm.setdefault(variant(r["arm"], r.get("init", ""), r.get("lr", DEFAULT_LR), r["steps"]), []).append(r)
    print(f"\nheld-out region error (one-step clean prediction, mean over t in {TABLE_TIMESTEPS}), mean ± sd over "
          f"seeds; "
          f"identified: chance {chance:.3f}")
    width = max([16] + [len(name) for name in by_arm])
    print(f"{'arm':<{width}} {'seeds':>5} {'flow at test':>12} {'true subject':>16} {'other subjects':>16} "
          f"{'identified':>14} {'ASA':>6} {'train s':>8}")
    for name, rows in by_arm.items():
        for flow in ("complete", "blocked"):
            stats = [evaluation.identification(torch.tensor(r[flow])) for r in rows]
            true = evaluation.mean_spread([float(s["true"].mean()) for s in stats])
            other = evaluation.mean_spread([float(s["other"].mean()) for s in stats])
            hit = evaluation.mean_spread([float(s["hit"].mean()) for s in stats])
            asa = evaluation.mean_spread([r["asa"] for r in rows if r.get("asa") is not None]) \
                if flow == "complete" else (float("nan"), 0)
            secs = evaluation.mean_spread([r["train_seconds"] for r in rows])[0]
            print(f"{name:<{width}} {len(rows):>5} {flow:>12} {evaluation.format_pm(*true):>16} "
                  f"{evaluation.format_pm(*other):>16} {evaluation.format_pm(*hit, 2):>14} {asa[0]:>6.3f} "
                  f"{secs:>8.0f}")
    print("\npaired comparisons on the same held-out pairs (true-subject region error, per seed; a - b < 0: a is "
          "better)")
    comparisons = [("decoder", "complete", "blocked", "blocked"), ("encoder", "complete", "blocked", "blocked"),
                   ("both", "complete", "blocked", "blocked"), ("decoder", "complete", "encoder", "complete"),
                   ("decoder", "complete", "both", "complete"), ("decoder", "blocked", "blocked", "blocked"),
                   ("decoder", "complete", "decoder", "blocked"), ("recycling_only", "complete", "blocked", "blocked"),
                   ("recycling_only", "complete", "side_by_side", "complete")]
    groups = sorted({name.partition("@")[2] for name in by_arm})  # one per (init, lr)
    comparisons = [(variant_of(a, g), fa, variant_of(b, g), fb) for g in groups for a, fa, b, fb in comparisons]
    comparisons += [(name, "complete", name.partition("@")[0], "complete") for name in by_arm if "@" in name]
    for a, fa, b, fb in comparisons:
        seeds = sorted({r["seed"] for r in by_arm.get(a, [])} & {r["seed"] for r in by_arm.get(b, [])})
        if not seeds or (a == b and fa == fb):
            continue
        parts = []
        for seed in seeds:
            ra = next(r for r in by_arm[a] if r["seed"] == seed)
            rb = next(r for r in by_arm[b] if r["seed"] == seed)
            p = evaluation.paired(torch.tensor(ra[fa])[:, 0], torch.tensor(rb[fb])[:, 0])
            parts.append(f"seed {seed}: {p['mean_diff']:+.4f} ± {p['se']:.4f} (a lower in {p['a_lower']:.0%})")
        print(f"  {a} ({fa}) - {b} ({fb}): " + "; ".join(parts))
    for name, rows in by_arm.items():
        shares = [r["extraction_gradient_share"] for r in rows if "extraction_gradient_share" in r]
        if shares:
            print(f"  {name}: share of the UNet gradient that flows through the extraction pass "
                  f"{evaluation.format_pm(*evaluation.mean_spread(shares))}")
    print("\nselectivity of the generation pass's attention onto the subject keys (16 pairs, mean over layers and "
          "seeds): mass from region / outside queries, the subject keys' share of keys (uniform attention), "
          "entropy within the subject keys and over all keys (1 = uniform)")
    for name, rows in by_arm.items():
        stats = [r["selectivity"] for r in rows if r.get("selectivity")]
        if stats:
            mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
            print(f"  {name}: region {mean['region_share']:.3f} / outside {mean['outside_share']:.3f} vs key "
                  f"ratio {mean['key_ratio']:.3f}; entropy within subject {mean['subject_entropy']:.3f}, over all "
                  f"keys {mean['content_entropy']:.3f}" + match_text(mean))
    print("\ncopy selectivity: the same measures for the model's stock self-attention on the side-by-side input "
          "(the subject known beside the scene, zero context, no recycling): region queries onto the subject's cells")
    for name, rows in by_arm.items():
        stats = [r["copy_selectivity"] for r in rows if r.get("copy_selectivity")]
        if stats:
            mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
            print(f"  {name}: region {mean['region_share']:.3f} / outside {mean['outside_share']:.3f} vs key "
                  f"ratio {mean['key_ratio']:.3f}; entropy within subject {mean['subject_entropy']:.3f}"
                  + match_text(mean))
    print("\nper timestep, complete transmission, mean over seeds: true subject / other subjects, identified")
    for name, rows in by_arm.items():
        if "complete_by_timestep" not in rows[0]:
            continue
        cells = []
        for i, t in enumerate(rows[0]["eval_timesteps"]):
            stats = [evaluation.identification(torch.tensor(r["complete_by_timestep"][i])) for r in rows]
            cells.append(f"t={t}: {sum(float(x['true'].mean()) for x in stats) / len(stats):.3f} / "
                         f"{sum(float(x['other'].mean()) for x in stats) / len(stats):.3f}, "
                         f"{sum(float(x['hit'].mean()) for x in stats) / len(stats):.2f}")
        print(f"  {name}: " + "; ".join(cells))
    print("\ntraining curves (loss / region loss over each logging window; held-out true vs other, 16 pairs):")
    for r in results:
        pts = r["curve"]
        picks = [pts[0], pts[len(pts) // 2], pts[-1]] if len(pts) > 2 else pts
        label = variant(r["arm"], r.get("init", ""), r.get("lr", DEFAULT_LR), r["steps"])
        print(f"  {label} seed {r['seed']}: " + " | ".join(
            f"step {p['step']}: {p['loss']:.3f}/{p['region_loss']:.3f}, {p['held_true']:.3f} vs "
            f"{p['held_other']:.3f}, id {p['held_identified']:.2f}" for p in picks))


@torch.no_grad()
def position_codes(model, data, *, gap: int = 0, timesteps=(800, 350), device="cpu") -> dict:
    """{t: {layer: held-out accuracy of a linear read-out of the offset of a region query in its region, and of a
    subject key in its subject, from the layer's q / k}} on the side-by-side input (first half of the pairs fit,
    second half scored): whether the codes an attention would have to match by position exist at all."""
    from lab.attention_probe import PositionCodes

    data = data.to(device)
    z0, concat = side_by_side(data.z0, data.concat, data.subject, gap)
    source = torch.zeros_like(concat[:1, :1])
    source[..., :data.subject.shape[2], data.z0.shape[-1] + gap:] = 1
    context = torch.zeros(z0.shape[0], 1, int(model.model_config.unet_config["context_dim"]), device=device)
    result = {}
    for t in timesteps:
        probe = PositionCodes(concat[:, :1].cpu(), source.cpu())
        options = {"patches_replace": {"attn1": {slot.key: probe for slot in transformer_slots(model)}}}
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1000 + t)).to(device)
        sigma = model.model_sampling.sigmas[t].float().expand(z0.shape[0]).to(device)
        model.apply_model(noised(model, z0, noise, sigma), sigma, c_concat=concat, c_crossattn=context,
                          transformer_options=options)
        result[t] = probe.readout()
    return result


def print_position_codes(args) -> None:
    import safetensors.torch

    model, _ = build_micro_model(seed=0, shape=args.unet_shape)
    if args.position_probe != "random":
        state = safetensors.torch.load_file(args.position_probe)
        unet = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith("image_projection.")}
        model.diffusion_model.load_state_dict(unet)
    held_pairs = S.make_pairs(args.held_pairs, S.HELD_OUT_SUBJECTS, args.held_pairs, seed=2)
    data = anylogo_data.build(held_pairs, build_micro_image_encoder(seed=0), scale=args.scale)
    print(f"position codes of {args.position_probe} on the side-by-side input (gap {args.copy_gap}): held-out accuracy "
          f"of a linear read-out of the region query's offset / the subject key's offset from q / k")
    for t, layers in position_codes(model, data, gap=args.copy_gap, device=torch.device(args.device)).items():
        print(f"  t={t}: " + "; ".join(f"{name} query {v['query']:.2f} key {v['key']:.2f} (chance {v['chance']:.2f})"
                                       for name, v in layers.items()))


def match_text(mean: dict) -> str:
    if "match_share" not in mean:
        return ""
    return f"; on the corresponding key {mean['match_share']:.3f} (uniform {mean['match_uniform']:.3f})"


def print_receptive_field(args) -> None:
    from lab.receptive_field import convolution_reach

    model, _ = build_micro_model(seed=0, shape=args.unet_shape)
    size = 80 if args.unet_shape == "two-level" else 32  # wider than any reach: nothing is clipped
    reach = convolution_reach(model, size)
    scene = S.SCENE_PX // S.BLOCK * args.scale
    subject = S.SUBJECT_PX // S.BLOCK * args.scale
    print(f"{args.unet_shape} micro UNet: side of the input square each layer sees through its convolutions "
          f"alone (self-attention replaced by its values, GroupNorm statistics off), in latent cells; a cell "
          f"reaches (side - 1) / 2 cells each way")
    print("  " + ", ".join(f"{name} {side}" for name, side in reach.items()))
    print(f"  scene latent {scene}x{scene}; side-by-side source at least {subject + args.copy_gap} cells "
          f"right of its region cell (gap {args.copy_gap})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="decoder,blocked,encoder,both",
                        help=f"comma list of {sorted(ARMS)}, run in this order per seed round")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="fine-tuning steps per arm (0: evaluate the start itself, e.g. the pretrained base)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--init", choices=("random", "pretrained"), default="random",
                        help="arms start from random weights (default) or from one pretrained base (cached in --out)")
    parser.add_argument("--pretrain-task", choices=PRETRAIN_TASKS, default="denoise",
                        help="denoise: the stock model on the scenes with the region hidden / visible / no region; "
                             "copy: the side-by-side control's input")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--pretrain-lr", type=float, default=0.0, help="0: --lr")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--train-subjects", type=int, default=3000)
    parser.add_argument("--held-pairs", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--encoder-pool", type=int, default=1,
                        help="the image encoder sees only NxN block means of the subject (1: every pixel)")
    parser.add_argument("--scale", type=int, default=1,
                        help="repeat every pixel NxN before the latents are taken (2: 16x16 scene latents)")
    parser.add_argument("--unet-shape", choices=UNET_SHAPES, default="two-level",
                        help="one-level: no downsampling, no middle block (convolutions reach 15 cells, not 59)")
    parser.add_argument("--copy-gap", type=int, default=0,
                        help="known grey latent columns between the scene and the subject in the side-by-side input "
                             "(copy pretraining, the control, the copy-selectivity probe)")
    parser.add_argument("--position-code", type=float, default=0.0,
                        help="scale of a fixed code of each cell's offset on the subject's keys and the region's "
                             "queries (lab/position_code.py; 1 = the norm of the attention input; 0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="", help="folder for one JSON per (arm, seed); reruns skip those present")
    parser.add_argument("--quick", action="store_true", help="smoke run: decoder and blocked, one seed, 300 steps")
    parser.add_argument("--table-only", action="store_true", help="print the table from --out and stop")
    parser.add_argument("--position-probe", default="",
                        help="a result's .safetensors (or 'random'): print whether its q / k carry the position codes "
                             "a copy by attention needs, and stop")
    parser.add_argument("--receptive-field", action="store_true",
                        help="print the convolutions' reach of each layer of --unet-shape and stop")
    args = parser.parse_args(argv)
    if args.quick:
        args.arms, args.seeds, args.steps, args.log_every = "decoder,blocked", "0", 300, 100
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))] if out else []
    results = [r for r in results if "arm" in r]  # base_*.json describe pretrained bases
    if args.position_probe:
        print_position_codes(args)
        return
    if args.receptive_field:
        print_receptive_field(args)
        return
    if args.table_only:
        print_table(results, 1.0 / args.candidates)
        return
    started = time.perf_counter()
    encoder = build_micro_image_encoder(seed=0)
    pool, candidates = setup_data(args, encoder)
    print(f"data: {pool.z0.shape[0]} training pairs over {args.train_subjects} subjects, {args.held_pairs} held-out "
          f"pairs x {args.candidates} candidates ({time.perf_counter() - started:.0f} s); torch threads "
          f"{torch.get_num_threads()}, device {args.device}", flush=True)
    base = pretrained_base(pool, args) if args.init == "pretrained" else None
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.arms.split(","):
            path = out / f"{variant(name, init_tag(args), args.lr, args.steps)}_seed{seed}.json" if out else None
            if path and path.exists():
                continue
            result = train_arm(name, seed, pool, candidates, args, base)
            results.append(result)
            if path:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
            print(f"{name} seed {seed}: trained {result['train_seconds']:.0f} s, evaluated "
                  f"{result['eval_seconds']:.0f} s", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    print_table(results, 1.0 / args.candidates)


if __name__ == "__main__":
    main()
