"""Hidden states of several layers of a CLIP-vision or DINOv2 model, from one forward pass.

Works on ComfyUI's own CLIP_VISION object (``comfy.clip_vision.ClipVisionModel``), whatever its size, so users
load the encoders with the stock *Load CLIP Vision* node. ComfyUI's ``encode_image`` returns one intermediate
layer per call and runs DINOv2 only at 518 px (its position embeddings are not interpolated); here the
embedding step is done with position embeddings resized to the input grid, as the reference DINOv2 does, and the
encoder layers run once, stopping after the deepest layer asked for.

Layer ids are 1-based block outputs: layer ``i`` is the hidden state after the ``i``-th transformer block,
before the model's final layer norm (the same tensor as ComfyUI's ``intermediate_output=i-1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DINOV2 = "dinov2"
CLIP = "clip_vision"
# DINOv2 interpolates position embeddings with this offset on the grid size: the convention of the DINOv2 code
# base that AnyDoor vendors (hubconf.dinov2_vitg14, the encoder of AnyLogo's pipeline): bicubic, scale_factor
# (grid + 0.1) / 37, no antialias. transformers' Dinov2 now resizes to the exact size, which differs (by up to
# ~1.3 on unit-variance embeddings); tests/test_vision_features.py checks ours against a numpy reference.
POS_INTERPOLATE_OFFSET = 0.1


class VisionModelError(ValueError):
    """The vision model is not of the kind a node needs, or the request does not fit it."""


@dataclass(frozen=True)
class VisionModelInfo:
    kind: str            # DINOV2 or CLIP
    depth: int           # number of transformer blocks
    width: int           # hidden size
    patch_size: int
    native_size: int     # the input side its position embeddings were trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _inner(clip_vision):
    return getattr(clip_vision, "model", clip_vision)


def describe(clip_vision) -> VisionModelInfo:
    """Kind and geometry of a CLIP_VISION model; a clear error for anything else (e.g. SigLIP)."""
    import comfy.clip_model
    import comfy.image_encoders.dino2

    model = _inner(clip_vision)
    mean = tuple(getattr(clip_vision, "image_mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(getattr(clip_vision, "image_std", (0.26862954, 0.26130258, 0.27577711)))
    if isinstance(model, comfy.image_encoders.dino2.Dinov2Model):
        pos = model.embeddings.position_embeddings
        conv = model.embeddings.patch_embeddings.projection
        grid = math.isqrt(pos.shape[1] - 1)
        return VisionModelInfo(DINOV2, len(model.encoder.layer), pos.shape[-1], conv.kernel_size[0],
                               grid * conv.kernel_size[0], mean, std)
    if isinstance(model, comfy.clip_model.CLIPVisionModelProjection):
        vision = model.vision_model
        if vision.embeddings.class_embedding is None:
            raise VisionModelError("this CLIP_VISION model is a SigLIP encoder (no class token); "
                                   "a CLIP ViT (e.g. CLIP ViT-L/14) or DINOv2 model is expected")
        conv = vision.embeddings.patch_embedding
        grid = math.isqrt(vision.embeddings.position_embedding.weight.shape[0] - 1)
        return VisionModelInfo(CLIP, len(vision.encoder.layers), conv.out_channels, conv.kernel_size[0],
                               grid * conv.kernel_size[0], mean, std)
    raise VisionModelError(f"expected a CLIP_VISION model holding CLIP ViT or DINOv2, got {type(model).__name__}")


def require_kind(clip_vision, kind: str, purpose: str) -> VisionModelInfo:
    info = describe(clip_vision)
    if info.kind != kind:
        names = {DINOV2: "DINOv2 (e.g. dinov2-large, loaded with Load CLIP Vision)",
                 CLIP: "CLIP ViT vision (e.g. CLIP ViT-L/14, loaded with Load CLIP Vision)"}
        raise VisionModelError(f"{purpose} needs {names[kind]}, but the CLIP_VISION input is {names[info.kind]}")
    return info


def quarter_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """Layers at the depth fractions 1/count … count/count: (6, 12, 18, 24) for a 24-block model."""
    if count < 1 or count > depth:
        raise VisionModelError(f"cannot pick {count} evenly spaced layers from a {depth}-layer model")
    return tuple((depth * (k + 1) + count // 2) // count for k in range(count))  # halves round up


def check_layers(layers, depth: int) -> tuple[int, ...]:
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise VisionModelError("no layer was chosen")
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise VisionModelError(f"layers {bad} do not exist: this model has layers 1..{depth}")
    return layers


def _resized_positions(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1+N, D] class+patch position embeddings → [1+gh*gw, D], bicubic on the patch grid (DINOv2's rule)."""
    n = pos.shape[0] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise VisionModelError(f"position embeddings of {n} patches do not form a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos
    patch = pos[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, mode="bicubic", align_corners=False,
                          scale_factor=((grid_h + POS_INTERPOLATE_OFFSET) / side,
                                        (grid_w + POS_INTERPOLATE_OFFSET) / side))
    if patch.shape[-2:] != (grid_h, grid_w):
        raise VisionModelError(f"position embedding interpolation gave {tuple(patch.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pos.dtype)
    return torch.cat([pos[:1], patch], dim=0)


def _embed(model, info: VisionModelInfo, pixels: torch.Tensor) -> torch.Tensor:
    import comfy.model_management as mm

    grid_h, grid_w = pixels.shape[-2] // info.patch_size, pixels.shape[-1] // info.patch_size
    if info.kind == DINOV2:
        emb = model.embeddings
        x = emb.patch_embeddings(pixels)
        cls = mm.cast_to_device(emb.cls_token, x.device, x.dtype).expand(x.shape[0], -1, -1)
        pos = mm.cast_to_device(emb.position_embeddings[0], x.device, x.dtype)
    else:
        emb = model.vision_model.embeddings
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = mm.cast_to_device(emb.class_embedding, x.device, x.dtype).expand(x.shape[0], 1, -1)
        pos = mm.cast_to_device(emb.position_embedding.weight, x.device, x.dtype)
    x = torch.cat([cls, x], dim=1) + _resized_positions(pos, grid_h, grid_w)
    if info.kind == CLIP:
        x = model.vision_model.pre_layrnorm(x)
    return x


def final_norm(clip_vision, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own final layer norm (DINOv2 ``layernorm``, CLIP ``post_layernorm``) applied to a state."""
    model = _inner(clip_vision)
    norm = model.layernorm if describe(clip_vision).kind == DINOV2 else model.vision_model.post_layernorm
    return norm(hidden)


def normalize_pixels(pixels: torch.Tensor, info: VisionModelInfo) -> torch.Tensor:
    """[B,3,H,W] in 0..1 → the model's input normalisation, quantised to 8 bits like ComfyUI's preprocessing."""
    mean = torch.tensor(info.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    pixels = torch.clamp(pixels * 255.0, 0, 255).round() / 255.0
    return (pixels - mean) / std


@torch.no_grad()
def layer_states(clip_vision, pixels: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """Hidden states {layer: [B, 1+gh*gw, D]} of ``layers`` for ``pixels`` ([B,3,H,W], 0..1, any side that is a
    multiple of the patch size), from a single pass that stops after the deepest requested layer.

    Token 0 is the class token; the rest are patches in row-major order. Returned on ComfyUI's intermediate
    device in float32.
    """
    import comfy.model_management as mm
    from comfy.ldm.modules.attention import optimized_attention_for_device

    info = describe(clip_vision)
    layers = check_layers(layers, info.depth)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise VisionModelError(f"expected pixels shaped [B,3,H,W], got {tuple(pixels.shape)}")
    h, w = pixels.shape[-2:]
    if h % info.patch_size or w % info.patch_size or h < info.patch_size or w < info.patch_size:
        raise VisionModelError(f"the encoder input {h}x{w} must be a positive multiple of the patch size "
                               f"{info.patch_size}")
    patcher = getattr(clip_vision, "patcher", None)
    if patcher is not None:
        mm.load_model_gpu(patcher)
    device = getattr(clip_vision, "load_device", pixels.device)
    model = _inner(clip_vision)
    x = _embed(model, info, normalize_pixels(pixels.to(device).float(), info))
    attention = optimized_attention_for_device(x.device, False, small_input=True)
    blocks = model.encoder.layer if info.kind == DINOV2 else model.vision_model.encoder.layers
    wanted, out = set(layers), {}
    for index, block in enumerate(blocks[:max(layers)], start=1):
        # CLIP blocks add in place: keep a copy of every state handed out
        x = block(x, attention) if info.kind == DINOV2 else block(x, None, attention)
        if index in wanted:
            out[index] = x.clone()
    target = mm.intermediate_device()
    return {layer: out[layer].to(target, torch.float32) for layer in layers}
