"""Cost of P3S relative to the same model without it, measured in the same run (not a timed test).

* sampling step, CFG on, batch 1, euler: unpatched vs P3S (with and without the cross-attention enhancement),
  on the tiny test UNet and, with ``--full``, a full-size SD1.5 UNet with random weights (the copy is built
  from it, so it has the full copy's size);
* training step (forward + backward, batch 1) of ``train.p3s``'s forward (copy + RNGR trainable, L_ac on the last
  layer) vs a plain denoising step that trains the UNet's attention projections, on the tiny UNet.

On CPU the absolute times mean little; the ratios are what to read.

``--train-node`` times the **P3S Train Subject** node itself, as ComfyUI's executor runs it (under
inference_mode, its ProgressBar hooked), with its default schedule (60 epochs at 512 px, lr 1e-5) on the tiny
checkpoint and a random full-layout CLIP ViT-L/14: wall time, and time per training step from the progress
callbacks (the rest is loading, the mask, the reference and the export).

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_p3s.py [--full] [--side 512] [--steps 2] [--skip-tiny]
    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_p3s.py --skip-tiny --train-node [--epochs 60]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_anylogo", Path(__file__).with_name("bench_anylogo.py"))
bench_anylogo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_anylogo)


def p3s_variants(model, side):
    from model_patches.p3s import P3SSettings, build_patch
    from model_patches.p3s_copy import InjectionCopy
    from model_patches.p3s_rngr import RNGREncoder

    copy = InjectionCopy(model)
    with torch.no_grad():  # non-zero gates: the widened attention runs as with a trained copy
        copy.gates.fill_(1.0)
    variants = {"unpatched": model}
    for name, cross in (("P3S", True), ("P3S, no cross-attention", False)):
        patched = model.clone()
        build_patch(patched, copy, RNGREncoder(clip_width=1024), torch.randn(1, 4, side // 8, side // 8),
                    torch.randn(1, 257, 1024), P3SSettings(cross_attention=cross)).install(patched)
        variants[name] = patched
    return variants, sum(p.numel() for p in copy.parameters()), sum(
        p.numel() for p in model.model.diffusion_model.parameters())


class Timers:
    """Wall time spent inside chosen functions during one sampling run (wrapped in place, restored after)."""

    def __init__(self, targets: dict):
        self.targets, self.spent, self.saved = targets, {name: 0.0 for name in targets}, {}

    def __enter__(self):
        for name, (owner, attribute) in self.targets.items():
            original = getattr(owner, attribute)
            self.saved[name] = (attribute in vars(owner), original)

            def timed(*args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.spent[_name] += time.perf_counter() - start
            setattr(owner, attribute, timed)
        return self

    def __exit__(self, *exc):
        for name, (owner, attribute) in self.targets.items():
            own, original = self.saved[name]
            if own:
                setattr(owner, attribute, original)
            else:  # an instance attribute that shadowed the class's method (a module's forward)
                delattr(owner, attribute)


def where_the_time_goes(variants, positive, negative, side, steps):
    """One P3S run with timers on the copy's forward and the gated self-attention (the host's kernel over the
    own keys and over own + appended), beside one unpatched run with a timer on all its attention kernels."""
    import comfy.ldm.modules.attention as attention
    from model_patches import p3s

    patch = variants["P3S"].get_attachment(p3s.ATTACHMENT)
    with Timers({"copy": (patch.copy, "forward"), "gated": (p3s, "gated_self_attention")}) as timers:
        total = bench_anylogo.run(variants["P3S"], positive, negative, side, steps)
    with Timers({"kernels": (attention, "optimized_attention")}) as plain:
        base = bench_anylogo.run(variants["unpatched"], positive, negative, side, steps)
    per_step = {k: v / steps for k, v in (*timers.spent.items(), *plain.spent.items())}
    print(f"where the time goes (one more run of {steps} step(s) each; P3S {total:.3f} s/step, unpatched "
          f"{base:.3f} s/step):")
    rows = [("P3S: injection copy forward", per_step["copy"], total),
            ("P3S: gated self-attention (2 kernel calls)", per_step["gated"], total),
            ("P3S: the rest (frozen UNet, widening, g)", total - per_step["copy"] - per_step["gated"], total),
            ("unpatched: attention kernels (self + cross)", per_step["kernels"], base)]
    for name, value, of in rows:
        print(f"  {name:<46}{value:>8.3f} s/step {value / of:>6.1%}")


def sampling(label, model, positive, negative, side, steps, repeats, profile=False):
    variants, copy_params, unet_params = p3s_variants(model, side)
    for name, m in variants.items():  # warm-up of every variant: loading (the copy too), allocators, caches
        seconds = bench_anylogo.run(m, positive, negative, side, 1)
        print(f"  warm-up {name}: {seconds:.3f} s (not counted)", flush=True)
    best = {name: float("inf") for name in variants}
    for repeat in range(repeats):  # interleaved so load changes hit every variant alike
        for name, m in variants.items():
            seconds = bench_anylogo.run(m, positive, negative, side, steps)
            best[name] = min(best[name], seconds)
            print(f"  repeat {repeat + 1} {name}: {seconds:.3f} s/step", flush=True)
    print(f"\n{label}, {side}x{side} px, CFG on, batch 1, best of {repeats} x {steps} steps; copy "
          f"{copy_params / 1e6:.0f}M parameters = {copy_params / unet_params:.2f} of the UNet's {unet_params / 1e6:.0f}M")
    for name in variants:
        print(f"{name:<28}{best[name]:>10.3f} s/step{best[name] / best['unpatched']:>8.2f}x")
    if profile:
        where_the_time_goes(variants, positive, negative, side, steps)


def training(model, clip, repeats):
    from model_patches.p3s import ConsistencyRecord, P3SSettings, attention_consistency_loss, build_patch, \
        with_map_recording
    from model_patches.p3s_copy import InjectionCopy
    from model_patches.p3s_rngr import RNGREncoder
    from model_patches.unet_layout import transformer_slots

    base = model.model
    context = clip.encode_from_tokens(clip.tokenize("a photo of sks toy"))  # [1, 77, 768]
    copy, rngr = InjectionCopy(model), RNGREncoder(clip_width=1024)
    patched = model.clone()
    build_patch(patched, copy, rngr, torch.randn(1, 4, 8, 8), torch.randn(1, 257, 1024), P3SSettings()).install(patched)
    attention = [p for n, p in base.named_parameters() if ".attn1." in n or ".attn2." in n]
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([5.0])
    last = (transformer_slots(model)[-1].key,)

    def plain():
        for p in attention:
            p.requires_grad_(True)
        base.apply_model(x, sigma, c_crossattn=context, transformer_options={}).square().mean().backward()
        for p in attention:
            p.requires_grad_(False)
            p.grad = None

    def p3s():
        for p in (*copy.parameters(), *rngr.parameters()):
            p.requires_grad_(True)
        record = ConsistencyRecord(last)
        out = base.apply_model(x, sigma, c_crossattn=context,
                               transformer_options=with_map_recording(patched.model_options["transformer_options"],
                                                                      record))
        lac = attention_consistency_loss(record.copy_maps[last[0]]["map"], record.base_maps[last[0]]["map"])
        (out.square().mean() + 0.1 * lac).backward()
        for p in (*copy.parameters(), *rngr.parameters()):
            p.requires_grad_(False)
            p.grad = None

    times = {"plain denoising step (attention projections)": plain, "P3S training step": p3s}
    best = {name: float("inf") for name in times}
    for fn in times.values():
        fn()
    for _ in range(repeats):
        for name, fn in times.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    first = next(iter(best.values()))
    print("\ntraining step, tiny UNet, 64x64 px, batch 1")
    for name, value in best.items():
        print(f"{name:<46}{value:>8.3f} s{value / first:>8.2f}x")


def train_node(nodes, epochs: int, resolution: int) -> None:
    """Wall time of P3S Train Subject's default schedule, as a ComfyUI user runs it (two look-alikes, one click
    each)."""
    import tempfile

    import comfy.utils
    import folder_paths

    folder_paths.add_model_folder_path("p3s", tempfile.mkdtemp(prefix="bench_p3s_node_"), is_default=True)
    image = torch.full((1, resolution, resolution, 3), 0.2)
    third = resolution // 3
    image[:, third:2 * third, resolution // 16:resolution // 16 + third] = torch.tensor([0.9, 0.1, 0.1])
    image[:, third:2 * third, resolution // 2:resolution // 2 + third] = torch.tensor([0.9, 0.15, 0.1])
    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             ticks.append((value, time.perf_counter())))
    node = nodes.NODE_CLASS_MAPPINGS["SC_P3STrainSubject"]()
    started = time.perf_counter()
    try:
        with torch.inference_mode():  # how ComfyUI's executor calls every node
            node.train(ckpt_name="tiny_sd15.safetensors", clip_vision_name="random_clip_vit_l.safetensors",
                       image=image, positive_points=f"{resolution // 16 + third // 2},{resolution // 2}",
                       negative_points=f"{resolution // 2 + third // 2},{resolution // 2}", class_word="toy",
                       identifier="sks", name="bench_node", epochs=epochs, learning_rate=1e-5,
                       resolution=resolution, seed=0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    wall = time.perf_counter() - started
    first_at = {}
    for value, t in ticks:  # the time each step count was first reported
        first_at.setdefault(value, t)
    done = sorted(v for v in first_at if v >= 1)
    per_step = ((first_at[done[-1]] - first_at[done[0]]) / (done[-1] - done[0]) if len(done) > 1
                else float("nan"))
    print(f"P3S Train Subject, {epochs} epochs at {resolution} px on the tiny SD1.5: {wall:.0f} s wall, "
          f"{per_step:.2f} s per step after the first, {wall - per_step * epochs:.0f} s outside the steps "
          f"(load, mask, reference, export)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 UNet (slow on CPU)")
    parser.add_argument("--side", type=int, default=512, help="image side of the full-size run (SD1.5: 512)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per measurement, full-size UNet")
    parser.add_argument("--skip-tiny", action="store_true", help="only the full-size run")
    parser.add_argument("--tiny-steps", type=int, default=6, help="sampling steps per measurement, tiny UNet "
                        "(enough that the per-call set-up of comfy.sample does not dominate)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-node", action="store_true", help="time P3S Train Subject's default schedule")
    parser.add_argument("--epochs", type=int, default=60, help="--train-node: epochs (the node's default 60)")
    parser.add_argument("--resolution", type=int, default=512, help="--train-node: the node's default 512")
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    cache = tiny_models.default_cache_dir()
    dirs = {"checkpoints": tiny_models.build_sd15_checkpoint(cache / "checkpoints" / "tiny_sd15.safetensors").parent}
    if args.train_node:
        dirs["clip_vision"] = tiny_models.build_full_layout_vision_file(
            cache / "clip_vision" / "random_clip_vit_l.safetensors", "clip_vit_l").parent
    nodes = init_comfyui(extra_model_dirs=dirs)
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of sks toy")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    if not args.skip_tiny:
        sampling("tiny SD1.5 UNet", model, positive, negative, 64, args.tiny_steps, args.repeats)
        training(model, clip, args.repeats)
    if args.full:
        sampling("full-size SD1.5 UNet (random weights)", bench_anylogo.full_size_sd15_patcher(False), positive,
                 negative, args.side, args.steps, args.repeats, profile=True)
    if args.train_node:
        train_node(nodes, args.epochs, args.resolution)


if __name__ == "__main__":
    main()
