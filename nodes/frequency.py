"""Frequency split node: an IMAGE into its low- and high-frequency bands (EqDiff's FDTE inputs)."""
import comfy.utils
import torch

from ..image_ops import frequency
from . import validation

PAPER = "paper (EqDiff official)"
SIGNED = "signed"
MAGNITUDE = "magnitude"
MODES = (PAPER, SIGNED, MAGNITUDE)
CHANNELS = ("grayscale", "colour")

_IGNORED_IN_PAPER = " Ignored by the paper mode."
NODE = "Frequency Split"


class FrequencySplit:
    CATEGORY = "subject_customization/image"
    FUNCTION = "split"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("low", "high", "high_preview")
    OUTPUT_TOOLTIPS = (
        "Low-frequency band (shapes, colour layout). Signed mode: exact values, may overshoot 0..1 slightly.",
        "High-frequency band (edges, texture). Signed mode: exact values centred on 0, so low + high = input; "
        "magnitude modes: abs values, about 0.5..1.",
        "The high band made viewable in 0..1: signed mode adds 0.5 (0 becomes mid grey) and clamps; the "
        "magnitude modes only clamp. For looking at, not for further math.",
    )
    DESCRIPTION = (
        "Splits images into low- and high-frequency bands with an ideal filter on the centred Fourier spectrum "
        "(EqDiff Eq. 3/4). 'paper (EqDiff official)' reproduces the images EqDiff's official trainer used: "
        "grayscale, square windows of half-width 50 (low-pass) and 5 (high-pass) bins at 512 px (scaled with "
        "the shorter side elsewhere), abs(ifft) on -1..1 pixels. 'signed' is the exact split: "
        "low + high == input. 'magnitude' is the paper recipe with your own window, cutoffs and channels."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Images to split; any size and batch."}),
            "mode": (list(MODES), {"default": PAPER, "tooltip":
                     "paper (EqDiff official): fixed recipe of the official EqDiff code, all other widgets are "
                     "ignored. signed: low = filtered image, high = input - low (exact, keeps signs). "
                     "magnitude: abs(ifft) of each band on -1..1 pixels like the paper, with the widgets below."}),
            "window": (list(frequency.WINDOWS), {"default": "circle", "tooltip":
                       "Shape of the low-pass window around the spectrum centre: circle keeps bins with "
                       "sqrt(dy^2+dx^2) <= cutoff, square keeps max(|dy|,|dx|) <= cutoff." + _IGNORED_IN_PAPER}),
            "cutoff_unit": (list(frequency.CUTOFF_UNITS), {"default": "fraction", "tooltip":
                            "pixels: the cutoff is a radius in frequency bins (cycles across the image). "
                            "fraction: a fraction of half the shorter image side, so 1.0 = the spectrum's edge "
                            "and 0.195 ~ the paper's 50 of 256 at 512 px." + _IGNORED_IN_PAPER}),
            "low_cutoff": ("FLOAT", {"default": 0.2, "min": 0.001, "max": 8192.0, "step": 0.001, "tooltip":
                           "Low-pass cutoff: bins at or within this distance from the centre form the low band "
                           "(a cosine with exactly this many cycles is kept). In signed mode the high band is "
                           "everything else." + _IGNORED_IN_PAPER}),
            "high_cutoff": ("FLOAT", {"default": 0.02, "min": 0.001, "max": 8192.0, "step": 0.001, "tooltip":
                            "Magnitude mode only: the high band removes the window of this cutoff (the paper "
                            "uses a much smaller one than for the low band, 5 vs 50 bins at 512 px). Ignored in "
                            "signed mode, where high = input - low." + _IGNORED_IN_PAPER}),
            "channels": (list(CHANNELS), {"default": "colour", "tooltip":
                         "grayscale: filter the channel mean and repeat it over RGB (the paper's choice; then "
                         "signed low + high equals that gray copy). colour: filter each channel."
                         + _IGNORED_IN_PAPER}),
        }}

    def split(self, images, mode, window, cutoff_unit, low_cutoff, high_cutoff, channels):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        images = validation.image(images, "images", NODE)
        validation.float_widgets(type(self), NODE, low_cutoff=low_cutoff, high_cutoff=high_cutoff)
        pixels = images.movedim(-1, 1)  # IMAGE is [B, H, W, C]
        gray = channels == "grayscale"
        if mode == PAPER:
            band = frequency.paper_split
        elif mode == SIGNED:
            def band(one):
                return frequency.signed_split(one, low_cutoff, window=window, unit=cutoff_unit, grayscale=gray)
        else:
            def band(one):
                return frequency.magnitude_split(one, low_cutoff, high_cutoff, window=window, unit=cutoff_unit,
                                                 grayscale=gray)
        # One image at a time: a batch of large spectra in complex64 would hold several GB at once.
        progress = comfy.utils.ProgressBar(pixels.shape[0])
        lows, highs = [], []
        for one in pixels.split(1):
            low, high = band(one)
            lows.append(low)
            highs.append(high)
            progress.update(1)
        low, high = torch.cat(lows).movedim(1, -1), torch.cat(highs).movedim(1, -1)
        return low, high, frequency.displayable_high_band(high, signed=mode == SIGNED)


NODE_CLASS_MAPPINGS = {"SC_FrequencySplit": FrequencySplit}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_FrequencySplit": "Frequency Split (low / high bands)"}
