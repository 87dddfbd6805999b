"""The checks every node of the pack runs on its inputs before any work: one place, one wording.

A node calls these on what ComfyUI hands it (IMAGE ``[B,H,W,3]`` float, MASK ``[B,H,W]`` float, LATENT dicts,
FLOAT widgets) and gets the value back ready to use, or an ``InputError`` whose message names the node and the
input, says what was expected, what came, and what to do. ComfyUI shows that message in the UI's error dialog.

Decisions that hold for every node:

* **Non-finite values** (NaN, ±inf) are refused with their count and the first position; nothing non-finite is
  computed on, because one NaN pixel poisons whole bands, masks, token sets and samples.
* **Empty batches** and images with a zero-sized side are refused (they can only come from an upstream mistake).
* **RGBA images are refused**, not silently reduced to RGB: the alpha channel says which pixels are the subject,
  and dropping it (or filtering it as a fourth colour) would quietly change what the node computes. The stock
  *Split Image with Alpha* node gives the RGB image and the alpha as a MASK, which the nodes that can use it
  take on their mask input.
* **FLOAT widgets** must be finite and inside the node's own min/max: ComfyUI's validator compares widgets
  with their bounds, and NaN compares false with every bound, so a NaN in a workflow file, or from another
  pack calling the node directly, would pass.
* **Masks pair with images** one for all, or one per image; any other count is refused with both counts.
"""
from __future__ import annotations

import functools

import torch

from ..model_patches.finite import nonfinite_summary, require_finite_number

IMAGE_AXES = ("image", "y", "x", "channel")
MASK_AXES = ("mask", "y", "x")
LATENT_AXES = ("latent", "channel", "y", "x")


class InputError(ValueError):
    """An input a node cannot use; the message says what was expected, what came and what to do."""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def _tensor(value, name: str, node: str, kind: str, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{node}: {name} must be {_article(kind)} {kind} tensor {layout}, got "
                         f"{type(value).__name__}; connect {_article(kind)} {kind} output")
    return value


def _finite(tensor: torch.Tensor, name: str, node: str, axes, what: str) -> None:
    summary = nonfinite_summary(tensor, axes)
    if summary is not None:
        raise InputError(f"{node}: {name} holds {summary}; expected finite {what}. Find the node upstream that "
                         "made them (a division by zero, an overflowing fp16 step, a broken file) and fix or "
                         "replace it")


def image(value, name: str, node: str, *, min_side: int = 1) -> torch.Tensor:
    """A usable IMAGE ``[B,H,W,3]``: float, non-empty batch, each side ≥ ``min_side``, 3 channels, finite."""
    value = _tensor(value, name, node, "IMAGE", "[batch, height, width, 3]")
    if value.ndim != 4:
        hint = (" (one image without its batch dimension: add one with unsqueeze(0))"
                if value.ndim == 3 and value.shape[-1] in (1, 3, 4) else "")
        raise InputError(f"{node}: {name} must be an IMAGE shaped [batch, height, width, 3], got shape "
                         f"{tuple(value.shape)}{hint}")
    if not value.is_floating_point():
        raise InputError(f"{node}: {name} must hold float pixels in 0..1, got dtype {value.dtype}; convert it "
                         "(e.g. divide 8-bit values by 255) or load it with a node that outputs ComfyUI IMAGEs")
    batch, height, width, channels = value.shape
    if batch == 0:
        raise InputError(f"{node}: {name} is an empty batch (shape {tuple(value.shape)}); expected at least one "
                         "image. Check the node that feeds it (an empty folder, a batch range past the end, a "
                         "filter that kept nothing)")
    if channels == 4:
        raise InputError(f"{node}: {name} has 4 channels (RGBA); expected 3 (RGB). The alpha channel would be "
                         "dropped or mixed into the result: split it off with the stock 'Split Image with Alpha' "
                         "node and connect the RGB image here (and the alpha, as a MASK, to this node's mask "
                         "input where it has one)")
    if channels != 3:
        raise InputError(f"{node}: {name} has {_plural(channels, 'channel')}; expected 3 (RGB), shape "
                         f"[batch, height, width, 3]. A MASK connected as an image? Use Convert Mask to Image")
    if height < min_side or width < min_side:
        raise InputError(f"{node}: {name} is {width}x{height} pixels (width x height); expected at least "
                         f"{min_side}x{min_side}. Check the crop or resize upstream")
    _finite(value, name, node, IMAGE_AXES, "pixel values (0..1)")
    return value


