"""The AnyLogo weight file (``models/anylogo/*.safetensors``): what the trainer exports and the loader reads.

Tensors:
  ``unet.<key>``            fine-tuned UNet weights under ComfyUI's diffusion_model key names (a full
                            fine-tune, or any subset of it); applied as "set" model patches, so ComfyUI's
                            memory management loads and unloads them with the model.
  ``image_projection.weight`` / ``.bias``   the DINOv2 → cross-attention projection (1024 → 768 for SD1.5).
Metadata: method "anylogo", format_version, base_architecture ("sd15" or "sd15-inpainting"), unet_in_channels,
image_encoder ("dinov2"), image_layers (e.g. [6,12,18,24]), image_resolution, recycling_positions,
sparse_threshold (Λ used in training), base_hash, config (the training config).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .image_context import ImageProjection
from .weight_files import WeightFileError, load_weights, metadata_json, require_keys, save_weights

METHOD = "anylogo"
FORMAT_VERSION = 1
UNET_PREFIX = "unet."
PROJECTION_PREFIX = "image_projection."
ARCHITECTURES = {4: "sd15", 9: "sd15-inpainting"}


@dataclass
class AnyLogoWeights:
    unet: dict[str, torch.Tensor]          # diffusion_model keys (without "diffusion_model.")
    projection: ImageProjection
    metadata: dict[str, str]
    name: str = ""

    @property
    def architecture(self) -> str:
        return self.metadata.get("base_architecture", "")

    @property
    def image_layers(self) -> list[int] | None:
        return metadata_json(self.metadata, "image_layers")

    @property
    def image_resolution(self) -> int | None:
        value = metadata_json(self.metadata, "image_resolution")
        return int(value) if value is not None else None

    def model_patches(self) -> dict[str, tuple]:
        """{ModelPatcher key: ("set", (weight,))} for ``ModelPatcher.add_patches``."""
        return {f"diffusion_model.{k}": ("set", (v,)) for k, v in self.unet.items()}


def save_anylogo_weights(path, unet_state: dict[str, torch.Tensor], projection: ImageProjection,
                         metadata: dict) -> None:
    tensors = {UNET_PREFIX + k: v for k, v in unet_state.items()}
    tensors.update({PROJECTION_PREFIX + k: v for k, v in projection.proj.state_dict().items()})
    save_weights(path, tensors, {**metadata, "method": METHOD, "format_version": str(FORMAT_VERSION)})


def load_anylogo_weights(path) -> AnyLogoWeights:
    from pathlib import Path

    tensors, metadata = load_weights(path, method=METHOD, supported_version=FORMAT_VERSION)
    name = Path(path).name
    require_keys(tensors, [PROJECTION_PREFIX + "weight", PROJECTION_PREFIX + "bias"], name)
    if metadata.get("base_architecture") not in ARCHITECTURES.values():
        raise WeightFileError(f"{name} was trained for {metadata.get('base_architecture')!r}; this pack's AnyLogo "
                              f"supports {sorted(ARCHITECTURES.values())}")
    weight = tensors[PROJECTION_PREFIX + "weight"]
    projection = ImageProjection(weight.shape[1], weight.shape[0])
    projection.proj.load_state_dict({"weight": weight.float(), "bias": tensors[PROJECTION_PREFIX + "bias"].float()})
    projection.requires_grad_(False).eval()
    unet = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    return AnyLogoWeights(unet, projection, metadata, name)


def check_fits_model(weights: AnyLogoWeights, model_patcher) -> None:
    """A clear error when the file's architecture, keys or shapes do not match the MODEL."""
    from .unet_layout import diffusion_model_of

    unet = diffusion_model_of(model_patcher)
    in_channels = unet.input_blocks[0][0].in_channels
    wanted = ARCHITECTURES.get(in_channels, f"{in_channels}-channel")
    if weights.architecture != wanted:
        raise WeightFileError(f"{weights.name} is for {weights.architecture} models, but this MODEL is {wanted} "
                              f"({in_channels} input channels); load the matching checkpoint")
    own = unet.state_dict()
    unknown = [k for k in weights.unet if k not in own]
    if unknown:
        raise WeightFileError(f"{weights.name} has {len(unknown)} UNet weights this model lacks, e.g. {unknown[:3]} "
                              "(another UNet layout?)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.unet.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise WeightFileError(f"{weights.name} does not fit this UNet: {len(bad)} shape mismatches, e.g. {bad[:2]}")
