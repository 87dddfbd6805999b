"""CustomContrast nodes: load the trained MFI encoder, apply it to a MODEL for a subject (twice: two subjects)."""
from __future__ import annotations

from ..image_ops.hierarchical_embeds import COMFY_TYPE as EMBEDS_TYPE
from ..image_ops.vision_features import CLIP
from ..model_patches import customcontrast_weights
from ..model_patches.customcontrast import ATTACHMENT, CustomContrastPatch
from ..model_patches.customcontrast_subjects import SubjectGroup
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
        "the positive CONDITIONING's text is replaced by it in cross-attention. Apply it again to the MODEL it "
        "returns for a second subject (its own image, placeholder word, weights, gamma, location): the prompt of "
        "the last Apply is used and must contain every subject's placeholder word.")
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
                                                            "segmentation mask, which says which pixels of the "
                                                            "subject image are the subject), at the layers the "
                                                            "weights were trained on; the first subject of the "
                                                            "batch is used."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of sks",
                                      "tooltip": "The positive prompt, with the placeholder word where the subject "
                                                 "goes. Weights like (word:1.2) work as in CLIP Text Encode. For a "
                                                 "second subject (this MODEL already has CustomContrast), this "
                                                 "prompt replaces the first Apply's and must hold both words."}),
                "placeholder": ("STRING", {"default": "sks", "tooltip": "The word of the prompt that stands for the "
                                                                        "subject (one CLIP token; each subject its "
                                                                        "own word)."}),
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
                             "attentions at the next step. The first step runs unmasked, or with location_mask."}),
                "location_mask": ("MASK", {"tooltip":
                                  "Where the subject should be in the generated image, for the first step only "
                                  "(location on; later steps use the subject's own attention map). Not the subject "
                                  "image's segmentation mask (that one goes to CLIP Hierarchical Encode). One mask, "
                                  "values 0..1, resized to each layer; 0 hides the subject there."}),
            },
        }

    def apply(self, model, clip, customcontrast, subject_embeds, prompt, placeholder, gamma, start_percent,
              end_percent, location=False, location_mask=None):
        require_sd15_unet(model, "CustomContrast", in_channels=(4,))
        validation.float_widgets(type(self), APPLY, gamma=gamma, start_percent=start_percent,
                                 end_percent=end_percent)
        if start_percent > end_percent:
            raise validation.InputError(f"{APPLY}: start_percent ({start_percent}) must not be after end_percent "
                                        f"({end_percent})")
        group = model.get_attachment(ATTACHMENT)
        if group is not None and (not isinstance(group, SubjectGroup) or len(group.words) != len(group.subjects)):
            raise validation.InputError(f"{APPLY}: this MODEL carries a CustomContrast patch this node cannot add a "
                                        "subject to; feed it the MODEL from before that patch")
        slots = customcontrast_weights.check_fits_model(customcontrast, model)
        features = _features(customcontrast, subject_embeds)
        first_mask = _location_mask(location_mask, bool(location))
        words = [*(group.words if group is not None else []), placeholder]
        try:
            text = PlaceholderPrompt.of_words(clip, prompt, words)  # every subject's word, each its own
            own = PlaceholderPrompt.of(clip, prompt, placeholder) if group is not None else text
        except ValueError as e:
            second = " (this MODEL already has a subject: with several, the last Apply's prompt is used)" \
                if group is not None else ""
            raise validation.InputError(f"{APPLY}: {e}{second}") from None
        sampling = model.get_model_object("model_sampling")
        patch = CustomContrastPatch(customcontrast.encoder, customcontrast.visual_attention, slots, own, features,
                                    gamma, float(sampling.percent_to_sigma(start_percent)),
                                    float(sampling.percent_to_sigma(end_percent)), location=bool(location),
                                    location_mask=first_mask)
        patched = model.clone()
        if group is None:
            SubjectGroup([patch], text, words).install(patched)
        else:
            group.with_subject(patch, placeholder, text).install(patched)
        # the text encoder runs inside every step: ComfyUI loads it with the UNet
        patched.set_additional_models(ATTACHMENT, [clip.patcher])
        return (patched,)


def _location_mask(mask, location: bool):
    """The user's first-step location mask [1, H, W], or None."""
    if mask is None:
        return None
    mask = validation.mask(mask, "location_mask", APPLY)
    if not location:
        raise validation.InputError(f"{APPLY}: location_mask is connected but location is off; the mask is the "
                                    "first step of timestep-specific location: turn location on, or disconnect it")
    if mask.shape[0] != 1:
        raise validation.InputError(f"{APPLY}: location_mask holds {mask.shape[0]} masks; expected one (it is used "
                                    "for every image of the batch)")
    if mask.min() < 0 or mask.max() > 1:
        raise validation.InputError(f"{APPLY}: location_mask values must lie in 0..1, got "
                                    f"{float(mask.min()):.3g}..{float(mask.max()):.3g}")
    if not mask.max() > 0:
        raise validation.InputError(f"{APPLY}: location_mask is empty (all 0): it would hide the subject everywhere "
                                    "at the first step; paint where the subject goes, or disconnect it")
    return mask.float()


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
