"""Hierarchical DINOv2 / CLIP encode nodes: a subject image → SUBJECT_EMBEDS (several layers from one pass)."""
from __future__ import annotations

import comfy.utils

from ..image_ops import vision_features as vf
from ..image_ops.hierarchical_embeds import COMFY_TYPE
from ..image_ops.hierarchical_encode import encode_clip_hierarchical, encode_dinov2_hierarchical
from ..image_ops.subject_preprocess import FITS, prepare_subject
from . import validation

CATEGORY = "subject_customization/image"
CHUNK = 4  # images per forward pass: small enough that the progress bar moves

_FIT_TOOLTIP = ("How the subject region becomes a square: 'pad' centres it on the fill colour (AnyDoor/AnyLogo, "
                "nothing is cut), 'center_crop' scales the short side and cuts the centre (ComfyUI's CLIP "
                "preprocessing), 'squash' resizes ignoring the aspect ratio.")
_PREP_INPUTS = {
    "margin": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 4.0, "step": 0.01,
                         "tooltip": "Space around the subject's mask box, as a fraction of the box height (top "
                                    "and bottom) and width (left and right); 0.1 is AnyDoor's 1.2x canvas."}),
    "fill_color": ("INT", {"default": 0xFFFFFF, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color",
                           "tooltip": "Colour outside the subject mask and of the square padding (white as in "
                                      "AnyDoor/AnyLogo)."}),
    "use_mask": ("BOOLEAN", {"default": True,
                             "tooltip": "Use the subject mask when one is connected: subject on the fill colour, "
                                        "cropped to the mask's box. Off: the whole image."}),
    "final_norm": ("BOOLEAN", {"default": False,
                               "tooltip": "Apply the model's final layer norm to every layer's tokens. Off: raw "
                                          "block outputs (the same tensors as ComfyUI's intermediate outputs)."}),
}


def _rgb(color: int) -> tuple[float, float, float]:
    return ((color >> 16) & 255) / 255.0, ((color >> 8) & 255) / 255.0, (color & 255) / 255.0


def _prepare(node: str, node_class, image, image_name, mask, mask_name, of, size, fit, margin, fill_color,
             use_mask):
    """Validate the subject inputs and widgets, then prepare the squares the encoder sees."""
    image = validation.image(image, image_name, node)
    if mask is not None:
        mask = validation.mask(mask, mask_name, node, images=image.shape[0], of=of)
    validation.float_widgets(node_class, node, margin=margin)
    return prepare_subject(image.movedim(-1, 1), mask, size=size, fit=fit, use_mask=use_mask,
                           fill=_rgb(fill_color), margin=margin)


def _progress(batch: int):
    bar = comfy.utils.ProgressBar(batch)
    return lambda done, total: bar.update_absolute(done, total)


