"""Point → mask (P3S RNGR, Eq. 1/2): select one subject of a photo by clicking it, from CLIP patch similarity."""
from __future__ import annotations

import torch

from ..image_ops.point_mask import select_subject
from ..image_ops.point_parsing import FRACTIONS, PIXELS, batch_points
from ..image_ops.point_preview import draw_preview
from . import validation

CATEGORY = "subject_customization/image"
NODE = "Points to Mask"
_UNITS = {"pixels": PIXELS, "fractions (0..1)": FRACTIONS}
_POINT_FORMATS = ('JSON from a points editor ([{"x": 120, "y": 80}, ...]) or plain "x,y" pairs separated '
                  'by ";" or new lines. Per image of a batch: a JSON list of lists, or plain lists separated by "|".')


class SC_PointsToMask:
    DESCRIPTION = (
        "P3S point selection: click the subject (positive points) and, optionally, a look-alike to exclude "
        "(negative points). Every CLIP patch is compared with the clicked patches (cosine similarity), "
        "M_P·(1−M_N) is blurred and thresholded with Otsu, and only the regions connected to a positive point "
        "are kept. The mask is rough (patch-sized steps), as the paper intends: it selects, it does not "
        "segment. Needs a CLIP ViT vision model (e.g. CLIP ViT-L/14 from Load CLIP Vision).")
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "preview")
    OUTPUT_TOOLTIPS = ("The selected subject, 1 inside, at the image's size.",
                       "The image dimmed outside the mask and tinted inside, positive points green, negative red.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo holding the subject; points are in its pixels."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "A CLIP ViT vision model (P3S uses CLIP ViT-L/14), "
                                                           "from the stock Load CLIP Vision node."}),
                "positive_points": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Points on the subject to keep. " + _POINT_FORMATS}),
                "layer": ("INT", {"default": -1, "min": -64, "max": 64,
                                  "tooltip": "CLIP layer whose patch tokens are compared: -1 = last hidden "
                                             "state (the paper's), -2 = penultimate, or 1..N from the input."}),
                "encoder_size": ("INT", {"default": 224, "min": 14, "max": 1344, "step": 14,
                                         "tooltip": "Side the image is squashed to for CLIP (a multiple of its "
                                                    "patch): 224 gives a 16x16 grid with ViT-L/14, 336 gives "
                                                    "24x24 (finer mask, position embeddings interpolated)."}),
                "blur_sigma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 8.0, "step": 0.1,
                                         "tooltip": "Gaussian smoothing of the similarity map before Otsu, in "
                                                    "patches (0 = none)."}),
                "dilation_px": ("INT", {"default": 0, "min": 0, "max": 512,
                                        "tooltip": "Grow the mask by this many pixels (a disc), e.g. to leave a "
                                                   "margin around the subject before inpainting the rest."}),
                "coordinates": (list(_UNITS), {"default": "pixels",
                                               "tooltip": "Whether point coordinates are pixels of the image or "
                                                          "fractions of its width and height (a points editor "
                                                          "with normalize on)."}),
            },
            "optional": {
                "negative_points": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Points on look-alikes to exclude (may be empty). "
                                                          + _POINT_FORMATS}),
            },
        }

    def select(self, image, clip_vision, positive_points, layer, encoder_size, blur_sigma, dilation_px,
               coordinates, negative_points=""):
        import comfy.utils

        image = validation.image(image, "image", NODE)
        validation.float_widgets(type(self), NODE, blur_sigma=blur_sigma)
        if coordinates not in _UNITS:
            raise ValueError(f"coordinates must be one of {list(_UNITS)}, got {coordinates!r}")
        batch, height, width = image.shape[:3]
        # parse and check every point before the encoder runs, so mistakes surface at once
        points = batch_points(positive_points, negative_points, batch, width, height, _UNITS[coordinates])
        pixels = image.movedim(-1, 1).float()
        masks, previews = [], []
        progress = comfy.utils.ProgressBar(batch)
        for index in range(batch):
            positives, negatives = points[index]
            mask = select_subject(clip_vision, pixels[index], positives, negatives, layer=layer,
                                  encoder_size=encoder_size, blur_sigma=blur_sigma, dilation_px=dilation_px)
            masks.append(mask)
            previews.append(draw_preview(pixels[index], mask, positives, negatives))
            progress.update(1)
        return torch.stack(masks), torch.stack(previews).movedim(1, -1)


NODE_CLASS_MAPPINGS = {"SC_PointsToMask": SC_PointsToMask}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_PointsToMask": "Points to Mask (P3S)"}
