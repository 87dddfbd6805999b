"""EqDiff nodes: load a subject's RRA weights, apply residual reference attention to a MODEL, show where it copied.

The subject's tokens and K/V weights need no node of ours: they load with the stock CLIPTextEncode
(``embedding:<name>``) and LoraLoaderModelOnly (``<name>_kv``).
"""
from __future__ import annotations

import torch

from ..model_patches.eqdiff import ATTACHMENT, EqDiffSettings, build_patch, load_eqdiff_weights
from ..model_patches.eqdiff_rra import REFERENCE_MODES
from ..model_patches.unet_layout import require_sd15_unet
from . import validation

CATEGORY = "subject_customization/eqdiff"
WEIGHTS_TYPE = "EQDIFF_WEIGHTS"
LOADER, APPLY, REPORT = "EqDiff Loader", "EqDiff Apply", "EqDiff Reference Report"


def square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] centre-cropped to a square and resized to ``size`` (how the trainer crops its images)."""
    import comfy.utils

    return comfy.utils.common_upscale(pixels, size, size, "bilinear", "center")


class EqDiffLoader:
    DESCRIPTION = ("Loads a subject's EqDiff residual-reference-attention weights from models/eqdiff (exported by "
                   "python -m train.eqdiff or the EqDiff Train Subject node). The file's method, format and base "
                   "architecture are checked; its metadata names the token embeddings and K/V LoRA trained with it.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (WEIGHTS_TYPE, "STRING")
    RETURN_NAMES = ("eqdiff", "info")
    OUTPUT_TOOLTIPS = ("EqDiff weights, for EqDiff Apply.",
                       "What the file says: trigger embedding names, K/V LoRA, class word, base, reference mode.")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"weights_name": (folder_paths.get_filename_list("eqdiff"), {
            "tooltip": "An EqDiff .safetensors file in models/eqdiff."})}}

    def load(self, weights_name):
        import folder_paths

        weights = load_eqdiff_weights(folder_paths.get_full_path_or_raise("eqdiff", weights_name))
        meta = weights.metadata
        info = "\n".join(f"{key}: {meta[key]}" for key in ("embedding", "embedding_low", "embedding_high", "lora",
                                                            "class_word", "base_name", "reference_mode",
                                                            "trained_steps") if key in meta)
        return weights, info


class EqDiffApply:
    DESCRIPTION = (
        "EqDiff residual reference attention (Eq. 8–9): every sampling step the same UNet first runs once on the "
        "reference image's latent and keeps its middle/decoder self-attention inputs; then each of those layers "
        "attends to them with its trained reference projections and blends the result in with its learned mask. "
        "Use it after LoraLoaderModelOnly with the subject's <name>_kv file, and write embedding:<name> in the "
        "prompt. Applied to the positive and negative rows, as the official pipeline does.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with EqDiff reference attention; connect it to a KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 MODEL, ideally with the subject's K/V LoRA applied (the "
                                               "original is not changed)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the reference image."}),
                "eqdiff": (WEIGHTS_TYPE, {"tooltip": "The subject's RRA weights (EqDiff Loader)."}),
                "reference": ("IMAGE", {"tooltip": "A photo of the subject whose texture to copy; the first image of "
                                                   "the batch is used, centre-cropped and resized to reference_size."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                             "Scales the learned fusion mask (1 = Eq. 9, 0 = off, the plain model)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                  "First part of the schedule where the reference is read (0 = the first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                "Last part of the schedule where the reference is read (1 = the last step)."}),
                "reference_mode": (list(REFERENCE_MODES), {"default": "clean", "tooltip":
                                   "What the reference pass sees: clean = the clean reference latent at the "
                                   "current step (official inference); noised = noised to the current step; "
                                   "training = noised two timesteps less, as in training."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "Seed of the reference noise (noised / training modes)."}),
                "reference_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip":
                                   "Side in pixels the reference is encoded at (the training resolution)."}),
            },
            "optional": {
                "reference_mask": ("MASK", {"tooltip": "Optional subject mask of the reference: attention only to "
                                                       "reference tokens inside it."}),
                "record": ("BOOLEAN", {"default": False, "tooltip": "Record the fusion mask per layer for the "
                                                                    "EqDiff Reference Report (costs a little)."}),
            },
        }

    def apply(self, model, vae, eqdiff, reference, strength, start_percent, end_percent, reference_mode, seed,
              reference_size, reference_mask=None, record=False):
        require_sd15_unet(model, "EqDiff", in_channels=(4,))
        reference = validation.image(reference, "reference", APPLY)
        if reference_mask is not None:
            reference_mask = validation.mask(reference_mask, "reference_mask", APPLY, images=reference.shape[0],
                                             of="reference image")[:1]
        validation.float_widgets(type(self), APPLY, strength=strength, start_percent=start_percent,
                                 end_percent=end_percent)
        if start_percent > end_percent:
            raise validation.InputError(f"{APPLY}: start_percent ({start_percent}) must not be after end_percent "
                                        f"({end_percent})")
        if reference_size % 64:
            raise validation.InputError(f"{APPLY}: reference_size is {reference_size}; expected a multiple of 64")
        sampling = model.get_model_object("model_sampling")
        settings = EqDiffSettings(strength=strength, sigma_start=float(sampling.percent_to_sigma(start_percent)),
                                  sigma_end=float(sampling.percent_to_sigma(end_percent)),
                                  reference_mode=reference_mode, seed=seed, record=record)
        pixels = square(reference[:1].movedim(-1, 1), reference_size)
        mask = None
        if reference_mask is not None:
            mask = square(reference_mask[:, None].float(), reference_size)[:, 0]
            if not bool((mask > 0).any()):
                raise validation.InputError(f"{APPLY}: reference_mask is empty inside the centre crop of the "
                                            "reference; draw the subject's region or disconnect the mask")
        latent = model.model.process_latent_in(vae.encode(pixels.movedim(1, -1)).float())
        patched = model.clone()
        build_patch(patched, eqdiff, latent, settings, mask).install(patched)
        return (patched,)


def fusion_report(recorder) -> str:
    if not recorder.per_layer:
        return "no EqDiff reference attention was recorded (was the model sampled with EqDiff active?)"
    lines = ["EqDiff fusion mask m (Eq. 9: 0 = the layer's own output, 1 = copied from the reference)",
             "layer        m mean    first step  last step  steps"]
    for name, entries in recorder.per_layer.items():
        entries = sorted(entries, key=lambda e: -e[0])
        values = [m for _, m in entries]
        lines.append(f"{name:<12} {sum(values) / len(values):.4f}    {values[0]:.4f}      {values[-1]:.4f}     "
                     f"{len(values)}")
    return "\n".join(lines)


def fusion_heatmap(recorder, height: int, width: int) -> torch.Tensor:
    """IMAGE [rows, H, W, 3]: mean m over layers and steps (absolute scale 0..1), dark blue → yellow."""
    import torch.nn.functional as F

    maps = []
    for name, total in recorder.mask_sums.items():
        gh, gw = recorder.grids[name]
        mean = (total / recorder.mask_counts[name]).reshape(total.shape[0], 1, gh, gw)
        maps.append(F.interpolate(mean, size=(height, width), mode="bilinear", align_corners=False)[:, 0])
    t = torch.stack(maps).mean(0).clamp(0, 1) if maps else torch.zeros(1, height, width)
    return torch.stack([t.sqrt(), t, (1 - t) * 0.6], dim=-1).float()


class EqDiffReferenceReport:
    DESCRIPTION = ("Where the last sampling with an EqDiff MODEL (record on) copied from the reference: the "
                   "learned fusion mask m of every RRA layer, as numbers per layer and as a heatmap over the image.")
    CATEGORY = CATEGORY
    FUNCTION = "report"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "heatmap")
    OUTPUT_TOOLTIPS = ("Mean fusion mask per layer (first/last step).",
                       "Mean fusion mask over layers and steps, 0 (dark blue) to 1 (yellow); one image per row "
                       "of the sampled batch (negative rows first).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL from EqDiff Apply with record on."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output: runs this report after that sampling."}),
            "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Heatmap width."}),
            "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Heatmap height."}),
        }}

    def report(self, model, samples, width, height):
        validation.latent(samples, "samples", REPORT)
        patch = model.get_attachment(ATTACHMENT)
        if patch is None or patch.recorder is None:
            raise validation.InputError(f"{REPORT}: this MODEL has no EqDiff recording: turn record on in EqDiff "
                                        "Apply and connect its MODEL here")
        return fusion_report(patch.recorder), fusion_heatmap(patch.recorder, height, width)


NODE_CLASS_MAPPINGS = {
    "SC_EqDiffLoader": EqDiffLoader,
    "SC_EqDiffApply": EqDiffApply,
    "SC_EqDiffReferenceReport": EqDiffReferenceReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SC_EqDiffLoader": "EqDiff Loader",
    "SC_EqDiffApply": "EqDiff Apply (residual reference attention)",
    "SC_EqDiffReferenceReport": "EqDiff Reference Report",
}
