"""Subject images prepared for a vision encoder: the masked subject on a plain colour, cropped to its box, squared.

AnyLogo conditions on DINOv2 features of the subject alone, prepared the way AnyDoor prepares its reference:
pixels outside the subject mask become white, the image is cropped to the mask's bounding box (plus a margin),
padded to a square with the same colour, and resized to the encoder's input side. Any subject size or aspect
ratio works; nothing of the subject is cut off in the "pad" fit.

Fits (how the region becomes an ``size`` x ``size`` square):

* ``"pad"``: centre the region in a square of its longer side, filled with ``fill`` (AnyDoor), then resize.
* ``"center_crop"``: scale the shorter side to ``size`` and cut the centre (ComfyUI's CLIP preprocessing).
* ``"squash"``: resize to ``size`` x ``size`` ignoring the aspect ratio (ComfyUI's ``crop=False``).

Masks are alpha: ``image * m + fill * (1 - m)``, so anti-aliased edges stay smooth; the crop box is where the
mask exceeds ``MASK_THRESHOLD``. ``margin`` grows the box by that fraction of its height (top and bottom) and
width (left and right); AnyDoor's 1.2x canvas is ``margin=0.1``. Where the grown box or the square leaves the
image, the fill colour is used. Resizing is bicubic with antialiasing (as ComfyUI's CLIP preprocessing), clamped
to 0..1.

``prepare_subject`` returns the squares and a dict describing what was done (stored with the embeds):
``fit``, ``size``, ``masked`` (a mask was applied), ``mask_threshold`` (when masked), ``fill`` (RGB 0..1),
``margin``, ``source_size`` ([H, W]), ``boxes`` (per image, the subject box [top, left, bottom, right] in source
pixels, bottom/right exclusive; the whole image when unmasked) and ``crops`` (per image, the box actually taken,
which may extend past the image where it was filled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FITS = ("pad", "center_crop", "squash")
MASK_THRESHOLD = 0.5


class SubjectPreprocessError(ValueError):
    """The subject image or mask cannot be prepared as asked."""


def _check_fill(fill) -> tuple[float, float, float]:
    fill = tuple(float(c) for c in fill)
    if len(fill) != 3 or not all(0.0 <= c <= 1.0 for c in fill):
        raise SubjectPreprocessError(f"fill must be three RGB values in 0..1, got {fill}")
    return fill


def _match_masks(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """[B|1, h, w] or [h, w] → [B, H, W] in 0..1 (a single mask serves every image; other sizes are resized)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise SubjectPreprocessError(f"expected a mask shaped [B,H,W], got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise SubjectPreprocessError(f"{mask.shape[0]} masks for {batch} subject images: give one mask, or one "
                                     "per image")
    mask = mask.float().clamp(0, 1)
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask.expand(batch, -1, -1)


def mask_box(mask: torch.Tensor, index: int = 0) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right; bottom/right exclusive) of ``mask > MASK_THRESHOLD``."""
    rows = torch.nonzero((mask > MASK_THRESHOLD).any(dim=1)).flatten()
    cols = torch.nonzero((mask > MASK_THRESHOLD).any(dim=0)).flatten()
    if rows.numel() == 0:
        raise SubjectPreprocessError(f"subject mask {index} is empty (no value above {MASK_THRESHOLD}): draw the "
                                     "subject's mask, or turn use_mask off to encode the whole image")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def crop_filled(image: torch.Tensor, box, fill) -> torch.Tensor:
    """[3,H,W] → the box (top, left, bottom, right), which may extend past the image: the outside is ``fill``."""
    top, left, bottom, right = box
    _, height, width = image.shape
    out = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, bottom - top,
                                                                                         right - left)
    src_t, src_l, src_b, src_r = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
    if src_b > src_t and src_r > src_l:
        out[:, src_t - top:src_b - top, src_l - left:src_r - left] = image[:, src_t:src_b, src_l:src_r]
    return out


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N,3,h,w] → [N,3,height,width], bicubic with antialiasing, kept in 0..1; unchanged when already that size."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0).to(image.dtype)


def fit_square(image: torch.Tensor, size: int, fit: str, fill=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """[N,3,h,w] → [N,3,size,size] by one of FITS (see the module text)."""
    if fit not in FITS:
        raise SubjectPreprocessError(f"fit must be one of {FITS}, got {fit!r}")
    height, width = image.shape[-2:]
    if fit == "squash":
        return resize(image, size, size)
    if fit == "center_crop":
        scale = size / min(height, width)
        image = resize(image, max(size, round(height * scale)), max(size, round(width * scale)))
        top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
        return image[..., top:top + size, left:left + size]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = torch.stack([crop_filled(x, (-top, -left, side - top, side - left), fill) for x in image])
    return resize(square, size, size)


def prepare_subject(images: torch.Tensor, mask: torch.Tensor | None = None, *, size: int, fit: str = "pad",
                    use_mask: bool = True, fill=(1.0, 1.0, 1.0), margin: float = 0.0):
    """[B,3,H,W] images in 0..1 (+ optional [B|1,H,W] mask) → ([B,3,size,size], description dict)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise SubjectPreprocessError(f"expected subject images shaped [B,3,H,W], got {tuple(images.shape)}")
    if size < 1:
        raise SubjectPreprocessError(f"the output side must be positive, got {size}")
    if not 0.0 <= margin <= 4.0:
        raise SubjectPreprocessError(f"margin is a fraction of the subject box per side, 0..4; got {margin}")
    fill = _check_fill(fill)
    batch, _, height, width = images.shape
    masks = _match_masks(mask.to(images.device), batch, height, width) if mask is not None and use_mask else None

    squares, boxes, crops = [], [], []
    for index in range(batch):
        image = images[index].float()
        if masks is None:
            box = (0, 0, height, width)
        else:
            box = mask_box(masks[index], index)
            alpha = masks[index][None]
            image = image * alpha + torch.tensor(fill, device=image.device).view(3, 1, 1) * (1 - alpha)
        top, left, bottom, right = box
        grow_h, grow_w = round((bottom - top) * margin), round((right - left) * margin)
        crop = (top - grow_h, left - grow_w, bottom + grow_h, right + grow_w)
        region = crop_filled(image, crop, fill)[None]
        squares.append(fit_square(region, size, fit, fill)[0])
        boxes.append(list(box))
        crops.append(list(crop))

    info = {"fit": fit, "size": size, "masked": masks is not None, "fill": list(fill), "margin": margin,
            "source_size": [height, width], "boxes": boxes, "crops": crops}
    if masks is not None:
        info["mask_threshold"] = MASK_THRESHOLD
    return torch.stack(squares).to(images.dtype), info
