"""P3S nodes: load a trained subject (injection copy + RNGR encoder), apply it to a MODEL."""
from __future__ import annotations

from ..image_ops.p3s_reference import encode_reference, removed_negatives, square_resize
from ..model_patches import p3s_weights
from ..model_patches.p3s import CURVES, P3SSettings, build_patch
from ..model_patches.unet_layout import require_sd15_unet
from ..model_patches.weight_files import metadata_json
from . import validation

CATEGORY = "subject_customization/p3s"
WEIGHTS_TYPE = "P3S_WEIGHTS"
APPLY = "P3S Apply"


class P3SLoader:
    DESCRIPTION = ("Loads a P3S subject from models/p3s: the trained injection copy, its RNGR encoder and the "
                   "training reference (negatives removed). The file's method, format version and architecture "
                   "are checked; P3S Apply checks that the copy fits the MODEL.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (WEIGHTS_TYPE, "STRING")
    RETURN_NAMES = ("p3s", "prompt")
    OUTPUT_TOOLTIPS = ("The P3S subject, for P3S Apply.",
                       "The training prompt with the subject's identifier (e.g. 'a photo of sks dog'): build "
                       "your prompts around its identifier and class word.")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"weights_name": (folder_paths.get_filename_list("p3s"), {
            "tooltip": "A P3S .safetensors file from `python -m train.p3s` or P3S Train Subject (models/p3s)."})}}

    def load(self, weights_name):
        import folder_paths

        weights = p3s_weights.load_p3s_weights(folder_paths.get_full_path_or_raise("p3s", weights_name))
        return weights, weights.metadata.get("prompt", "")


