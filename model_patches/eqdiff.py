"""EqDiff at sampling time: one reference pass per model evaluation, then every row reads it through RRA.

``EqDiffPatch`` is installed on a clone of the MODEL. In each ``calc_cond_batch`` (one model evaluation, all
conditioning chunks) it runs the same UNet once on the reference latent — clean at the current timestep by
default, the official inference — banking the middle/decoder self-attention inputs, and then runs the real
evaluation with every row (cond and uncond, the official default) reading the bank through the trained RRA
layers. The bank lives for that evaluation only. ``EqDiffWeights`` is the models/eqdiff file. The RRA modules
are registered with ``set_additional_models``, so ComfyUI loads and offloads them with the MODEL (on the GPU
before the first step, back to the offload device when memory is needed) instead of casting them per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import extra_pass
from .eqdiff_rra import (REFERENCE_MODES, Read, ReferenceRecorder, RRAModules, capture_reference, install_rra,
                         reference_input, reference_key_bias, rra_slots, STATUS_KEY)
from .finite import require_finite, require_finite_number
from .unet_layout import TransformerSlot, diffusion_model_of
from .weight_files import (WeightFileError, load_weights, metadata_json, require_shape, require_supported_architecture,
                           require_usable_tensors, save_weights)

ATTACHMENT = "subject_customization.eqdiff"
ANYLOGO_ATTACHMENT = "subject_customization.anylogo"
METHOD, FORMAT_VERSION = "eqdiff", 1
ARCHITECTURES = ("sd15",)
REFERENCE_TIME_GAP = 2  # the official reference noise level in training: t − 2


@dataclass(frozen=True)
class EqDiffSettings:
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    reference_mode: str = "clean"
    seed: int = 0
    record: bool = False

    def __post_init__(self):
        strength = require_finite_number(self.strength, "the EqDiff strength", hint=">= 0 (1 = Eq. 9, 0 = off)")
        if strength < 0:
            raise ValueError(f"the EqDiff strength must be >= 0, got {self.strength}")
        for name in ("sigma_start", "sigma_end"):
            if math.isnan(float(getattr(self, name))):
                raise ValueError(f"{name} is NaN; expected a sigma (inf for 'from the first step')")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}")


@dataclass
class EqDiffWeights:
    name: str
    modules: RRAModules
    layers: list[str]
    metadata: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"rra.{k}": v for k, v in self.modules.state_dict().items()}


def save_eqdiff_weights(path, modules: RRAModules, slots: list[TransformerSlot], metadata: dict):
    tensors = {f"rra.{k}": v.detach().float().cpu() for k, v in modules.state_dict().items()}
    meta = {"method": METHOD, "format_version": str(FORMAT_VERSION), "base_architecture": "sd15",
            "layers": [slot.name for slot in slots], **metadata}
    return save_weights(path, tensors, meta)


def load_eqdiff_weights(path) -> EqDiffWeights:
    from pathlib import Path

    tensors, metadata = load_weights(path, method=METHOD, supported_version=FORMAT_VERSION)
    name = Path(path).name
    require_supported_architecture(metadata, name, "EqDiff", supported=ARCHITECTURES)
    layers = metadata_json(metadata, "layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise WeightFileError(f"{name}: metadata layers is {metadata.get('layers')!r}; expected a JSON list of "
                              "layer names")
    require_usable_tensors(tensors, name)
    modules = RRAModules()
    for layer in layers:
        prefix = f"rra.{layer.replace('.', '_')}."
        for part in ("to_k_res.weight", "to_v_res.weight", "fusion.weight", "fusion.bias"):
            if prefix + part not in tensors:
                raise WeightFileError(f"{name} lacks tensor {prefix + part!r} of layer {layer}")
        channels = tensors[prefix + "to_k_res.weight"].shape[0]
        require_shape(tensors, prefix + "to_k_res.weight", (channels, channels), name, "the reference key projection")
        require_shape(tensors, prefix + "to_v_res.weight", (channels, channels), name, "the reference value projection")
        require_shape(tensors, prefix + "fusion.weight", (channels + 1, 2 * channels), name, "the fusion head H_r")
        require_shape(tensors, prefix + "fusion.bias", (channels + 1,), name, "the fusion head's bias")
        from .eqdiff_rra import ResidualReferenceAttention

        module = ResidualReferenceAttention(channels)
        module.load_state_dict({part: tensors[prefix + part].float() for part in
                                ("to_k_res.weight", "to_v_res.weight", "fusion.weight", "fusion.bias")})
        modules[layer.replace(".", "_")] = module
    modules.requires_grad_(False)
    return EqDiffWeights(name, modules, layers, metadata)


def check_fits_model(weights: EqDiffWeights, model) -> list[TransformerSlot]:
    """The MODEL's RRA slots, after checking the file names exactly those layers at the same widths."""
    slots = rra_slots(model)
    names = [slot.name for slot in slots]
    if names != weights.layers:
        raise ValueError(f"{weights.name} was trained on a UNet with RRA layers {weights.layers}, this MODEL has "
                         f"{names}: the weights are for another base model")
    for slot in slots:
        width = weights.modules.of(slot).channels
        if width != slot.channels:
            raise ValueError(f"{weights.name}: layer {slot.name} is {width} wide, the MODEL's is {slot.channels}: "
                             "the weights are for another base model")
    return slots


