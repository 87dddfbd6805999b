"""What the validation layer costs: AnyLogo Apply + sampling steps with the checks on vs the checks stubbed out,
interleaved in the same run (the ratio is what to read), plus the checks alone on a large IMAGE.

The checks run once per node execution (never inside a sampling step), so a step costs the same either way; this
measures the whole "apply, then sample" path to show it. Tiny SD1.5-inpainting UNet, CFG on, euler.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_validation.py [--side 256] [--steps 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))
from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402


@contextlib.contextmanager
def checks_stubbed(pack: str):
    """The pack's validation entry points replaced by pass-throughs (what the nodes did before the layer)."""
    validation = sys.modules[pack + ".nodes.validation"]
    anylogo = sys.modules[pack + ".model_patches.anylogo"]
    saved = {name: getattr(validation, name) for name in ("image", "mask", "float_widgets", "finite_tensor")}
    saved_finite = anylogo.require_finite
    validation.image = lambda value, *a, **k: value
    validation.mask = lambda value, *a, **k: value if value.ndim == 3 else value[None]
    validation.float_widgets = lambda *a, **k: None
    validation.finite_tensor = lambda value, *a, **k: value
    anylogo.require_finite = lambda value, *a, **k: value
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(validation, name, fn)
        anylogo.require_finite = saved_finite


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    checkpoints = tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15_inpainting.safetensors", inpainting=True).parent
    nodes = init_comfyui(extra_model_dirs={"checkpoints": checkpoints})
    pack = str(PACK_ROOT).replace(".", "_x_")
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15_inpainting.safetensors")[:3]
    positive = nodes.CLIPTextEncode().encode(clip, "a logo on a shirt")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    side = args.side
    scene = torch.full((1, side, side, 3), 0.6)
    mask = torch.zeros(1, side, side)
    mask[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    positive, negative, latent = nodes.InpaintModelConditioning().encode(positive, negative, scene, vae, mask, True)
    subject = torch.rand(1, 96, 160, 3)
    subject_mask = torch.ones(1, 96, 160)
    apply = nodes.NODE_CLASS_MAPPINGS["SC_AnyLogoApply"]()

    def apply_and_sample():
        start = time.perf_counter()
        patched = apply.apply(model, vae, subject, "decoder", 1.0, 1.0, 0.0, 1.0, 0, 64, subject_mask=subject_mask)[0]
        applied = time.perf_counter()
        nodes.common_ksampler(patched, 1, args.steps, 5.0, "euler", "normal", positive, negative, latent)
        done = time.perf_counter()
        return applied - start, (done - applied) / args.steps

    apply_and_sample()  # warm up
    best = {"validated": [float("inf")] * 2, "checks stubbed": [float("inf")] * 2}
    for _ in range(args.repeats):  # interleaved so load changes hit both alike
        for name in best:
            with checks_stubbed(pack) if name == "checks stubbed" else contextlib.nullcontext():
                apply_s, step_s = apply_and_sample()
            best[name] = [min(best[name][0], apply_s), min(best[name][1], step_s)]
    base = best["checks stubbed"]
    print(f"device cpu, torch threads {torch.get_num_threads()}, tiny SD1.5-inpainting UNet, {side}x{side} px, "
          f"CFG on, best of {args.repeats}")
    print(f"{'variant':<18}{'apply s':>10}{'s/step':>10}{'apply+1 step':>14}{'step ratio':>12}{'total ratio':>13}")
    for name, (apply_s, step_s) in best.items():
        print(f"{name:<18}{apply_s:>10.4f}{step_s:>10.4f}{apply_s + step_s:>14.4f}{step_s / base[1]:>12.3f}"
              f"{(apply_s + step_s) / (base[0] + base[1]):>13.3f}")

    validation = sys.modules[pack + ".nodes.validation"]
    big = torch.rand(4, 1024, 1024, 3)
    start = time.perf_counter()
    for _ in range(5):
        validation.image(big, "image", "bench")
    check_s = (time.perf_counter() - start) / 5
    print(f"validation.image on a 4x1024x1024x3 IMAGE: {check_s * 1000:.1f} ms "
          f"(= {check_s / best['validated'][1]:.3f} of one {side} px step above; once per node run, not per step)")


if __name__ == "__main__":
    main()
