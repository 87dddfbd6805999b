"""Cost of P3S relative to the same model without it, measured in the same run (not a timed test).

* sampling step, CFG on, batch 1, euler: unpatched vs P3S (with and without the cross-attention enhancement),
  on the tiny test UNet and, with ``--full``, a full-size SD1.5 UNet with random weights (the copy is built
  from it, so it has the full copy's size);
* training step (forward + backward, batch 1) of ``train.p3s``'s forward (copy + RNGR trainable, L_ac on the last
  layer) vs a plain denoising step that trains the UNet's attention projections, on the tiny UNet.

On CPU the absolute times mean little; the ratios are what to read.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_p3s.py [--full] [--side 256] [--steps 2]
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


def p3s_variants(model):
    from model_patches.p3s import P3SSettings, build_patch
    from model_patches.p3s_copy import InjectionCopy
    from model_patches.p3s_rngr import RNGREncoder

    copy = InjectionCopy(model)
    variants = {"unpatched": model}
    for name, cross in (("P3S", True), ("P3S, no cross-attention", False)):
        patched = model.clone()
        build_patch(patched, copy, RNGREncoder(clip_width=1024), torch.randn(1, 4, 64, 64),
                    torch.randn(1, 257, 1024), P3SSettings(cross_attention=cross)).install(patched)
        variants[name] = patched
    return variants, sum(p.numel() for p in copy.parameters()), sum(
        p.numel() for p in model.model.diffusion_model.parameters())


def sampling(label, model, positive, negative, side, steps, repeats):
    variants, copy_params, unet_params = p3s_variants(model)
    bench_anylogo.run(model, positive, negative, side, 1)
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, m in variants.items():
            best[name] = min(best[name], bench_anylogo.run(m, positive, negative, side, steps))
    print(f"\n{label}, {side}x{side} px, CFG on, batch 1, best of {repeats} x {steps} steps; copy "
          f"{copy_params / 1e6:.0f}M parameters = {copy_params / unet_params:.2f} of the UNet's {unet_params / 1e6:.0f}M")
    for name in variants:
        print(f"{name:<28}{best[name]:>10.3f} s/step{best[name] / best['unpatched']:>8.2f}x")


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 UNet (slow on CPU)")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per measurement, full-size UNet")
    parser.add_argument("--tiny-steps", type=int, default=6, help="sampling steps per measurement, tiny UNet "
                        "(enough that the per-call set-up of comfy.sample does not dominate)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    nodes = init_comfyui(extra_model_dirs={"checkpoints": tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors").parent})
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of sks toy")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    sampling("tiny SD1.5 UNet", model, positive, negative, 64, args.tiny_steps, args.repeats)
    training(model, clip, args.repeats)
    if args.full:
        sampling("full-size SD1.5 UNet (random weights)", bench_anylogo.full_size_sd15_patcher(False), positive,
                 negative, args.side, args.steps, args.repeats)


if __name__ == "__main__":
    main()