def mask(value, name: str, node: str, *, images: int | None = None, of: str = "image") -> torch.Tensor:
    """A usable MASK ``[B,H,W]`` (a single ``[H,W]`` gets a batch dimension): float, non-empty, finite, and
    with ``images`` given, one mask for all of them or one per image (``of`` names the images)."""
    value = _tensor(value, name, node, "MASK", "[batch, height, width]")
    if value.ndim == 2:
        value = value[None]
    if value.ndim != 3:
        hint = (" (an IMAGE connected as a mask? Use Convert Image to Mask)"
                if value.ndim == 4 and value.shape[-1] in (1, 3, 4) else "")
        raise InputError(f"{node}: {name} must be a MASK shaped [batch, height, width], got shape "
                         f"{tuple(value.shape)}{hint}")
    if not value.is_floating_point():
        raise InputError(f"{node}: {name} must hold float values in 0..1, got dtype {value.dtype}")
    if value.shape[0] == 0:
        raise InputError(f"{node}: {name} is an empty batch (shape {tuple(value.shape)}); expected at least one "
                         "mask, or leave the input unconnected")
    if value.shape[1] == 0 or value.shape[2] == 0:
        raise InputError(f"{node}: {name} is {value.shape[2]}x{value.shape[1]} pixels (width x height); expected "
                         "a mask with pixels")
    if images is not None:
        batch_pairing(value.shape[0], images, name, node, item="mask", of=of)
    _finite(value, name, node, MASK_AXES, "mask values (0..1)")
    return value


def batch_pairing(count: int, batch: int, name: str, node: str, *, item: str, of: str) -> None:
    """``count`` items (masks, backgrounds) serve ``batch`` images: one for all, or one per image."""
    if count not in (1, batch):
        raise InputError(f"{node}: {_plural(count, item)} in {name} for {_plural(batch, of)}; expected one {item} "
                         f"for all, or one per {of}")


def latent(value, name: str, node: str) -> torch.Tensor:
    """The ``samples`` tensor of a LATENT dict: present, non-empty, finite."""
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        raise InputError(f"{node}: {name} must be a LATENT (a dict holding 'samples'), got {type(value).__name__}; "
                         "connect a sampler's LATENT output")
    samples = value["samples"]
    if samples.numel() == 0:
        raise InputError(f"{node}: {name} holds an empty latent batch (shape {tuple(samples.shape)})")
    summary = nonfinite_summary(samples, LATENT_AXES if samples.ndim == 4 else None)
    if summary is not None:
        raise InputError(f"{node}: {name} holds {summary}; the sampling went wrong (check its model, "
                         "conditioning and the AnyLogo inputs) and there is nothing meaningful to report")
    return samples


@functools.lru_cache(maxsize=None)
def _float_widgets(node_class) -> dict[str, dict]:
    spec = node_class.INPUT_TYPES()
    return {name: (entry[1] if len(entry) > 1 else {}) for section in ("required", "optional")
            for name, entry in spec.get(section, {}).items() if entry[0] == "FLOAT"}


def float_widgets(node_class, node: str, **values) -> None:
    """Each FLOAT widget given is a finite number inside the min/max the node declares for it."""
    declared = _float_widgets(node_class)
    for name, value in values.items():
        options = declared[name]
        low, high = options.get("min"), options.get("max")
        bounds = f"{low:g}..{high:g}" if low is not None and high is not None else "a finite number"
        number = require_finite_number(value, f"{node}: {name}", hint=f"{node} takes {bounds} (default "
                                       f"{options.get('default')}); set the widget to a number", error=InputError)
        if (low is not None and number < low) or (high is not None and number > high):
            raise InputError(f"{node}: {name} is {number:g}; expected {bounds} (default {options.get('default')})")


def finite_tensor(value: torch.Tensor, name: str, node: str, hint: str) -> torch.Tensor:
    """Any other tensor input (embeds, tokens): finite, or a message naming it and what to do."""
    summary = nonfinite_summary(value)
    if summary is not None:
        raise InputError(f"{node}: {name} holds {summary}; expected finite values. {hint}")
    return value
