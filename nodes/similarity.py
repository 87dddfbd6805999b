"""Subject Similarity: CLIP-I / CLIP-T / DINO-I / LPIPS of generated images against the subject, in a workflow."""
from __future__ import annotations

import math

import torch

from ..image_ops import similarity as sim
from ..image_ops.lpips import LPIPSWeightsError, load_lpips
from ..image_ops.vision_features import VisionModelError
from . import validation

CATEGORY = "subject_customization/evaluation"
NODE = "Subject Similarity"
NONE = "none"
NOT_COMPUTED = -1.0
RANKS = ("auto", *sim.METRICS)
_LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_i": "DINO-I", "lpips": "LPIPS"}
_lpips_cache: dict[tuple, object] = {}


def _lpips_files() -> list[str]:
    import folder_paths

    try:
        return [NONE, *folder_paths.get_filename_list("lpips")]
    except KeyError:  # the pack's folders are not registered (node imported outside ComfyUI's loader)
        return [NONE]


def _load_lpips(name: str):
    import os

    import comfy.model_management as mm
    import folder_paths

    path = folder_paths.get_full_path("lpips", name) or os.path.join(folder_paths.models_dir, "lpips", name)
    key = (path, os.path.getmtime(path) if os.path.exists(path) else None)
    if key not in _lpips_cache:
        _lpips_cache.clear()
        _lpips_cache[key] = load_lpips(path, mm.get_torch_device())
    return _lpips_cache[key]


