"""Non-finite values (NaN, ±inf) found and described once, for nodes, mechanisms and weight loaders alike.

One NaN anywhere spreads through attention, FFTs and convolutions to whole outputs, or worse, silently changes
a decision (a NaN strength that compares false with every bound, a NaN similarity that loses Otsu's vote). So
every entry point refuses them with the count and the first position, which is what a user needs to find the
node or file that made them. The check is one ``isfinite().all()`` pass; positions are only computed on failure.
"""
from __future__ import annotations

import math

import torch


def nonfinite_summary(tensor: torch.Tensor, axes: tuple[str, ...] | None = None) -> str | None:
    """None when every value is finite; else e.g. "2 non-finite values (1 NaN, 1 inf), the first at image 0,
    y 3, x 5, channel 1" (``axes`` names the dimensions; without it the index is printed as a tuple)."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return None  # integers and booleans cannot hold NaN or inf
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    bad = ~finite
    count, nans = int(bad.sum()), int(torch.isnan(tensor).sum())
    first = [int(i) for i in torch.nonzero(bad)[0]]
    if axes is not None and len(axes) == len(first):
        where = ", ".join(f"{axis} {index}" for axis, index in zip(axes, first))
    else:
        where = f"index {tuple(first)}"
    kinds = ", ".join(part for part in (f"{nans} NaN" if nans else "", f"{count - nans} inf" if count - nans else "")
                      if part)
    noun = "value" if count == 1 else "values"
    return f"{count} non-finite {noun} ({kinds}) of {tensor.numel()}, the first at {where}"


def require_finite(tensor: torch.Tensor, what: str, *, axes: tuple[str, ...] | None = None, hint: str = "",
                   error: type[Exception] = ValueError) -> torch.Tensor:
    """``tensor`` unchanged, or ``error`` saying ``what`` holds NaN/inf, where, and (``hint``) what to do."""
    summary = nonfinite_summary(tensor, axes)
    if summary is not None:
        raise error(f"{what} holds {summary}; expected finite values{': ' + hint if hint else ''}")
    return tensor


def require_finite_number(value, what: str, *, hint: str = "", error: type[Exception] = ValueError) -> float:
    """``value`` as a float, or ``error`` when it is not a number or is NaN/±inf (which compare false with every
    bound, so range checks alone let them through)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise error(f"{what} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise error(f"{what} is {number}; expected a finite number{': ' + hint if hint else ''}")
    return number
