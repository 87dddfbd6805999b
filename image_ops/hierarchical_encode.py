"""Hierarchical subject embeddings: hidden states of several encoder layers, all from one forward pass.

* AnyLogo (App. A): DINOv2 ViT-L/14 at 224 px (257 tokens of 1024), four groups from layers 6, 12, 18, 24 for
  the four UNet scales, each extended by one global token of the scene (background) image taken at the same
  layer. ``encode_dinov2_hierarchical`` gives the groups and, with a background image, that token per layer.
* CustomContrast (§3.2): CLIP image features of several layers concatenated coarse to fine
  (``HierarchicalEmbeds.concatenated()``). ``encode_clip_hierarchical`` gives the groups.

Layers are 1-based block outputs before the final norm (ComfyUI's ``intermediate_output=i-1``), unless
``final_norm`` applies the model's own last layer norm to every group. Images are encoded in chunks of
``chunk_size``: each chunk is one forward pass that yields every requested layer; a background rides in the same
pass as its subjects. ``progress(done, total)`` is called after each chunk.
"""
from __future__ import annotations

import torch

from . import vision_features as vf
from .hierarchical_embeds import HierarchicalEmbeds
from .subject_preprocess import fit_square

DEFAULT_CHUNK = 4


def clip_default_layers(depth: int) -> tuple[int, ...]:
    """Three layers spread coarse to fine (the first three quarter points), then the penultimate and the last.

    24 blocks (ViT-L/14) → (6, 12, 18, 23, 24); 32 (ViT-H) → (8, 16, 24, 31, 32); 12 (ViT-B) → (3, 6, 9, 11,
    12). A model of fewer than four blocks gives all of its layers.
    """
    if depth < 4:
        return tuple(range(1, depth + 1))
    return tuple(sorted(set(vf.quarter_layers(depth)[:3]) | {depth - 1, depth}))


