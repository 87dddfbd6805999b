"""Split images into low- and high-frequency bands with an ideal filter on the centred spectrum (EqDiff Eq. 3/4).

All functions take channel-first float tensors ``[B, C, H, W]`` of any size (odd, non-square) and work on the
tensor's device. The spectrum is ``fftshift(fft2(image))``, so the zero frequency sits at row ``H // 2``,
column ``W // 2``, and a bin's *offset* is its (row, column) distance from there in frequency bins
(cycles per image height / width).

Cutoffs
    ``unit="pixels"``: the window's radius (circle) or half-width (square) in bins, as in Eq. 4's ``f_c``.
    ``unit="fraction"``: a fraction of half the shorter side, so 1.0 reaches the spectrum's edge (Nyquist)
    along the shorter axis and 0.5 keeps half of that band. A bin is *inside* the window when
    ``sqrt(dy² + dx²) <= radius`` (circle) or ``max(|dy|, |dx|) <= half-width`` (square): a cosine with exactly
    ``cutoff`` cycles across the image is kept by the low-pass.

Outputs
    *signed* (``signed_split``): ``low = real(ifft(spectrum · window))`` and ``high = source − low``, so
    ``low + high`` is the source exactly up to float error (the source is the input, or its grayscale copy).
    Values keep their sign: ``high`` is centred on 0 and ``low`` can overshoot 0..1 slightly (ringing of the
    ideal filter). Nothing is clamped; ``displayable_high_band`` gives a viewing copy.
    *magnitude* (``magnitude_split``, ``paper_split``): what EqDiff's official trainer feeds its VAE. It works
    on pixels normalised to −1..1 (its data pipeline's range), returns ``abs(ifft(...))`` for each band with
    its own cutoff (the sign is lost: dark regions come back bright), and maps the result back to the input's
    range, so in 0..1 terms both bands lie in about 0.5..1.
"""
from __future__ import annotations

import math

import torch

WINDOWS = ("circle", "square")
CUTOFF_UNITS = ("pixels", "fraction")

# EqDiff's official training: square windows of half-width 50 (low-pass) and 5 (high-pass) on 512 px images.
PAPER_SPECTRUM_SIDE = 512
PAPER_LOW_CUTOFF = 50
PAPER_HIGH_CUTOFF = 5


