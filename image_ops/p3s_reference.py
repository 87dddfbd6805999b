"""The P3S reference as the copy reads it: ``I'`` (negatives removed, square) encoded to a latent, and ``c_s``.

One function for the trainer and P3S Apply, so both turn the same photo into the same tensors:

1. negatives removal on the full photo (Eq. 3): a user's inpainted image, or OpenCV inpainting of the negatives
   mask (image_ops.negatives_removal), or nothing when no look-alike was marked;
2. centre crop to a square and resize to ``resolution`` (antialiased bicubic), the training image size;
3. ``I'`` latent = ``process_latent_in(vae.encode(·))``; ``c_s`` = the CLIP image encoder's last hidden state
   (all tokens, before the final layer norm) of the same square, squashed to the encoder's ``clip_size``.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .negatives_removal import remove_negatives


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] in 0..1 → centre square crop resized to [3, size, size]."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side == size:
        return square.clone()
    return F.interpolate(square[None].float(), size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


def removed_negatives(image: torch.Tensor, negatives_mask: torch.Tensor | None = None,
                      inpainted: torch.Tensor | None = None) -> torch.Tensor:
    """``I'`` in pixels [3, H, W]: ``inpainted`` when given, else ``image`` with ``negatives_mask`` filled."""
    if inpainted is not None:
        if tuple(inpainted.shape) != tuple(image.shape):
            raise ValueError(f"the inpainted reference is {inpainted.shape[-1]}x{inpainted.shape[-2]} pixels but the "
                             f"reference is {image.shape[-1]}x{image.shape[-2]}: give the inpainting of this photo")
        return inpainted
    if negatives_mask is None:
        return image
    return remove_negatives(image, negatives_mask)


def mask_sha256(mask: torch.Tensor | None) -> str:
    """Digest of a binary mask (>0.5) with its size: what the export's metadata records."""
    if mask is None:
        return ""
    binary = (mask.detach().float().cpu() > 0.5).to(torch.uint8).contiguous()
    digest = hashlib.sha256(repr(tuple(binary.shape)).encode())
    digest.update(binary.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_reference(pixels: torch.Tensor, vae, model, clip_vision, clip_size: int = 224):
    """(``I'`` latent [1, 4, s/8, s/8] in model space, ``c_s`` [1, tokens, width]) of a square ``pixels``
    [3, s, s] in 0..1."""
    from .point_features import squash_to_square
    from .vision_features import CLIP, layer_states, require_kind

    info = require_kind(clip_vision, CLIP, "P3S (the RNGR encoder's c_s)")
    latent = model.process_latent_in(vae.encode(pixels.movedim(0, -1)[None].float().cpu())).float()
    states = layer_states(clip_vision, squash_to_square(pixels[None].float(), clip_size), [info.depth])[info.depth]
    return latent.cpu(), states.float().cpu()
