"""CustomContrast weight files: the MFI encoder and every layer's K_v/V_v, with the layout they were trained on.

``models/customcontrast/<name>.safetensors``: tensors ``encoder.*`` and ``visual.<layer>.to_k|to_v.weight``;
metadata ``method=customcontrast``, ``format_version``, ``base_architecture``, ``encoder_config`` (JSON),
``layers`` (the UNet's cross-attention layers in forward order, name and width), ``image_layers`` (the CLIP
vision layers whose features were concatenated) and ``training_config``. A MODEL whose cross-attention layers
differ from ``layers`` is refused by name: S+ token a belongs to layer a.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from .customcontrast import VisualAttention
from .customcontrast_encoder import EncoderConfig, MFIEncoder
from .unet_layout import TransformerSlot, transformer_slots
from .weight_files import (WeightFileError, load_weights, metadata_json, require_usable_tensors, save_weights)

METHOD = "customcontrast"
FORMAT_VERSION = 1


@dataclass
class CustomContrastWeights:
    name: str
    encoder: MFIEncoder
    visual_attention: VisualAttention
    layers: list            # [[slot name, channels], ...] in forward order
    image_layers: list      # CLIP vision layers (1-based) concatenated coarse to fine
    metadata: dict


def _layout(slots: list[TransformerSlot]) -> list:
    return [[slot.name, slot.channels] for slot in slots]


def save_customcontrast_weights(path, encoder: MFIEncoder, visual_attention: VisualAttention, slots, *,
                                image_layers, training_config: dict | None = None,
                                extra_metadata: dict | None = None) -> Path:
    """``extra_metadata`` (the trainer's: base hash, trained steps…) is written alongside; the keys this format
    defines keep their values here."""
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    tensors.update({f"visual.{k}": v for k, v in visual_attention.layers.state_dict().items()})
    return save_weights(path, tensors, {
        **(extra_metadata or {}),
        "method": METHOD, "format_version": str(FORMAT_VERSION), "base_architecture": "sd15",
        "encoder_config": encoder.config.to_dict(), "layers": _layout(slots), "image_layers": list(image_layers),
        "training_config": training_config or {}})


def load_customcontrast_weights(path) -> CustomContrastWeights:
    tensors, metadata = load_weights(path, method=METHOD, supported_version=FORMAT_VERSION)
    name = Path(path).name
    require_usable_tensors(tensors, name)
    config = metadata_json(metadata, "encoder_config")
    layers, image_layers = metadata_json(metadata, "layers"), metadata_json(metadata, "image_layers")
    if not isinstance(config, dict) or not isinstance(layers, list) or not isinstance(image_layers, list):
        raise WeightFileError(f"{name} lacks its encoder_config / layers / image_layers metadata; export it again "
                              "with `python -m train.customcontrast`")
    try:
        encoder = MFIEncoder(EncoderConfig(**config))
        slots = [TransformerSlot(*_parse(slot_name), 0, int(channels), 1) for slot_name, channels in layers]
        visual = VisualAttention(slots, encoder.config.token_dim)
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
        visual.layers.load_state_dict({k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")})
    except (TypeError, ValueError, RuntimeError) as e:
        raise WeightFileError(f"{name} does not hold a CustomContrast encoder of its declared shape ({e})") from None
    encoder.eval()
    return CustomContrastWeights(name, encoder, visual, layers, image_layers, metadata)


def _parse(slot_name: str):
    """'output3.0' → ('output', 3, 0)."""
    head, index = slot_name.rsplit(".", 1)
    block = head.rstrip("0123456789")
    return block, int(head[len(block):]), int(index)


def check_fits_model(weights: CustomContrastWeights, model) -> list[TransformerSlot]:
    """The MODEL's cross-attention slots, or a clear error when they are not the layers of the file."""
    slots = transformer_slots(model)
    if _layout(slots) != [[n, int(c)] for n, c in weights.layers]:
        raise WeightFileError(
            f"{weights.name} was trained for a UNet with {len(weights.layers)} cross-attention layers "
            f"({', '.join(n for n, _ in weights.layers[:4])}, …); this MODEL has {len(slots)} "
            f"({', '.join(s.name for s in slots[:4])}, …). Use weights trained on this model's architecture")
    return slots