class FrequencySplitError(ValueError):
    """The image or the cutoff does not describe a usable frequency split."""


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FrequencySplitError(f"expected images as a [B, C, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise FrequencySplitError(f"expected floating-point images, got dtype {images.dtype}")
    if images.numel() == 0:
        raise FrequencySplitError(f"expected a non-empty image batch, got shape {tuple(images.shape)}")


def cutoff_in_pixels(cutoff: float, unit: str, height: int, width: int) -> float:
    """The window radius in frequency bins for a cutoff given in ``unit`` (see the module docstring)."""
    if unit not in CUTOFF_UNITS:
        raise FrequencySplitError(f"cutoff unit must be one of {CUTOFF_UNITS}, got {unit!r}")
    if not cutoff > 0:
        raise FrequencySplitError(f"the cutoff must be greater than 0, got {cutoff} {unit}")
    if unit == "fraction":
        if cutoff > 1:
            raise FrequencySplitError(f"a cutoff fraction must be at most 1 (the spectrum's edge along the "
                                      f"shorter side), got {cutoff}")
        return cutoff * min(height, width) / 2
    limit = max(height, width) / 2
    if cutoff > limit:
        raise FrequencySplitError(f"cutoff {cutoff} px is larger than the spectrum of a {height}x{width} image "
                                  f"(at most {limit:g} px from its centre)")
    return float(cutoff)


def pass_window(height: int, width: int, radius: float, window: str, *, half_open: bool = False,
                device=None) -> torch.Tensor:
    """Boolean ``[H, W]`` mask of the bins a low-pass with this radius keeps, in ``torch.fft.fft2``'s layout.

    Offsets are measured from the fftshift centre (row ``H // 2``, column ``W // 2`` of the shifted spectrum);
    the mask is built directly in the unshifted layout, so ``fftshift(mask)`` is the centred window and
    filtering needs no shift of the spectra. ``half_open`` selects the official EqDiff square, offsets
    ``-radius <= d < radius`` on both axes (its slice ``[centre - r : centre + r]`` of the shifted spectrum),
    which keeps one bin more below the centre than above it.
    """
    if window not in WINDOWS:
        raise FrequencySplitError(f"window must be one of {WINDOWS}, got {window!r}")
    if half_open and window != "square":
        raise FrequencySplitError("the half-open (official EqDiff) window is a square")
    dy = _offsets_from_centre(height, device).view(-1, 1)
    dx = _offsets_from_centre(width, device).view(1, -1)
    if half_open:
        return (dy >= -radius) & (dy < radius) & (dx >= -radius) & (dx < radius)
    if window == "circle":
        return dy * dy + dx * dx <= radius * radius
    return (dy.abs() <= radius) & (dx.abs() <= radius)


def _offsets_from_centre(n: int, device) -> torch.Tensor:
    # fftshift moves bin i to (i + n // 2) % n, whose distance from the centre n // 2 is this.
    return (torch.arange(n, device=device) + n // 2) % n - n // 2


def _source(images: torch.Tensor, grayscale: bool) -> torch.Tensor:
    """What gets filtered: the images, or their one-channel mean (filtered once, repeated afterwards)."""
    source = images.mean(dim=1, keepdim=True) if grayscale else images
    # torch.fft has no half-precision path for arbitrary sizes; compute in at least float32.
    return source.to(torch.promote_types(images.dtype, torch.float32))


def _like(band: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return band.expand_as(images).to(images.dtype).contiguous()


def _filtered(spectrum: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(spectrum * keep.to(spectrum.real.dtype))


def signed_split(images: torch.Tensor, cutoff: float, *, window: str = "circle", unit: str = "pixels",
                 grayscale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact band split: ``low = real(ifft(spectrum · window))``, ``high = source − low``.

    With ``grayscale`` the source is the channel-mean copy (repeated over C), so ``low + high`` equals that
    copy rather than the colour input.
    """
    check_images(images)
    height, width = images.shape[-2:]
    radius = cutoff_in_pixels(cutoff, unit, height, width)
    keep = pass_window(height, width, radius, window, device=images.device)
    source = _source(images, grayscale)
    # The window is point-symmetric, so the filtered spectrum stays Hermitian and the half spectrum of rfft2
    # gives real(ifft2(...)) at half the cost.
    half = keep[:, : width // 2 + 1].to(source.dtype)
    low = torch.fft.irfft2(torch.fft.rfft2(source) * half, s=(height, width))
    return _like(low, images), _like(source - low, images)


def magnitude_split(images: torch.Tensor, low_cutoff: float, high_cutoff: float, *, window: str = "square",
                    unit: str = "pixels", grayscale: bool = True, value_range: tuple[float, float] = (0.0, 1.0),
                    half_open: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """EqDiff-style bands: ``abs(ifft)`` of the low-passed and of the high-passed spectrum, each its own cutoff.

    The images are first mapped from ``value_range`` to −1..1 (where the official trainer filters), and both
    bands are mapped back afterwards. The high band removes the window of ``high_cutoff``.
    """
    check_images(images)
    lo, hi = value_range
    if not hi > lo:
        raise FrequencySplitError(f"value_range must be (low, high) with high > low, got {value_range}")
    height, width = images.shape[-2:]
    low_radius = cutoff_in_pixels(low_cutoff, unit, height, width)
    high_radius = cutoff_in_pixels(high_cutoff, unit, height, width)
    source = _source(images, grayscale)
    spectrum = torch.fft.fft2((source - lo) * (2 / (hi - lo)) - 1)
    keep_low = pass_window(height, width, low_radius, window, half_open=half_open, device=images.device)
    keep_high = ~pass_window(height, width, high_radius, window, half_open=half_open, device=images.device)
    bands = [(_filtered(spectrum, keep).abs() + 1) * ((hi - lo) / 2) + lo for keep in (keep_low, keep_high)]
    return _like(bands[0], images), _like(bands[1], images)


def paper_cutoffs(height: int, width: int) -> tuple[int, int]:
    """Official half-widths (50 low-pass, 5 high-pass at 512 px) scaled to the shorter side, in whole bins.

    Scaling keeps the same fraction of the spectrum at every size; each is at least 1 bin so the split always
    separates the mean (zero frequency) from the rest.
    """
    scale = min(height, width) / PAPER_SPECTRUM_SIDE
    return (max(1, math.floor(PAPER_LOW_CUTOFF * scale + 0.5)),
            max(1, math.floor(PAPER_HIGH_CUTOFF * scale + 0.5)))


def paper_split(images: torch.Tensor, *, value_range: tuple[float, float] = (0.0, 1.0)
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bands EqDiff's official code trained on: grayscale, half-open square windows, ``abs(ifft)``.

    At 512x512 this is the official computation exactly (half-widths 50 and 5); other sizes use
    ``paper_cutoffs``. Trainers holding −1..1 pixels pass ``value_range=(-1, 1)``.
    """
    check_images(images)
    low_cutoff, high_cutoff = paper_cutoffs(*images.shape[-2:])
    return magnitude_split(images, low_cutoff, high_cutoff, window="square", unit="pixels", grayscale=True,
                           value_range=value_range, half_open=True)


def displayable_high_band(high: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """A viewing copy of a high band in 0..1: signed bands are offset by 0.5 (0 → mid grey), then clamped."""
    return (high + 0.5 if signed else high).clamp(0.0, 1.0)
