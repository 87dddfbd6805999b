"""AnyLogo nodes: load the trained weights, apply model recycling to a MODEL, show where the model looked."""
from __future__ import annotations


from ..image_ops.hierarchical_embeds import HierarchicalEmbeds
from ..image_ops.subject_preprocess import prepare_subject
from ..image_ops.vision_features import DINOV2
from ..model_patches import anylogo_weights
from ..model_patches.anylogo import ATTACHMENT, POSITIONS, SUBJECT_CONCAT, RecyclingSettings, build_patch
from ..model_patches.diagnostics import attention_report, attention_heatmap
from ..model_patches.image_context import ImageContextPatch, group_of_slots, group_tokens
from ..model_patches.unet_layout import require_sd15_unet, transformer_slots
from . import validation

CATEGORY = "subject_customization/anylogo"
WEIGHTS_TYPE = "ANYLOGO_WEIGHTS"
APPLY = "AnyLogo Apply"
REPORT = "AnyLogo Attention Report"


class AnyLogoLoader:
    DESCRIPTION = ("Loads AnyLogo weights from models/anylogo: the fine-tuned UNet (applied as model patches) and "
                   "the DINOv2 projection. The file's architecture and format version are checked.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (WEIGHTS_TYPE,)
    RETURN_NAMES = ("anylogo",)
    OUTPUT_TOOLTIPS = ("AnyLogo weights, for the AnyLogo Apply node.",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"weights_name": (folder_paths.get_filename_list("anylogo"), {
            "tooltip": "An AnyLogo .safetensors file exported by `python -m train.anylogo` (models/anylogo)."})}}

    def load(self, weights_name):
        import folder_paths

        return (anylogo_weights.load_anylogo_weights(folder_paths.get_full_path_or_raise("anylogo", weights_name)),)


