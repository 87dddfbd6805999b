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
from .weight_files import (WeightFileError, load_weights, metadata_json, require_architecture_of, require_keys,
                           require_shape, require_supported_architecture, require_usable_tensors, save_weights)

METHOD = "anylogo"
FORMAT_VERSION = 1
UNET_PREFIX = "unet."
PROJECTION_PREFIX = "image_projection."
CONTEXT_WIDTH = 768  # SD1.5's cross-attention width: what the projection must produce


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
        return image_layers_of(self.metadata, self.name)

    @property
    def image_resolution(self) -> int | None:
        return image_resolution_of(self.metadata, self.name)

    def model_patches(self) -> dict[str, tuple]:
        """{ModelPatcher key: ("set", (weight,))} for ``ModelPatcher.add_patches``."""
        return {f"diffusion_model.{k}": ("set", (v,)) for k, v in self.unet.items()}


def image_layers_of(metadata: dict, source: str) -> list[int] | None:
    """The ``image_layers`` metadata as a list of positive layer numbers, or None when absent."""
    value = metadata_json(metadata, "image_layers")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise WeightFileError(f"{source}: metadata image_layers is {metadata['image_layers']!r}; expected a JSON list "
                              "of DINOv2 layer numbers such as [6, 12, 18, 24]. Re-export the file, or fix the "
                              "metadata")
    return value


def image_resolution_of(metadata: dict, source: str) -> int | None:
    """The ``image_resolution`` metadata as a positive int, or None when absent."""
    value = metadata_json(metadata, "image_resolution")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise WeightFileError(f"{source}: metadata image_resolution is {metadata['image_resolution']!r}; expected "
                              "the DINOv2 input side in pixels, such as 224")
    return value


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
    require_supported_architecture(metadata, name, "AnyLogo")
    image_layers_of(metadata, name), image_resolution_of(metadata, name)  # malformed metadata fails at load
    require_usable_tensors(tensors, name)
    weight_key, bias_key = PROJECTION_PREFIX + "weight", PROJECTION_PREFIX + "bias"
    require_shape(tensors, weight_key, (CONTEXT_WIDTH, None), name,
                  f"the DINOv2 projection [{CONTEXT_WIDTH} cross-attention width, DINOv2 width]")
    weight = tensors[weight_key]
    require_shape(tensors, bias_key, (CONTEXT_WIDTH,), name,
                  f"one bias per output of the projection {list(weight.shape)}")
    projection = ImageProjection(weight.shape[1], weight.shape[0])
    projection.proj.load_state_dict({"weight": weight.float(), "bias": tensors[bias_key].float()})
    projection.requires_grad_(False).eval()
    unet = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    return AnyLogoWeights(unet, projection, metadata, name)


def check_fits_model(weights: AnyLogoWeights, model_patcher) -> None:
    """A clear error when the file's architecture, keys or shapes do not match the MODEL."""
    from .unet_layout import diffusion_model_of

    unet = diffusion_model_of(model_patcher)
    require_architecture_of(model_patcher, weights.architecture, weights.name, "load the matching checkpoint")
    own = unet.state_dict()
    unknown = [k for k in weights.unet if k not in own]
    if unknown:
        raise WeightFileError(f"{weights.name} has {len(unknown)} UNet weights this model lacks, e.g. {unknown[:3]} "
                              "(another UNet layout?)")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.unet.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise WeightFileError(f"{weights.name} does not fit this UNet: {len(bad)} shape mismatches, e.g. {bad[:2]}")
