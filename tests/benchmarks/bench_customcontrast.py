"""Cost of a CustomContrast sampling step relative to the same model unpatched, measured in the same run.

CFG on, batch 1, euler; the patched step includes everything the method adds per step: the MFI encoder's per-step
part, one text-encoder batch of l prompts (l = the UNet's cross-attention layers: 7 for the tiny UNet, 16 for
full-size SD1.5) with the checkpoint's full CLIP-L, and the visual cross-attention in every layer. Also reports
the encoder's forward time and the text-encoder batch alone. Arms: location off (the default), location on
(§3.4: every layer also records the subject's placeholder and visual maps, and from the second step masks both
attentions), and two subjects with location on (two encoders, both S+ in the one text batch, two visual terms).
Random weights; on CPU read the ratios, not the absolute times.

    COMFYUI_PATH=/opt/ComfyUI python tests/benchmarks/bench_customcontrast.py [--full] [--side 512] [--steps 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))
from standalone.host import bootstrap  # noqa: E402

bootstrap()

import torch  # noqa: E402

from bench_anylogo import full_size_sd15_patcher, run  # noqa: E402


PROMPT = "a photo of sks next to ohwx on a beach"


def subject_patch(model, clip, seed: int, location: bool):
    from model_patches.customcontrast import CustomContrastPatch, VisualAttention
    from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
    from model_patches.customcontrast_text import PlaceholderPrompt
    from model_patches.unet_layout import transformer_slots

    torch.manual_seed(seed)
    slots = transformer_slots(model)
    # the paper's sizes: 3 CLIP ViT-L layers of 1024, 4-layer Q-Formers; 16 visual tokens
    config = EncoderConfig(feature_dim=3 * 1024, layers=len(slots), dim=768, visual_tokens=16, depth=4, heads=12)
    encoder, visual = MFIEncoder(config).eval(), VisualAttention(slots)
    for p in visual.parameters():
        torch.nn.init.normal_(p, std=0.02)
    features = torch.randn(1, 257, 3 * 1024)
    return CustomContrastPatch(encoder, visual, slots, PlaceholderPrompt.of(clip, PROMPT, "sks"), features, 1.0,
                               location=location)


def patched_model(model, clip, *, location: bool = False, subjects: int = 1):
    from model_patches.customcontrast_subjects import SubjectGroup
    from model_patches.customcontrast_text import PlaceholderPrompt

    words = ["sks", "ohwx"][:subjects]
    patches = [subject_patch(model, clip, seed, location) for seed in range(subjects)]
    patched = model.clone()
    SubjectGroup(patches, PlaceholderPrompt.of_words(clip, PROMPT, words), words).install(patched)
    patched.set_additional_models("customcontrast", [clip.patcher])
    return patched, patches[0]


def component_times(patch, repeats):
    with torch.inference_mode():
        image = patch.image_state()
        t = torch.tensor([500.0])
        best_enc = best_text = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = patch.encoder.forward_step(image, t)
            best_enc = min(best_enc, time.perf_counter() - start)
            start = time.perf_counter()
            patch.prompt.encode(out.s_plus)
            best_text = min(best_text, time.perf_counter() - start)
    return best_enc, best_text


def measure(label, model, clip, positive, negative, side, steps, repeats):
    patched, patch = patched_model(model, clip)
    variants = {"unpatched": model, "customcontrast": patched,
                "+ location": patched_model(model, clip, location=True)[0],
                "2 subjects + location": patched_model(model, clip, location=True, subjects=2)[0]}
    for m in variants.values():  # warm-up: first-call allocations, the cached image state
        run(m, positive, negative, side, 1)
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):  # interleaved so load changes hit both alike
        for name, m in variants.items():
            best[name] = min(best[name], run(m, positive, negative, side, steps))
    enc, text = component_times(patch, repeats)
    print(f"\n{label}, {side}x{side} px, CFG on, batch 1, best of {repeats} x {steps} steps, "
          f"l = {len(patch.slots)} layers")
    print(f"{'variant':<24}{'s/step':>10}{'ratio':>8}")
    for name in variants:
        print(f"{name:<24}{best[name]:>10.3f}{best[name] / best['unpatched']:>8.2f}")
    print(f"MFI encoder per-step part: {enc * 1000:.1f} ms; text-encoder batch of {len(patch.slots)}: "
          f"{text * 1000:.1f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-size SD1.5 UNet (slow on CPU)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-sides", default="64", help="comma list of sides for the tiny UNet (empty: none)")
    args = parser.parse_args()

    from standalone import tiny_models
    from standalone.runner import init_comfyui, quiet_comfyui_logging

    quiet_comfyui_logging()
    nodes = init_comfyui(extra_model_dirs={"checkpoints": tiny_models.build_sd15_checkpoint(
        tiny_models.default_cache_dir() / "checkpoints" / "tiny_sd15.safetensors").parent})
    model, clip = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    positive = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    for side in (int(s) for s in args.tiny_sides.split(",") if s.strip()):
        measure("tiny SD1.5 UNet + full CLIP-L", model, clip, positive, negative, side, args.steps, args.repeats)
    if args.full:
        measure("full-size SD1.5 UNet (random weights) + full CLIP-L", full_size_sd15_patcher(False), clip,
                positive, negative, args.side, args.steps, args.repeats)


if __name__ == "__main__":
    main()
