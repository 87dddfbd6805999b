"""CustomContrast nodes: load the trained MFI encoder, apply it to a MODEL for one subject."""
from __future__ import annotations

from ..image_ops.hierarchical_embeds import COMFY_TYPE as EMBEDS_TYPE
from ..image_ops.vision_features import CLIP
from ..model_patches import customcontrast_weights
from ..model_patches.customcontrast import ATTACHMENT, CustomContrastPatch
from ..model_patches.customcontrast_text import PlaceholderPrompt
from ..model_patches.unet_layout import require_sd15_unet
from . import validation

CATEGORY = "subject_customization/customcontrast"
WEIGHTS_TYPE = "CUSTOMCONTRAST_WEIGHTS"
LOADER = "CustomContrast Loader"
APPLY = "CustomContrast Apply"


class CustomContrastLoader:
    DESCRIPTION = ("Loads CustomContrast weights from models/customcontrast: the MFI encoder (visual and textual "
                   "Q-Formers, TV fusion) and the visual cross-attention K_v/V_v of every UNet layer. The file's "
                   "method, format version and layer layout are checked.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (WEIGHTS_TYPE,)
    RETURN_NAMES = ("customcontrast",)
    OUTPUT_TOOLTIPS = ("CustomContrast weights, for the CustomContrast Apply node.",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"weights_name": (folder_paths.get_filename_list("customcontrast"), {
            "tooltip": "A CustomContrast .safetensors file exported by `python -m train.customcontrast` "
                       "(models/customcontrast)."})}}

    def load(self, weights_name):
        import folder_paths

        path = folder_paths.get_full_path_or_raise("customcontrast", weights_name)
        return (customcontrast_weights.load_customcontrast_weights(path),)


class CustomContrastApply:
    DESCRIPTION = (
        "CustomContrast (finetune-free subject customization): the subject's multi-layer CLIP image features go "
        "through the MFI encoder every step; each UNet cross-attention layer gets the prompt encoded with its own "
        "subject token (S+) in place of the placeholder word, plus a parallel visual cross-attention on the "
        "subject's visual tokens (strength gamma). The negative prompt is left as it is. Write the prompt here; "
        "the positive CONDITIONING's text is replaced by it in cross-attention.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with CustomContrast; connect it to a KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 MODEL (the original is not changed)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: it encodes the prompt once per layer with "
                                             "that layer's subject token."}),
                "customcontrast": (WEIGHTS_TYPE, {"tooltip": "Trained weights (CustomContrast Loader)."}),
                "subject_embeds": (EMBEDS_TYPE, {"tooltip": "The subject from CLIP Hierarchical Encode (with its "
                                                            "segmentation mask), at the layers the weights were "
                                                            "trained on; the first subject of the batch is used."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of sks",
                                      "tooltip": "The positive prompt, with the placeholder word where the subject "
                                                 "goes. Weights like (word:1.2) work as in CLIP Text Encode."}),
                "placeholder": ("STRING", {"default": "sks", "tooltip": "The word of the prompt that stands for the "
                                                                        "subject (one CLIP token)."}),
                "gamma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                                    "γ of Eq. 3: weight of the visual cross-attention (1 = the paper, 0 = text "
                                    "tokens only)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "First part of the schedule where CustomContrast acts (0 = the first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Last part of the schedule where CustomContrast acts (1 = the last step)."}),
            },
            "optional": {
                "location": ("BOOLEAN", {"default": False, "tooltip":
                             "Timestep-specific subject location (paper §3.4): the subject's attention map of "
                             "each step (visual tokens + placeholder word, all layers) becomes the mask of those "
                             "attentions at the next step. The first step runs unmasked."}),
            },
        }

    def apply(self, model, clip, customcontrast, subject_embeds, prompt, placeholder, gamma, start_percent,
              end_percent, location=False):
        require_sd15_unet(model, "CustomContrast", in_channels=(4,))
        validation.float_widgets(type(self), APPLY, gamma=gamma, start_percent=start_percent,
                                 end_percent=end_percent)
        if start_percent > end_percent:
            raise validation.InputError(f"{APPLY}: start_percent ({start_percent}) must not be after end_percent "
                                        f"({end_percent})")
        if model.get_attachment(ATTACHMENT) is not None:
            raise validation.InputError(f"{APPLY}: this MODEL already has CustomContrast applied; it applies once "
                                        "per model (several subjects in one image are not supported yet). Feed it "
                                        "the MODEL from before the first CustomContrast Apply")
        slots = customcontrast_weights.check_fits_model(customcontrast, model)
        features = _features(customcontrast, subject_embeds)
        try:
            text = PlaceholderPrompt.of(clip, prompt, placeholder)
        except ValueError as e:
            raise validation.InputError(f"{APPLY}: {e}") from None
        sampling = model.get_model_object("model_sampling")
        patch = CustomContrastPatch(customcontrast.encoder, customcontrast.visual_attention, slots, text, features,
                                    gamma, float(sampling.percent_to_sigma(start_percent)),
                                    float(sampling.percent_to_sigma(end_percent)), location=bool(location))
        patched = model.clone()
        patch.install(patched)
        # the text encoder runs inside every step: ComfyUI loads it with the UNet
        patched.set_additional_models(ATTACHMENT, [clip.patcher])
        return (patched,)


def _features(weights, embeds):
    """The first subject's features [1, tokens, K*width], checked against what the encoder was trained on."""
    if not hasattr(embeds, "require"):
        raise validation.InputError(f"{APPLY}: subject_embeds must come from CLIP Hierarchical Encode, got "
                                    f"{type(embeds).__name__}")
    try:
        embeds.require(CLIP, APPLY)
    except ValueError as e:
        raise validation.InputError(str(e)) from None
    if list(embeds.layers) != [int(x) for x in weights.image_layers]:
        raise validation.InputError(
            f"{APPLY}: {weights.name} was trained on CLIP layers {list(weights.image_layers)}; the embeds have "
            f"layers {list(embeds.layers)}. Set CLIP Hierarchical Encode's layers to "
            f"'{','.join(str(x) for x in weights.image_layers)}'")
    features = embeds.concatenated()[:1]
    validation.finite_tensor(features, "subject_embeds", APPLY, "Re-encode the subject; if it persists, the CLIP "
                                                                "vision file gives non-finite outputs")
    if features.shape[-1] != weights.encoder.config.feature_dim:
        raise validation.InputError(
            f"{APPLY}: the embeds are {features.shape[-1]} wide ({len(embeds.layers)} layers x {embeds.width}); "
            f"{weights.name} takes {weights.encoder.config.feature_dim}: use the CLIP vision model it was trained "
            "with")
    return features


NODE_CLASS_MAPPINGS = {
    "SC_CustomContrastLoader": CustomContrastLoader,
    "SC_CustomContrastApply": CustomContrastApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SC_CustomContrastLoader": "CustomContrast Loader",
    "SC_CustomContrastApply": "CustomContrast Apply",
}