class AnyLogoApply:
    DESCRIPTION = (
        "Model recycling (AnyLogo): every sampling step the same UNet first runs on the subject latent, noised to "
        "the current step, and banks its self-attention keys/values; then the prompt's rows attend over "
        "[content ; subject] in the chosen layers. The negative prompt never sees the subject. Without AnyLogo "
        "weights this works training-free on any SD1.5 or SD1.5-inpainting checkpoint with your text prompt; with "
        "weights the text is replaced by the subject's DINOv2 tokens in every cross-attention layer. For region "
        "insertion use an inpainting checkpoint with InpaintModelConditioning (the scene outside the mask is kept).")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with AnyLogo recycling; connect it to a KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 or SD1.5-inpainting MODEL (the original is not changed)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the subject image."}),
                "subject": ("IMAGE", {"tooltip": "The logo/print/glyph/object to insert; first image of the batch "
                                                 "is used. Any size: it is padded to a square with white and "
                                                 "resized to subject_size."}),
                "positions": (list(POSITIONS), {"default": "decoder", "tooltip":
                              "Self-attention layers that recycle the subject: decoder (paper default, best in its "
                              "Table 4), encoder, or both."}),
                "threshold": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                              "Λ of sparse recycling: 1 transmits every layer's signature, 0 blocks the flow "
                              "(plain generation); in between each layer is kept with this probability per "
                              "step (seeded), for 'continuous signature decoration'."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                             "Multiplies the attention the content gives to subject tokens (1 = the paper's "
                             "Eq. 4, 0 = off, >1 = stronger copy)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "First part of the schedule where recycling is active (0 = the first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Last part of the schedule where recycling is active (1 = the last step)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "Seed of the subject's per-step noise and of the sparse-recycling draws."}),
                "subject_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip":
                                 "Side in pixels the subject is encoded at (a multiple of 64)."}),
            },
            "optional": {
                "subject_mask": ("MASK", {"tooltip": "Optional subject mask: pixels outside become white and the "
                                                     "subject is cropped to the mask's box before squaring."}),
                "anylogo": (WEIGHTS_TYPE, {"tooltip": "Trained AnyLogo weights (AnyLogo Loader). Leave empty for "
                                                      "the training-free mode."}),
                "subject_embeds": ("SUBJECT_EMBEDS", {"tooltip": "DINOv2 hierarchical embeds of the subject with "
                                                                 "the scene as background (needed with weights)."}),
                "include_middle": ("BOOLEAN", {"default": False, "tooltip":
                                   "Also recycle in the middle block's self-attention."}),
                "subject_concat": (list(SUBJECT_CONCAT), {"default": "known", "tooltip":
                                   "Inpainting checkpoints only: what the subject pass gets in the mask and "
                                   "masked-image channels. known = mask 0 and the clean subject (the subject is "
                                   "fully visible, as the scene outside its region), unknown = mask 1 and a grey "
                                   "image's latent (ComfyUI's blank)."}),
                "record_attention": ("BOOLEAN", {"default": False, "tooltip":
                                     "Record the share of attention on subject tokens per layer, for the AnyLogo "
                                     "Attention Report node (costs extra time)."}),
            },
        }

    def apply(self, model, vae, subject, positions, threshold, strength, start_percent, end_percent, seed,
              subject_size, subject_mask=None, anylogo=None, subject_embeds=None, include_middle=False,
              subject_concat="known", record_attention=False):
        require_sd15_unet(model, "AnyLogo")
        subject = validation.image(subject, "subject", APPLY)
        if subject_mask is not None:
            # the node encodes the first subject of the batch, so it takes the mask that goes with it
            subject_mask = validation.mask(subject_mask, "subject_mask", APPLY, images=subject.shape[0],
                                           of="subject image")[:1]
        validation.float_widgets(type(self), APPLY, threshold=threshold, strength=strength,
                                 start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not be after end_percent ({end_percent})")
        sampling = model.get_model_object("model_sampling")
        settings = RecyclingSettings(
            positions=positions, include_middle=include_middle, threshold=threshold, strength=strength,
            sigma_start=float(sampling.percent_to_sigma(start_percent)),
            sigma_end=float(sampling.percent_to_sigma(end_percent)), seed=seed, subject_concat=subject_concat,
            record_attention=record_attention)

        pixels, _ = prepare_subject(subject[:1].movedim(-1, 1), subject_mask, size=subject_size, fit="pad")
        latent = model.model.process_latent_in(vae.encode(pixels.movedim(1, -1)).float())

        patched = model.clone()
        image_context = None
        if anylogo is not None:
            image_context = self._image_context(patched, anylogo, subject_embeds)
            patched.add_patches(anylogo.model_patches(), 1.0)
        elif subject_embeds is not None:
            raise ValueError("subject_embeds are used with AnyLogo weights only: connect an AnyLogo Loader too, or "
                             "remove the embeds for the training-free mode")
        build_patch(patched, latent, settings, image_context).install(patched)
        return (patched,)

    @staticmethod
    def _image_context(model, weights, embeds: HierarchicalEmbeds | None) -> ImageContextPatch:
        anylogo_weights.check_fits_model(weights, model)
        if embeds is None:
            raise ValueError("AnyLogo weights condition on the subject's DINOv2 embeds instead of text: connect a "
                             "DINOv2 Hierarchical Encode node (subject + scene as background) to subject_embeds")
        embeds.require(DINOV2, "AnyLogo")
        for layer, group in zip(embeds.layers, embeds.groups):
            validation.finite_tensor(group, f"subject_embeds (layer {layer})", APPLY, _EMBEDS_HINT)
        if embeds.background is not None:
            validation.finite_tensor(embeds.background, "subject_embeds (background tokens)", APPLY, _EMBEDS_HINT)
        if embeds.width != weights.projection.proj.in_features:
            raise ValueError(f"the embeds are {embeds.width}-wide but {weights.name} projects "
                             f"{weights.projection.proj.in_features}-wide DINOv2 features")
        if weights.image_layers and len(weights.image_layers) != len(embeds.layers):
            raise ValueError(f"{weights.name} was trained on {len(weights.image_layers)} DINOv2 layer groups "
                             f"{weights.image_layers}; the embeds have layers {list(embeds.layers)}")
        if embeds.background is None:
            raise ValueError("AnyLogo weights expect the scene's global token: give the encode node the scene as "
                             "background image")
        tokens = group_tokens(embeds.groups, embeds.background)
        return ImageContextPatch(weights.projection, tokens, group_of_slots(transformer_slots(model),
                                                                            len(tokens)))


_EMBEDS_HINT = ("Re-encode the subject with DINOv2 Hierarchical Encode; if it persists, the DINOv2 file gives "
                "non-finite outputs")


class AnyLogoAttentionReport:
    DESCRIPTION = ("Accumulated subject attention (ASA, AnyLogo Fig. 1 / App. E) of the last sampling with an "
                   "AnyLogo MODEL that had record_attention on: the share of self-attention mass the content gave "
                   "to subject tokens, per layer, as text and as a heatmap over the image; and the statistic latent "
                   "difference (SLD), the L1 gap between the token means of the delivered subject values and the "
                   "layer's own values (small = statistically coherent transmission).")
    CATEGORY = CATEGORY
    FUNCTION = "report"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "heatmap")
    OUTPUT_TOOLTIPS = ("Mean subject-attention share (first/last step) and mean SLD per recycled layer.",
                       "Where the content looked at the subject (bright = more), averaged over layers and steps.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL from AnyLogo Apply with record_attention on."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output: connects this report after the sampling it "
                                              "describes."}),
            "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Heatmap width."}),
            "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Heatmap height."}),
        }}

    def report(self, model, samples, width, height):
        validation.latent(samples, "samples", REPORT)
        patch = model.get_attachment(ATTACHMENT)
        if patch is None or patch.recorder is None:
            raise ValueError("this MODEL has no AnyLogo attention recording: turn record_attention on in AnyLogo "
                             "Apply and connect its MODEL here")
        return attention_report(patch.recorder), attention_heatmap(patch.recorder, height, width)


NODE_CLASS_MAPPINGS = {
    "SC_AnyLogoLoader": AnyLogoLoader,
    "SC_AnyLogoApply": AnyLogoApply,
    "SC_AnyLogoAttentionReport": AnyLogoAttentionReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SC_AnyLogoLoader": "AnyLogo Loader",
    "SC_AnyLogoApply": "AnyLogo Apply (model recycling)",
    "SC_AnyLogoAttentionReport": "AnyLogo Attention Report",
}
