"""Subject fidelity and prompt alignment scores: CLIP-I, DINO-I, CLIP-T and LPIPS, one mechanism for the
*Subject Similarity* node and ``python -m train.evaluate``.

Definitions (what the papers measure; README "Evaluation" has each paper's protocol):

* **CLIP-I**: cosine of CLIP image embeddings (``image_embeds`` of ComfyUI's CLIP_VISION: the class token of
  the last layer, ``post_layernorm``, ``visual_projection``), generated vs each reference, averaged over the
  references. Preprocessing is ComfyUI's (and CLIP's): shorter side resized to the model's input side (224 for
  ViT-L/14), bicubic with antialiasing, centre crop, 8-bit quantised, CLIP mean/std.
* **DINO-I**: the same with the DINOv2 class token after the model's final layer norm (ComfyUI's
  ``pooled_output``), at ``dino_size`` (224 by default, the DreamBench-style evaluation side; position embeddings
  are interpolated as DINOv2 does; 518 is ComfyUI's native DINOv2 side), centre-cropped like CLIP.
* **CLIP-T**: cosine of the CLIP image embedding of the *whole* generated image and the projected text embedding
  of its prompt (ComfyUI's CLIP text model: pooled EOS state, through ``text_projection``, which ComfyUI's
  SD1 CLIP does not apply by default). Both must be the two
  halves of the same CLIP (ViT-L/14 vision with CLIP-L text for SD1.5: both 768-d).
* **LPIPS** (lower is more similar): the perceptual distance of ``image_ops.lpips`` between the generated view
  and each reference view, both resized to ``lpips_size`` squared, averaged over the references.

Regions (which part of each image is scored): ``full`` (the whole image); ``box`` (crop to the mask's bounding
box: AnyLogo's "customized region" vs the subject); ``segment`` (pixels outside the mask become the fill colour,
then crop to the box: CustomContrast's segmented subjects, E-DI / E-CI). The generated images need a mask for
``box`` / ``segment``; the references use theirs when given and stay whole otherwise. A mask's box is where it
exceeds 0.5; an empty mask is an error. CLIP-T always sees the whole generated image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .subject_preprocess import MASK_THRESHOLD, crop_filled, fit_square
from .vision_features import CLIP, DINOV2, describe, layer_states, require_kind

METRIC_VERSION = "sc-similarity-1"
METRICS = ("clip_i", "clip_t", "dino_i", "lpips")
REGIONS = ("full", "box", "segment")
CHUNK = 8  # images per encoder pass


class SimilarityError(ValueError):
    """Inputs or models that cannot give the asked scores; the message says what to change."""


@dataclass(frozen=True)
class Settings:
    region: str = "full"
    dino_size: int = 224
    lpips_size: int = 256
    fill: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.region not in REGIONS:
            raise SimilarityError(f"region must be one of {REGIONS}, got {self.region!r}")
        if self.dino_size < 14 or self.lpips_size < 16:
            raise SimilarityError(f"dino_size must be >= 14 and lpips_size >= 16, got {self.dino_size} and "
                                  f"{self.lpips_size}")

    def describe(self) -> dict:
        return {"metric_version": METRIC_VERSION, "region": self.region, "dino_size": self.dino_size,
                "lpips_size": self.lpips_size, "fill": list(self.fill), "mask_threshold": MASK_THRESHOLD}


@dataclass
class Encoders:
    """The models a scoring call uses; a metric is computed when its models are present."""
    clip_vision: object = None   # CLIP_VISION holding CLIP ViT: CLIP-I, CLIP-T
    dinov2: object = None        # CLIP_VISION holding DINOv2: DINO-I
    clip_text: object = None     # ComfyUI CLIP (text): CLIP-T, with prompts
    lpips: object = None         # image_ops.lpips.LPIPS

    def check(self) -> None:
        if self.clip_vision is not None:
            require_kind(self.clip_vision, CLIP, "CLIP-I / CLIP-T (the clip_vision input)")
        if self.dinov2 is not None:
            require_kind(self.dinov2, DINOV2, "DINO-I (the dinov2 input)")
        if self.clip_text is not None and self.clip_vision is None:
            raise SimilarityError("CLIP-T needs the CLIP vision model too (clip_vision): the text embedding is "
                                  "compared with the CLIP image embedding")


# ---- regions ----------------------------------------------------------------------------------------------------

def mask_box(mask: torch.Tensor, what: str, index: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), bottom/right exclusive, of ``mask > 0.5``; an empty mask is an error."""
    on = mask > MASK_THRESHOLD
    rows, cols = torch.nonzero(on.any(dim=1)).flatten(), torch.nonzero(on.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise SimilarityError(f"{what} mask {index} is empty (no value above {MASK_THRESHOLD}): there is no region "
                              "to score. Check the mask (or the points that made it), or use region 'full'")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _mask_for(masks: torch.Tensor, index: int, height: int, width: int) -> torch.Tensor:
    mask = masks[index if masks.shape[0] > 1 else 0].float().clamp(0, 1)
    if mask.shape != (height, width):
        mask = F.interpolate(mask[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return mask


def region_views(images: torch.Tensor, masks: torch.Tensor | None, region: str, what: str,
                 fill=(1.0, 1.0, 1.0), required: bool = True) -> list[torch.Tensor]:
    """[N,3,H,W] (+ [N|1,H,W] masks) → the N views [3,h,w] that are scored under ``region``."""
    if region == "full" or (masks is None and not required):
        return list(images.float())
    if masks is None:
        raise SimilarityError(f"region {region!r} needs a {what} mask (where the subject is in each image); "
                              "connect one, or use region 'full'")
    views = []
    height, width = images.shape[-2:]
    for index, image in enumerate(images.float()):
        mask = _mask_for(masks, index, height, width)
        box = mask_box(mask, what, index)
        if region == "segment":
            fill_t = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
            image = image * mask[None] + fill_t * (1 - mask[None])
        views.append(crop_filled(image, box, fill))
    return views


# ---- embeddings -------------------------------------------------------------------------------------------------

def _squares(views: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.cat([fit_square(view[None], size, "center_crop") for view in views])


@torch.no_grad()
def clip_image_embeddings(clip_vision, views: list[torch.Tensor]) -> torch.Tensor:
    """[N, D] ComfyUI ``image_embeds`` of the views, each resized (shorter side) and centre-cropped."""
    info = require_kind(clip_vision, CLIP, "CLIP-I / CLIP-T")
    pixels = _squares(views, info.native_size)
    out = [clip_vision.encode_image(pixels[i:i + CHUNK].movedim(1, -1), crop=True)["image_embeds"].float()
           for i in range(0, pixels.shape[0], CHUNK)]
    return torch.cat(out).cpu()


@torch.no_grad()
def dino_class_tokens(dinov2, views: list[torch.Tensor], size: int = 224) -> torch.Tensor:
    """[N, D] DINOv2 class tokens after the final layer norm, the views centre-cropped to ``size``."""
    info = require_kind(dinov2, DINOV2, "DINO-I")
    if size % info.patch_size:
        raise SimilarityError(f"dino_size {size} is not a multiple of the DINOv2 patch ({info.patch_size}): use "
                              f"e.g. {size // info.patch_size * info.patch_size or info.patch_size}")
    pixels = _squares(views, size)
    norm = getattr(dinov2, "model", dinov2).layernorm
    out = []
    for i in range(0, pixels.shape[0], CHUNK):
        cls = layer_states(dinov2, pixels[i:i + CHUNK], [info.depth])[info.depth][:, 0]
        weight = None if norm.weight is None else norm.weight.to(cls)
        bias = None if norm.bias is None else norm.bias.to(cls)
        out.append(F.layer_norm(cls, (cls.shape[-1],), weight, bias, norm.eps))
    return torch.cat(out).cpu()


def projection_looks_loaded(weight: torch.Tensor) -> bool:
    """Whether a [D, D] projection holds trained values rather than the memory ComfyUI left it.

    ComfyUI builds its models without initialising weights (``torch.empty``) and an SD1.5 checkpoint has no
    text_projection, so the projection of a checkpoint's CLIP is whatever memory it was given: zeros for fresh
    memory, leftovers of freed tensors otherwise. Zeros, non-finite values and magnitudes no trained projection has
    are refused here; leftovers that look like weights cannot be told apart from weights, which is why the
    evaluation command checks the text encoder *file* for the key instead (train.evaluate.load_clip_text) and the
    node's tooltip asks for the stock Load CLIP with clip_l.
    """
    if weight.numel() == 0 or not bool(torch.isfinite(weight).all()):
        return False
    zeros = float((weight == 0).float().mean())
    tiny = float((weight.abs() < 1e-30).float().mean())  # denormals: the bit patterns of integers read as floats
    return zeros < 0.5 and tiny < 0.5 and float(weight.abs().max()) < 1e3


def text_projection(clip_text) -> torch.Tensor:
    """The [D, D] ``text_projection`` weight of a ComfyUI CLIP holding one text encoder (CLIP-L for SD1.5)."""
    found = [m for name, m in clip_text.cond_stage_model.named_modules() if name.endswith("text_projection")]
    if len(found) != 1:
        raise SimilarityError(f"CLIP-T needs a CLIP with one CLIP text encoder (CLIP-L for SD1.5); this CLIP has "
                              f"{len(found)} text projections")
    weight = found[0].weight.detach().float().cpu()
    if not projection_looks_loaded(weight):
        raise SimilarityError(
            "the CLIP text model's text_projection weights are missing (zero, non-finite or not a trained "
            "projection): SD1.5 checkpoints do not carry them and ComfyUI leaves the projection uninitialised. For "
            "CLIP-T load the full CLIP-L text encoder (e.g. clip_l.safetensors, which has text_projection) with the "
            "stock Load CLIP node, type stable_diffusion")
    return weight


@torch.no_grad()
def clip_text_embeddings(clip_text, prompts: list[str]) -> torch.Tensor:
    """[N, D] projected text embeddings: the pooled (EOS, final-norm) state through ``text_projection``.

    ComfyUI's SD1 CLIP hands out the *unprojected* pooled state by default (SD1.5 never uses the projection), so
    the projection is applied here, as CLIP does for its image-text similarity."""
    weight = text_projection(clip_text)
    out = []
    for prompt in prompts:
        _, pooled = clip_text.encode_from_tokens(clip_text.tokenize(prompt), return_pooled="unprojected")
        if pooled is None:
            raise SimilarityError("this CLIP model gives no pooled text embedding; CLIP-T needs CLIP-L text "
                                  "(e.g. clip_l.safetensors with Load CLIP, type stable_diffusion)")
        out.append(pooled.float().reshape(-1).cpu() @ weight.T)
    return torch.stack(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [N,D] and [M,D] → [N,M], in float64 (so scores are reproducible to the last digit)."""
    a, b = a.double(), b.double()
    return (a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ (b / b.norm(dim=-1, keepdim=True)
                                                                  .clamp_min(1e-12)).T


# ---- scoring ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def score(generated: torch.Tensor, references: torch.Tensor, encoders: Encoders, settings: Settings = Settings(),
          *, generated_masks: torch.Tensor | None = None, reference_masks: torch.Tensor | None = None,
          prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores of every generated image against all references: {metric: [B] float64} for the metrics whose models
    are present (CLIP-T only with prompts: one per generated image)."""
    encoders.check()
    if generated.ndim != 4 or references.ndim != 4 or generated.shape[1] != 3 or references.shape[1] != 3:
        raise SimilarityError(f"expected images shaped [N,3,H,W], got {tuple(generated.shape)} and "
                              f"{tuple(references.shape)}")
    if prompts is not None and len(prompts) != generated.shape[0]:
        raise SimilarityError(f"{len(prompts)} prompts for {generated.shape[0]} generated images; give one per image")
    gen = region_views(generated, generated_masks, settings.region, "generated", settings.fill)
    ref = region_views(references, reference_masks, settings.region, "reference", settings.fill, required=False)
    scores: dict[str, torch.Tensor] = {}
    if encoders.clip_vision is not None:
        g, r = clip_image_embeddings(encoders.clip_vision, gen + ref).split([len(gen), len(ref)])
        scores["clip_i"] = cosine(g, r).mean(dim=1)
        if encoders.clip_text is not None and prompts is not None:
            whole = g if settings.region == "full" else clip_image_embeddings(encoders.clip_vision,
                                                                              list(generated.float()))
            text = clip_text_embeddings(encoders.clip_text, prompts)
            if text.shape[-1] != whole.shape[-1]:
                raise SimilarityError(
                    f"the CLIP text embedding has {text.shape[-1]} values but the CLIP image embedding "
                    f"{whole.shape[-1]}: CLIP-T needs the text and vision halves of one CLIP model (CLIP ViT-L/14 "
                    "vision with the CLIP-L text encoder for SD1.5, both 768)")
            scores["clip_t"] = cosine(whole, text).diagonal()
    if encoders.dinov2 is not None:
        g, r = dino_class_tokens(encoders.dinov2, gen + ref, settings.dino_size).split([len(gen), len(ref)])
        scores["dino_i"] = cosine(g, r).mean(dim=1)
    if encoders.lpips is not None:
        size = settings.lpips_size
        squash = lambda views: torch.cat([F.interpolate(v[None], size=(size, size), mode="bicubic",  # noqa: E731
                                                        antialias=True, align_corners=False) for v in views])
        g, r = squash(gen).clamp(0, 1), squash(ref).clamp(0, 1)
        pairs = encoders.lpips.distance(g.repeat_interleave(len(ref), 0), r.repeat(len(gen), 1, 1, 1))
        scores["lpips"] = pairs.double().reshape(len(gen), len(ref)).mean(dim=1)
    return scores


def model_summary(model) -> str:
    """A short description of a vision model for reports (kind, depth, width)."""
    info = describe(model)
    return f"{info.kind} {info.depth} layers x {info.width}, patch {info.patch_size}, native {info.native_size}px"
