"""Where the transformer layers of a ComfyUI UNet are, derived from the model itself.

Patch slots in ComfyUI are keyed ``(block_name, block_id, block_index)``: ``("input", 1, 0)``,
``("middle", 0, 0)``, ``("output", 3, 0)`` for SD1.5. Nothing here hard-codes SD1.5's indices: a reduced UNet
(as in the tests) or another depth gives its own list, so every method patches what the model really has.
"""
from __future__ import annotations

from dataclasses import dataclass

ENCODER, MIDDLE, DECODER = "input", "middle", "output"

# SD1.5 UNets by input channels, as weight files record them in ``base_architecture``.
ARCHITECTURES = {4: "sd15", 9: "sd15-inpainting"}


@dataclass(frozen=True)
class TransformerSlot:
    block: str          # "input" | "middle" | "output"
    block_id: int       # index into input_blocks / output_blocks (0 for middle)
    block_index: int    # index inside the SpatialTransformer's transformer_blocks
    level: int          # 0 at latent resolution, +1 per downsampling
    channels: int       # width of the layer's hidden states
    heads: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.block_id, self.block_index)

    @property
    def name(self) -> str:
        return f"{self.block}{self.block_id}.{self.block_index}"


class UnsupportedModel(ValueError):
    """The MODEL is not a UNet with spatial transformers (e.g. a DiT/flow model)."""


def diffusion_model_of(model):
    """The UNet module behind a ModelPatcher, a BaseModel or the UNet itself."""
    inner = getattr(model, "model", model)
    return getattr(inner, "diffusion_model", inner)


def architecture_of(model) -> str:
    """``base_architecture`` of a MODEL: "sd15", "sd15-inpainting", else "<n>-channel" (no file matches that)."""
    in_channels = diffusion_model_of(model).input_blocks[0][0].in_channels
    return ARCHITECTURES.get(in_channels, f"{in_channels}-channel")


def transformer_slots(model) -> list[TransformerSlot]:
    """Every spatial-transformer block of the UNet in forward order (encoder, middle, decoder)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = diffusion_model_of(model)
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModel(f"expected an SD1.5-style UNet (input/middle/output blocks), got "
                               f"{type(unet).__name__}")

    def slots_in(module, block, block_id, level):
        found = []
        for layer in module.modules():
            if isinstance(layer, SpatialTransformer):
                for index, tb in enumerate(layer.transformer_blocks):
                    found.append(TransformerSlot(block, block_id, index, level, tb.attn1.to_q.in_features,
                                                 tb.n_heads))
        return found

    slots, level = [], 0
    for block_id, module in enumerate(unet.input_blocks):
        slots += slots_in(module, ENCODER, block_id, level)
        if any(isinstance(m, Downsample) for m in module.modules()):
            level += 1
    if unet.middle_block is not None:
        slots += slots_in(unet.middle_block, MIDDLE, 0, level)
    for block_id, module in enumerate(unet.output_blocks):
        slots += slots_in(module, DECODER, block_id, level)
        if any(isinstance(m, Upsample) for m in module.modules()):
            level -= 1
    if not slots:
        raise UnsupportedModel("the UNet has no spatial transformer blocks to patch")
    return slots


def select_slots(model, blocks: tuple[str, ...]) -> list[TransformerSlot]:
    """Slots whose block is in ``blocks`` (a subset of ENCODER, MIDDLE, DECODER), in forward order."""
    unknown = set(blocks) - {ENCODER, MIDDLE, DECODER}
    if unknown:
        raise ValueError(f"unknown UNet positions {sorted(unknown)}; expected input, middle or output")
    return [slot for slot in transformer_slots(model) if slot.block in blocks]


def require_sd15_unet(model, purpose: str, *, in_channels: tuple[int, ...] = (4, 9)) -> None:
    """A clear error unless the MODEL is an SD1.5-architecture UNet (text width 768, base width 320)."""
    unet = diffusion_model_of(model)
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None) or {}
    context_dim = config.get("context_dim")
    channels = getattr(unet, "model_channels", None)
    first = getattr(getattr(unet, "input_blocks", [[None]])[0][0], "in_channels", None)
    if context_dim != 768 or channels != 320 or first not in in_channels:
        raise UnsupportedModel(
            f"{purpose} needs an SD1.5-architecture model (context width 768, UNet width 320, "
            f"{' or '.join(map(str, in_channels))} input channels); this MODEL has context width {context_dim}, "
            f"UNet width {channels}, {first} input channels")