class P3SApply:
    DESCRIPTION = (
        "P3S multi-layer condition injection: every UNet call, the trained copy runs on the noisy latent plus the "
        "subject's RNGR latent, and its self-attention features f enter each self-attention layer of the MODEL "
        "as K = W_K[z; f], V = W_V[z + 0.2 f; f] (the layer's own projections), weighted per step by the curve "
        "ε_t (paper: 1 − α(t/T)^k + β, weak at the start of sampling, strong at the end). Without a reference "
        "image the file's own training reference is used; with one, its look-alikes are removed first (a mask "
        "to inpaint away, or your own inpainted image). Prompt with the file's identifier and class word.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the P3S subject injected; connect it to a KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5 MODEL the subject was trained on (the original is not "
                                               "changed)."}),
                "p3s": (WEIGHTS_TYPE, {"tooltip": "The trained subject, from P3S Loader."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                             "Overall multiplier of the injected features (1 = the paper; 0 = off, exactly the "
                             "plain MODEL)."}),
                "weight_curve": (list(CURVES), {"default": "paper", "tooltip":
                                 "ε_t per step: paper = 1 − α(t/T)^k + β (Eq. 10); fixed = 1; increasing = "
                                 "(1 − t/T)^k, weak early, strong late; decreasing = (t/T)^k (Table III). α, β "
                                 "apply to 'paper' only, k to all but 'fixed'."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip":
                          "α of Eq. 10: how much weaker the injection is at the first step (paper 0.5)."}),
                "beta": ("FLOAT", {"default": 0.2, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip":
                         "β of Eq. 10: added to the weight at every step (paper 0.2)."}),
                "k": ("FLOAT", {"default": 2.0, "min": 0.1, "max": 8.0, "step": 0.1, "tooltip":
                      "Exponent of the curve (paper 2: quadratic)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "First part of the schedule where the injection is active (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Last part of the schedule where the injection is active (1 = last step)."}),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "Optional: another photo of the subject as the RNGR reference "
                                                   "(first image used). Leave empty to use the training reference "
                                                   "stored in the file."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode a wired reference."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP ViT vision model the subject was trained with "
                                                           "(CLIP ViT-L/14), for a wired reference."}),
                "negatives_mask": ("MASK", {"tooltip": "Look-alikes to remove from the reference (Points to Mask "
                                                       "with the look-alike clicked); filled by OpenCV inpainting."}),
                "inpainted_reference": ("IMAGE", {"tooltip": "Your own inpainting of the reference with the "
                                                             "look-alikes removed (any inpainting graph); used "
                                                             "instead of negatives_mask."}),
                "cross_attention": ("BOOLEAN", {"default": True, "tooltip": "Also add the copy's cross-attention "
                                                "inputs to the MODEL's (Fig. 3's cross-attention enhancement)."}),
            },
        }

    def apply(self, model, p3s, strength, weight_curve, alpha, beta, k, start_percent, end_percent,
              reference=None, vae=None, clip_vision=None, negatives_mask=None, inpainted_reference=None,
              cross_attention=True):
        require_sd15_unet(model, "P3S")
        validation.float_widgets(type(self), APPLY, strength=strength, alpha=alpha, beta=beta, k=k,
                                 start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise validation.InputError(f"{APPLY}: start_percent ({start_percent}) must not be after end_percent "
                                        f"({end_percent})")
        if weight_curve not in CURVES:
            raise validation.InputError(f"{APPLY}: weight_curve must be one of {list(CURVES)}, got {weight_curve!r}")
        latent, states = self._reference(model, p3s, reference, vae, clip_vision, negatives_mask,
                                         inpainted_reference)
        sampling = model.get_model_object("model_sampling")
        settings = P3SSettings(strength=strength, curve=weight_curve, alpha=alpha, beta=beta, k=k, lam=p3s.lam,
                               sigma_start=float(sampling.percent_to_sigma(start_percent)),
                               sigma_end=float(sampling.percent_to_sigma(end_percent)),
                               cross_attention=cross_attention)
        copy = p3s_weights.copy_for_model(p3s, model)
        patched = model.clone()
        build_patch(patched, copy, p3s.rngr, latent, states, settings).install(patched)
        return (patched,)

    @staticmethod
    def _reference(model, weights, reference, vae, clip_vision, negatives_mask, inpainted):
        if reference is None:
            for name, value in (("negatives_mask", negatives_mask), ("inpainted_reference", inpainted)):
                if value is not None:
                    raise validation.InputError(f"{APPLY}: {name} is connected but reference is not; connect the "
                                                "photo the mask or inpainting belongs to")
            return weights.reference_latent, weights.clip_states
        reference = validation.image(reference, "reference", APPLY)
        batch, height, width = reference.shape[:3]
        reference = reference[:1]  # the RNGR reference is one photo: the first of the batch
        if vae is None or clip_vision is None:
            raise validation.InputError(f"{APPLY}: a wired reference is encoded with the VAE and CLIP vision: "
                                        "connect both (or disconnect reference to use the file's own)")
        mask = None
        if negatives_mask is not None:
            # the mask of the photo used: the first, whether one mask serves the batch or one per image
            mask = validation.mask(negatives_mask, "negatives_mask", APPLY, images=batch, of="reference image")[0]
            if tuple(mask.shape) != (height, width):
                raise validation.InputError(f"{APPLY}: negatives_mask is {mask.shape[1]}x{mask.shape[0]} pixels but "
                                            f"the reference is {width}x{height}; make the mask from this photo")
            if not bool((mask > 0.5).any()):
                raise validation.InputError(f"{APPLY}: negatives_mask is empty (nothing above 0.5): there is no "
                                            "look-alike to remove; disconnect the mask, or click the look-alike in "
                                            "Points to Mask")
        if inpainted is not None:
            inpainted = validation.image(inpainted, "inpainted_reference", APPLY)[:1]
            validation.batch_pairing(inpainted.shape[0], 1, "inpainted_reference", APPLY, item="image",
                                     of="reference image")
            if tuple(inpainted.shape[1:3]) != (height, width):
                raise validation.InputError(f"{APPLY}: inpainted_reference is {inpainted.shape[2]}x"
                                            f"{inpainted.shape[1]} pixels but the reference is {width}x{height}")
            inpainted = inpainted[0].movedim(-1, 0)
        pixels = removed_negatives(reference[0].movedim(-1, 0), mask, inpainted)
        size = int(metadata_json(weights.metadata, "resolution", 512))
        latent, states = encode_reference(square_resize(pixels, size), vae, model.model, clip_vision,
                                          int(metadata_json(weights.metadata, "clip_size", 224)))
        if states.shape[-1] != weights.clip_width:
            raise validation.InputError(f"{APPLY}: clip_vision gives {states.shape[-1]}-wide states but "
                                        f"{weights.name} was trained with {weights.clip_width}-wide CLIP states; "
                                        "connect the CLIP vision model it was trained with")
        return latent, states


NODE_CLASS_MAPPINGS = {"SC_P3SLoader": P3SLoader, "SC_P3SApply": P3SApply}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_P3SLoader": "P3S Loader", "SC_P3SApply": "P3S Apply (condition injection)"}