def resolve_layers(layers, depth: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """Layers as given (ints; negative counts from the end, -1 = last), as a comma list in a string, or a preset
    name ("default", "quarters", ""). Returned sorted shallow to deep; repeated layers are an error."""
    if layers is None:
        return default
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text in ("", "default"):
            return default
        if text == "quarters":
            return vf.quarter_layers(depth)
        try:
            layers = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise vf.VisionModelError(f"layers must be 'quarters', 'default' or a comma list of layer numbers "
                                      f"such as '6,12,18,24', got {text!r}") from None
    layers = [layer + depth + 1 if layer < 0 else layer for layer in layers]
    layers = vf.check_layers(layers, depth)
    if len(set(layers)) != len(layers):
        raise vf.VisionModelError(f"layers {list(layers)} name a layer more than once")
    return tuple(sorted(layers))


def _at_size(pixels: torch.Tensor, size: int, what: str):
    """Images at size x size as they are; others resized whole (squash). Returns (pixels, original [H, W] | None)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise vf.VisionModelError(f"expected {what} pixels shaped [B,3,H,W], got {tuple(pixels.shape)}")
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels, None
    return fit_square(pixels, size, "squash"), list(pixels.shape[-2:])


@torch.no_grad()
def _encode(clip_vision, subject, layers, background, final_norm, chunk_size, progress):
    """The subjects' groups (one [B,T,D] per layer) and, with a background, its class tokens [B, L, D]."""
    batch = subject.shape[0]
    paired = background is not None and background.shape[0] == batch and batch > 1
    if background is not None and background.shape[0] not in (1, batch):
        raise vf.VisionModelError(f"{background.shape[0]} background images for {batch} subjects: give one "
                                  "background for all, or one per subject")
    if chunk_size < 1:
        raise vf.VisionModelError(f"chunk_size must be at least 1, got {chunk_size}")
    groups = {layer: [] for layer in layers}
    tokens = []
    for start in range(0, batch, chunk_size):
        chunk = subject[start:start + chunk_size]
        extra = None
        if background is not None and (paired or start == 0):
            extra = background[start:start + chunk.shape[0]] if paired else background
            chunk = torch.cat([chunk, extra.to(chunk.device, chunk.dtype)])
        states = vf.layer_states(clip_vision, chunk, layers)
        if final_norm:
            states = {layer: vf.final_norm(clip_vision, state) for layer, state in states.items()}
        split = chunk.shape[0] - (0 if extra is None else extra.shape[0])
        for layer in layers:
            groups[layer].append(states[layer][:split])
        if extra is not None:
            tokens.append(torch.stack([states[layer][split:, 0] for layer in layers], dim=1))
        if progress is not None:
            progress(min(start + chunk_size, batch), batch)
    background_tokens = None
    if tokens:
        background_tokens = torch.cat(tokens).expand(batch, -1, -1).contiguous()
    return tuple(torch.cat(groups[layer]) for layer in layers), background_tokens


def encode_dinov2_hierarchical(clip_vision, subject_pixels: torch.Tensor, *, layers=None, size: int = 224,
                               background_pixels: torch.Tensor | None = None, final_norm: bool = False,
                               preprocessing: dict | None = None, chunk_size: int = DEFAULT_CHUNK,
                               progress=None) -> HierarchicalEmbeds:
    """AnyLogo's conditioning: DINOv2 states of ``layers`` (default: quarter layers, 6/12/18/24 for ViT-L) for
    ``subject_pixels`` [B,3,H,W] 0..1 at ``size`` (224 as in the paper, 257 tokens, position embeddings
    interpolated; 518 is ComfyUI's native input, 1370 tokens). Subjects should come from ``prepare_subject`` at
    ``size``; other sizes are resized whole. ``background_pixels`` [1|B,3,h,w]: one scene for every subject or one
    per subject; its class token at each layer becomes ``background`` [B, len(layers), D].
    ``preprocessing`` (how the subject was prepared) is stored with the embeds, with what happened here added.
    """
    info = vf.require_kind(clip_vision, vf.DINOV2, "hierarchical DINOv2 encoding")
    layers = resolve_layers(layers, info.depth, vf.quarter_layers(info.depth))
    subject, subject_resized = _at_size(subject_pixels, size, "subject")
    background, background_resized = (None, None)
    if background_pixels is not None:
        background, background_resized = _at_size(background_pixels, size, "background")
    groups, tokens = _encode(clip_vision, subject, layers, background, final_norm, chunk_size, progress)
    record = {**(preprocessing or {}), "final_norm": final_norm, "subject_resized_from": subject_resized,
              "background": None}
    if background is not None:
        record["background"] = {"images": background.shape[0], "resized_from": background_resized,
                                "pairing": "broadcast" if background.shape[0] == 1 else "one per subject"}
    return HierarchicalEmbeds(vf.DINOV2, layers, groups, (size, size), record, tokens)


def encode_clip_hierarchical(clip_vision, pixels: torch.Tensor, *, layers=None, size: int | None = None,
                             final_norm: bool = False, preprocessing: dict | None = None,
                             chunk_size: int = DEFAULT_CHUNK, progress=None) -> HierarchicalEmbeds:
    """CustomContrast's image features: CLIP vision states of ``layers`` (default ``clip_default_layers``) for
    ``pixels`` [B,3,H,W] 0..1 at ``size`` (default: the model's own input side, 224 for ViT-L/14)."""
    info = vf.require_kind(clip_vision, vf.CLIP, "hierarchical CLIP encoding")
    layers = resolve_layers(layers, info.depth, clip_default_layers(info.depth))
    size = size or info.native_size
    images, resized = _at_size(pixels, size, "image")
    groups, _ = _encode(clip_vision, images, layers, None, final_norm, chunk_size, progress)
    record = {**(preprocessing or {}), "final_norm": final_norm, "subject_resized_from": resized}
    return HierarchicalEmbeds(vf.CLIP, layers, groups, (size, size), record)