def prompts_for(text: str, batch: int) -> list[str] | None:
    """One prompt for all generated images, or one per line for each; empty text → no CLIP-T."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    if len(lines) == 1:
        return lines * batch
    if len(lines) != batch:
        raise validation.InputError(f"{NODE}: text has {len(lines)} prompt lines for {batch} generated images; "
                                    "give one line for all, or one line per generated image")
    return lines


def rank(scores: dict[str, torch.Tensor], rank_by: str) -> tuple[str, int]:
    if rank_by == "auto":
        rank_by = next(m for m in ("dino_i", "clip_i", "clip_t", "lpips") if m in scores)
    if rank_by not in scores:
        raise validation.InputError(f"{NODE}: rank_by is {rank_by!r} but {_LABELS[rank_by]} is not computed "
                                    f"(computed: {', '.join(scores)}); connect its model, or rank by 'auto'")
    values = scores[rank_by]
    return rank_by, int(values.argmin() if rank_by == "lpips" else values.argmax())


def report(scores: dict[str, torch.Tensor], settings: sim.Settings, batch: int, refs: int, ranked: str,
           best: int) -> str:
    lines = [f"Subject Similarity ({sim.METRIC_VERSION}, region {settings.region}, {batch} generated x {refs} "
             f"reference{'s' if refs != 1 else ''})"]
    for index in range(batch):
        lines.append(f"image {index}: " + "  ".join(f"{_LABELS[m]} {v[index].item():.4f}" for m, v in scores.items()))
    lines.append("mean: " + "  ".join(f"{_LABELS[m]} {v.mean().item():.4f}" for m, v in scores.items()))
    lines.append(f"best by {_LABELS[ranked]}: image {best}")
    return "\n".join(lines)


class SC_SubjectSimilarity:
    DESCRIPTION = (
        "Scores generated images against the subject the way the papers do: CLIP-I and DINO-I (cosine of CLIP "
        "image embeddings / DINOv2 class tokens, averaged over the reference images), CLIP-T (CLIP image vs "
        "projected text embedding of the prompt) and LPIPS (lower = closer; needs a local weights file in "
        "models/lpips). Region 'box' scores the mask's box of each generated image (AnyLogo), 'segment' the "
        "masked subject on white (CustomContrast's E-DI/E-CI). Gives a report, the mean scores and the index of "
        "the best image, for Image From Batch. Scores not computed are -1. Same numbers as python -m "
        "train.evaluate.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT", "INT")
    RETURN_NAMES = ("report", "clip_i", "clip_t", "dino_i", "lpips", "best_index")
    OUTPUT_TOOLTIPS = ("Per-image and mean scores as text.",
                       "Mean CLIP-I over the generated batch (-1 when no CLIP vision model is connected).",
                       "Mean CLIP-T (-1 without CLIP vision, CLIP text and a prompt).",
                       "Mean DINO-I (-1 without a DINOv2 model).",
                       "Mean LPIPS, lower is closer (-1 when lpips_weights is none).",
                       "Batch index of the best generated image by rank_by (for the stock Image From Batch).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "generated": ("IMAGE", {"tooltip": "The generated image(s) to score, e.g. one per seed."}),
                "reference": ("IMAGE", {"tooltip": "The subject's reference image(s); every generated image is "
                                                   "compared with each and the scores averaged."}),
                "region": (list(sim.REGIONS), {"default": "full",
                                               "tooltip": "full: whole images (DreamBench, EqDiff, P3S). box: "
                                                          "crop each generated image to its mask's box (AnyLogo's "
                                                          "region vs subject). segment: outside the mask becomes "
                                                          "white, then the box crop (CustomContrast E-DI/E-CI). "
                                                          "References use reference_mask when connected."}),
                "dino_size": ("INT", {"default": 224, "min": 28, "max": 1036, "step": 14,
                                      "tooltip": "Side DINOv2 sees (centre crop): 224 as in DreamBench-style "
                                                 "evaluation, 518 is ComfyUI's native DINOv2 side."}),
                "lpips_weights": (_lpips_files(), {"default": NONE,
                                                   "tooltip": "LPIPS network file in models/lpips (see the README: "
                                                              "nothing is downloaded); none = no LPIPS."}),
                "lpips_size": ("INT", {"default": 256, "min": 16, "max": 1024, "step": 8,
                                       "tooltip": "Both views are resized to this square before LPIPS."}),
                "rank_by": (list(RANKS), {"default": "auto",
                                          "tooltip": "Score that picks best_index: auto = DINO-I, else CLIP-I, "
                                                     "CLIP-T, LPIPS (the lowest LPIPS wins)."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT vision (e.g. CLIP ViT-L/14, Load CLIP "
                                                           "Vision): CLIP-I, and CLIP-T with clip + text."}),
                "dinov2": ("CLIP_VISION", {"tooltip": "DINOv2 (e.g. dinov2-large, Load CLIP Vision): DINO-I."}),
                "clip": ("CLIP", {"tooltip": "CLIP-L text encoder with its projection (clip_l.safetensors via Load "
                                             "CLIP, type stable_diffusion; an SD1.5 checkpoint's CLIP lacks the "
                                             "projection): CLIP-T."}),
                "text": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "The prompt(s) for CLIP-T: one line for all generated images, or "
                                               "one line per image. Empty = no CLIP-T."}),
                "generated_mask": ("MASK", {"tooltip": "Where the subject is in the generated images (one mask "
                                                       "for all or one per image), for region box/segment."}),
                "reference_mask": ("MASK", {"tooltip": "Where the subject is in the reference images (one for "
                                                       "all or one per reference); used by box/segment."}),
            },
        }

    def score(self, generated, reference, region, dino_size, lpips_weights, lpips_size, rank_by,
              clip_vision=None, dinov2=None, clip=None, text="", generated_mask=None, reference_mask=None):
        generated = validation.image(generated, "generated", NODE)
        reference = validation.image(reference, "reference", NODE)
        batch, refs = generated.shape[0], reference.shape[0]
        if generated_mask is not None:
            generated_mask = validation.mask(generated_mask, "generated_mask", NODE, images=batch,
                                             of="generated image")
        if reference_mask is not None:
            reference_mask = validation.mask(reference_mask, "reference_mask", NODE, images=refs,
                                             of="reference image")
        if rank_by not in RANKS:
            raise validation.InputError(f"{NODE}: rank_by must be one of {list(RANKS)}, got {rank_by!r}")
        prompts = prompts_for(text, batch)
        try:
            lpips = None if lpips_weights in (None, "", NONE) else _load_lpips(lpips_weights)
            encoders = sim.Encoders(clip_vision=clip_vision, dinov2=dinov2, clip_text=clip, lpips=lpips)
            if clip_vision is None and dinov2 is None and lpips is None:
                raise sim.SimilarityError("nothing to compute: connect a CLIP vision model (CLIP-I), a DINOv2 "
                                          "model (DINO-I) or choose lpips_weights")
            if clip is not None and prompts is None:
                raise sim.SimilarityError("a CLIP text model is connected but text is empty: write the prompt "
                                          "(CLIP-T), or disconnect clip")
            settings = sim.Settings(region=region, dino_size=dino_size, lpips_size=lpips_size)
            scores = sim.score(generated.movedim(-1, 1), reference.movedim(-1, 1), encoders, settings,
                               generated_masks=generated_mask, reference_masks=reference_mask, prompts=prompts)
        except (sim.SimilarityError, VisionModelError, LPIPSWeightsError) as e:
            raise validation.InputError(f"{NODE}: {e}") from None
        ranked, best = rank(scores, rank_by)
        means = {m: float(scores[m].mean()) if m in scores else NOT_COMPUTED for m in sim.METRICS}
        if any(not math.isfinite(v) for v in means.values()):
            raise validation.InputError(f"{NODE}: a score is not finite ({means}); the models give non-finite "
                                        "embeddings (check the weights files)")
        return (report(scores, settings, batch, refs, ranked, best), means["clip_i"], means["clip_t"],
                means["dino_i"], means["lpips"], best)


NODE_CLASS_MAPPINGS = {"SC_SubjectSimilarity": SC_SubjectSimilarity}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_SubjectSimilarity": "Subject Similarity"}