class SC_DINOv2HierarchicalEncode:
    DESCRIPTION = ("AnyLogo's subject conditioning: DINOv2 hidden states of several layers (default the quarter "
                   "layers 6, 12, 18, 24 of ViT-L) from one forward pass, the subject prepared as in AnyDoor "
                   "(masked on white, cropped to its box, padded square). A background image adds its global "
                   "(class) token at each layer. Load DINOv2 with the stock Load CLIP Vision node.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (COMFY_TYPE, "IMAGE")
    RETURN_NAMES = ("subject_embeds", "preprocessed_subject")
    OUTPUT_TOOLTIPS = ("Token groups of the chosen layers (+ background tokens), for AnyLogo-style conditioning.",
                       "The subject exactly as the encoder saw it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "A DINOv2 model (e.g. dinov2-large) loaded with Load "
                                                           "CLIP Vision."}),
                "subject": ("IMAGE", {"tooltip": "The subject image(s); any size or aspect ratio."}),
                "resolution": (["224", "518"], {"default": "224",
                                                "tooltip": "Encoder input side: 224 as in AnyLogo (257 tokens, "
                                                           "position embeddings resized bicubically as the "
                                                           "original DINOv2 code does) or 518, DINOv2's "
                                                           "native side in ComfyUI (1370 tokens)."}),
                "layers": ("STRING", {"default": "quarters",
                                      "tooltip": "'quarters' (6,12,18,24 for a 24-layer model) or a comma list "
                                                 "of 1-based layers, e.g. '6,12,18,24'; -1 is the last layer."}),
                "fit": (list(FITS), {"default": "pad", "tooltip": _FIT_TOOLTIP}),
                **_PREP_INPUTS,
            },
            "optional": {
                "subject_mask": ("MASK", {"tooltip": "Where the subject is (one mask for all images or one per "
                                                     "image); an empty mask is an error."}),
                "background": ("IMAGE", {"tooltip": "Scene image(s): one for all subjects or one per subject. "
                                                    "Its class token at each layer is appended as a global "
                                                    "token (AnyLogo App. A)."}),
            },
        }

    def encode(self, clip_vision, subject, resolution, layers, fit, margin, fill_color, use_mask, final_norm,
               subject_mask=None, background=None):
        node = "DINOv2 Hierarchical Encode"
        vf.require_kind(clip_vision, vf.DINOV2, node)
        size = int(resolution)
        pixels, info = _prepare(node, type(self), subject, "subject", subject_mask, "subject_mask",
                                "subject image", size, fit, margin, fill_color, use_mask)
        scene = None
        if background is not None:
            scene = validation.image(background, "background", node)
            validation.batch_pairing(scene.shape[0], pixels.shape[0], "background", node, item="background image",
                                     of="subject image")
            scene = scene.movedim(-1, 1)
        embeds = encode_dinov2_hierarchical(clip_vision, pixels, layers=layers, size=size, background_pixels=scene,
                                            final_norm=final_norm, preprocessing=info, chunk_size=CHUNK,
                                            progress=_progress(pixels.shape[0]))
        return embeds, pixels.movedim(1, -1).cpu()


class SC_CLIPHierarchicalEncode:
    DESCRIPTION = ("CustomContrast's multi-layer image features: CLIP vision hidden states of several layers, "
                   "coarse to fine, from one forward pass (default: three quarter-depth layers plus the "
                   "penultimate and last, 6, 12, 18, 23, 24 for ViT-L/14). Load CLIP vision with the stock Load "
                   "CLIP Vision node.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (COMFY_TYPE, "IMAGE")
    RETURN_NAMES = ("subject_embeds", "preprocessed_image")
    OUTPUT_TOOLTIPS = ("Token groups of the chosen layers (concatenated along channels by the consumer).",
                       "The image exactly as the encoder saw it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "A CLIP ViT vision model (e.g. CLIP ViT-L/14) loaded "
                                                           "with Load CLIP Vision."}),
                "image": ("IMAGE", {"tooltip": "The subject image(s); any size or aspect ratio."}),
                "layers": ("STRING", {"default": "default",
                                      "tooltip": "'default' (6,12,18,23,24 for a 24-layer model), 'quarters', or "
                                                 "a comma list of 1-based layers; -1 is the last layer."}),
                "fit": (list(FITS), {"default": "center_crop", "tooltip": _FIT_TOOLTIP}),
                **_PREP_INPUTS,
                "margin": ("FLOAT", {**_PREP_INPUTS["margin"][1], "default": 0.0}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Segmented subject (one mask for all images or one per image): the "
                                             "subject is put on the fill colour and cropped to its box."}),
            },
        }

    def encode(self, clip_vision, image, layers, fit, margin, fill_color, use_mask, final_norm, mask=None):
        node = "CLIP Hierarchical Encode"
        info = vf.require_kind(clip_vision, vf.CLIP, node)
        pixels, prep = _prepare(node, type(self), image, "image", mask, "mask", "image", info.native_size, fit,
                                margin, fill_color, use_mask)
        embeds = encode_clip_hierarchical(clip_vision, pixels, layers=layers, size=info.native_size,
                                          final_norm=final_norm, preprocessing=prep, chunk_size=CHUNK,
                                          progress=_progress(pixels.shape[0]))
        return embeds, pixels.movedim(1, -1).cpu()


NODE_CLASS_MAPPINGS = {
    "SC_DINOv2HierarchicalEncode": SC_DINOv2HierarchicalEncode,
    "SC_CLIPHierarchicalEncode": SC_CLIPHierarchicalEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SC_DINOv2HierarchicalEncode": "DINOv2 Hierarchical Encode (AnyLogo)",
    "SC_CLIPHierarchicalEncode": "CLIP Hierarchical Encode (CustomContrast)",
}