@dataclass
class EqDiffPatch:
    settings: EqDiffSettings
    slots: list[TransformerSlot]
    modules: RRAModules
    reference: torch.Tensor                      # [1, 4, h, w] reference latent in model space
    reference_mask: torch.Tensor | None = None   # [1, H, W] pixel mask, or None
    recorder: ReferenceRecorder | None = None
    weights_name: str = ""
    _banks: list = field(default_factory=list)

    def __deepcopy__(self, memo):  # one patch per Apply node, shared by the clones made from it
        return self

    def install(self, model_patcher) -> None:
        if model_patcher.get_attachment(ATTACHMENT) is not None:
            raise ValueError("this MODEL already has EqDiff applied; EqDiff applies once per model (a second "
                             "reference pass would hide the first one's bank). Feed EqDiff Apply with the MODEL "
                             "from before the first one")
        if model_patcher.get_attachment(ANYLOGO_ATTACHMENT) is not None:
            raise ValueError("this MODEL already has AnyLogo applied: apply EqDiff before AnyLogo (AnyLogo then "
                             "chains EqDiff's reference attention in its layers); the other order would replace "
                             "AnyLogo's recycling layers")
        import comfy.model_patcher

        install_rra(model_patcher, self.slots)
        # ComfyUI's model management then moves the RRA layers with the MODEL (load_models_gpu loads the
        # additional models of every model it loads) and counts their memory
        model_patcher.set_additional_models(ATTACHMENT, [comfy.model_patcher.ModelPatcher(
            self.modules, load_device=model_patcher.load_device, offload_device=model_patcher.offload_device)])
        model_patcher.add_wrapper_with_key("calc_cond_batch", ATTACHMENT, self.calc_cond_batch_wrapper)
        if self.recorder is not None:
            model_patcher.add_wrapper_with_key("outer_sample", ATTACHMENT, self.outer_sample_wrapper)
        model_patcher.set_attachments(ATTACHMENT, self)

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.recorder.reset()
        return executor(*args, **kwargs)

    def active(self, sigma: float) -> bool:
        s = self.settings
        return s.strength > 0 and s.sigma_end <= sigma <= s.sigma_start

    def reference_context(self, conds, device) -> torch.Tensor:
        """The reference pass's text: the positive prompt (conds[0] in ComfyUI's [cond, uncond] order)."""
        positive = next((c for c in conds if c), None)
        return positive[0]["model_conds"]["c_crossattn"].process_cond(batch_size=1, device=device).cond

    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        sigma = float(timestep.flatten()[0])
        if not self.active(sigma) or not any(conds):
            return executor(model, conds, x_in, timestep, model_options)
        device = x_in.device
        transformer_options = model_options.get("transformer_options", {})
        bank = self.reference_bank(model, timestep.flatten()[:1], self.reference_context(conds, device),
                                   transformer_options)
        self._banks.append(bank)
        try:
            options = dict(model_options)
            options["transformer_options"] = {**transformer_options,
                                              STATUS_KEY: self.read_status(bank, x_in.shape[-2:])}
            return executor(model, conds, x_in, timestep, options)
        finally:
            self._banks.pop().clear()

    def reference_bank(self, base_model, sigma: torch.Tensor, context, transformer_options):
        reference = self.reference.to(sigma.device)
        noise = None
        if self.settings.reference_mode != "clean":
            noise = extra_pass.seeded_noise(reference.shape, self.settings.seed, float(sigma), sigma.device)
        x, ref_sigma = reference_input(base_model, reference, sigma, self.settings.reference_mode, noise=noise,
                                       gap=REFERENCE_TIME_GAP)
        return capture_reference(base_model, x, ref_sigma, context.to(reference), self.slots, transformer_options)

    def read_status(self, bank, latent_hw) -> Read:
        key_bias = None
        if self.reference_mask is not None:
            levels = 1 + max(slot.level for slot in self.slots)
            key_bias = reference_key_bias(self.reference_mask, tuple(self.reference.shape[-2:]), levels)
        return Read(bank, self.modules, self.settings.strength, key_bias, self.recorder)


def build_patch(model_patcher, weights: EqDiffWeights, reference_latent: torch.Tensor, settings: EqDiffSettings,
                reference_mask: torch.Tensor | None = None) -> EqDiffPatch:
    if (not isinstance(reference_latent, torch.Tensor) or reference_latent.ndim != 4
            or reference_latent.shape[:2] != (1, 4)):
        shape = tuple(reference_latent.shape) if isinstance(reference_latent, torch.Tensor) else type(reference_latent)
        raise ValueError(f"EqDiff: the reference latent must be one 4-channel latent [1, 4, h, w], got {shape}")
    require_finite(reference_latent, "EqDiff: the reference latent", axes=("latent", "channel", "y", "x"),
                   hint="the VAE encoded the reference to NaN/inf; check the image and the VAE")
    if diffusion_model_of(model_patcher).input_blocks[0][0].in_channels != 4:
        raise ValueError("EqDiff needs a 4-channel SD1.5 UNet (the weights are trained on one); this MODEL is an "
                         "inpainting UNet")
    slots = check_fits_model(weights, model_patcher)
    recorder = ReferenceRecorder() if settings.record else None
    return EqDiffPatch(settings, slots, weights.modules, reference_latent, reference_mask, recorder, weights.name)
