"""P3S injection copy (Eq. 6, Fig. 3): a trainable simplified UNet whose attention inputs feed the frozen UNet.

The copy is built from the base UNet itself, like a ControlNet copy: every module is a deep copy of the base's
module at the same place, so it starts with the base's weights. Its layout, derived from the base's transformer
slots in forward order (encoder, middle, decoder):

* ``time_embed`` and the input convolution (4 latent channels: a 9-channel inpainting conv keeps its first 4);
* per run of slots at one level of one part (encoder / middle / decoder): the resampling needed to reach that
  level (the base's own Downsample/Upsample for that step), then **one ResNet block** (the base's first ResNet
  block holding a slot of the run);
* **one spatial transformer per transformer slot of the base** (a copy of that slot's transformer).

The copy has no skip connections (it is a chain), so a decoder ResNet block, which in the base reads
``[h ; skip]``, keeps only the weights that read ``h`` (the leading input channels: ComfyUI concatenates
``h`` first); a slice of the base's weights is still the base's weights. Everything else matches in shape.

Per slot ``i`` the copy hands out two zero-initialised projections (Linear C→C on tokens, the "1×1 conv" of
Eq. 6) of its transformer's attention inputs: ``f_i`` of the self-attention input (norm1 output, the space
the base's ``z_i`` lives in, so ``W_K``/``W_V`` of the base apply to both, Eq. 7) and ``g_i`` of the
cross-attention input (norm2 output), for the cross-attention enhancement (see ``p3s.py``). ``gates`` holds
one zero-initialised gate per slot, the weight of the appended keys in the base's self-attention (the pack's
addition that makes the zero-initialised copy the identity, see ``GatedSelfAttention`` in ``p3s.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .attention_ops import host_attention
from .unet_layout import TransformerSlot, diffusion_model_of, transformer_slots


class CopyLayoutError(ValueError):
    """The base UNet cannot be turned into a P3S copy, or a copy file does not fit it."""


@dataclass(frozen=True)
class Stage:
    """One slot of the copy: resampling steps (+1 down, -1 up) before it, whether a ResNet block precedes it."""
    slot: TransformerSlot
    resample: tuple[int, ...]
    has_resblock: bool


def copy_stages(slots: list[TransformerSlot]) -> list[Stage]:
    stages, level, run = [], 0, None
    for slot in slots:
        steps = (1,) * (slot.level - level) if slot.level >= level else (-1,) * (level - slot.level)
        stages.append(Stage(slot, steps, (slot.block, slot.level) != run))
        run, level = (slot.block, slot.level), slot.level
    return stages


def layout_signature(model) -> list[list]:
    """JSON-able description of the slots a copy for ``model`` has (stored in the file's metadata)."""
    return [[s.block, s.block_id, s.block_index, s.level, s.channels, s.heads] for s in transformer_slots(model)]


def _narrow_inputs_(resblock, channels: int) -> None:
    """Keep the weights of a ResNet block that read its first ``channels`` inputs (see the module doc)."""
    import torch.nn as nn

    if resblock.channels == channels:
        return
    if resblock.channels < channels:
        raise CopyLayoutError(f"a ResNet block of the base reads {resblock.channels} channels, fewer than the "
                              f"{channels} the copy hands it")
    norm, conv = resblock.in_layers[0], resblock.in_layers[2]
    norm.weight = nn.Parameter(norm.weight.detach()[:channels].clone())
    norm.bias = nn.Parameter(norm.bias.detach()[:channels].clone())
    norm.num_channels = channels
    conv.weight = nn.Parameter(conv.weight.detach()[:, :channels].clone())
    conv.in_channels = channels
    skip = resblock.skip_connection
    if isinstance(skip, nn.Conv2d):
        skip.weight = nn.Parameter(skip.weight.detach()[:, :channels].clone())
        skip.in_channels = channels
    resblock.channels = channels


def _block_modules(unet, slot: TransformerSlot):
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    block = {"input": lambda: unet.input_blocks[slot.block_id], "middle": lambda: unet.middle_block,
             "output": lambda: unet.output_blocks[slot.block_id]}[slot.block]()
    resblock = next((m for m in block if isinstance(m, ResBlock)), None)
    transformer = next((m for m in block if isinstance(m, SpatialTransformer)), None)
    if transformer is None or resblock is None:
        raise CopyLayoutError(f"block {slot.name} lacks the ResNet block + spatial transformer of an SD1.5 UNet")
    if len(transformer.transformer_blocks) != 1:
        raise CopyLayoutError(f"block {slot.name} has {len(transformer.transformer_blocks)} transformer layers in "
                              "one spatial transformer; P3S supports SD1.5's one per block")
    return resblock, transformer


class InjectionCopy(torch.nn.Module):
    def __init__(self, base_model, latent_channels: int = 4):
        super().__init__()
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

        unet = diffusion_model_of(base_model)
        self.model_channels = unet.model_channels
        self.stages = copy_stages(transformer_slots(base_model))
        self.time_embed = copy.deepcopy(unet.time_embed)
        conv_in = copy.deepcopy(unet.input_blocks[0][0])
        if conv_in.in_channels < latent_channels:
            raise CopyLayoutError(f"the base's input convolution reads {conv_in.in_channels} channels")
        conv_in.weight = torch.nn.Parameter(conv_in.weight.detach()[:, :latent_channels].clone())
        conv_in.in_channels = latent_channels
        self.conv_in = conv_in
        downs = [m for block in unet.input_blocks for m in block if isinstance(m, Downsample)]
        ups = [m for block in unet.output_blocks for m in block if isinstance(m, Upsample)]
        levels = len(downs)
        self.resample, self.resblocks, self.transformers = (torch.nn.ModuleList() for _ in range(3))
        self.self_proj, self.cross_proj = torch.nn.ModuleList(), torch.nn.ModuleList()
        channels, level = self.model_channels, 0
        for stage in self.stages:
            steps = torch.nn.ModuleList()
            for step in stage.resample:
                if step > 0:
                    steps.append(copy.deepcopy(downs[level]))
                else:
                    steps.append(copy.deepcopy(ups[levels - level]))
                level += step
                if steps[-1].channels != channels:
                    raise CopyLayoutError(f"resampling before {stage.slot.name} works on {steps[-1].channels} "
                                          f"channels, the copy holds {channels}")
            self.resample.append(steps)
            resblock, transformer = _block_modules(unet, stage.slot)
            if stage.has_resblock:
                resblock = copy.deepcopy(resblock)
                _narrow_inputs_(resblock, channels)
                self.resblocks.append(resblock)
                channels = resblock.out_channels
            else:
                self.resblocks.append(torch.nn.Identity())
            if channels != stage.slot.channels:
                raise CopyLayoutError(f"slot {stage.slot.name} has {stage.slot.channels} channels, the copy "
                                      f"holds {channels}")
            self.transformers.append(copy.deepcopy(transformer))
            self.self_proj.append(_zero_linear(channels))
            self.cross_proj.append(_zero_linear(channels))
        self.gates = torch.nn.Parameter(torch.zeros(len(self.stages)))
        self.requires_grad_(False)

    @property
    def slots(self) -> list[TransformerSlot]:
        return [stage.slot for stage in self.stages]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                record_maps: dict | None = None) -> tuple[dict, dict]:
        """(``{slot key: f_i}``, ``{slot key: g_i}``), tokens [B, h*w, C], for the copy's input ``x``
        [B, 4, h, w] (the UNet's scaled noisy input plus the RNGR latent). ``record_maps``, when given, maps
        slot keys to a dict that receives this copy's cross-attention probabilities (for L_ac)."""
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        dtype = self.conv_in.weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(dtype))
        h = self.conv_in(x.to(dtype))
        sizes = {0: h.shape[-2:]}
        selfs, crosses = {}, {}
        level = 0
        for index, stage in enumerate(self.stages):
            for step, module in zip(stage.resample, self.resample[index]):
                level += step
                h = module(h) if step > 0 else module(h, output_shape=(*h.shape[:2], *sizes[level]))
                sizes.setdefault(level, h.shape[-2:])
            if stage.has_resblock:
                h = self.resblocks[index](h, emb)
            captured = {}
            options = {"block": stage.slot.key[:2], "patches": {
                "attn1_patch": [_capture(captured, "self")], "attn2_patch": [_capture(captured, "cross")]}}
            if record_maps is not None and stage.slot.key in record_maps:
                options["patches_replace"] = {"attn2": {stage.slot.key: MapRecorder(record_maps[stage.slot.key])}}
            h = self.transformers[index](h, context=context.to(dtype), transformer_options=options)
            selfs[stage.slot.key] = self.self_proj[index](captured["self"])
            crosses[stage.slot.key] = self.cross_proj[index](captured["cross"])
        return selfs, crosses


def _zero_linear(channels: int) -> torch.nn.Linear:
    linear = torch.nn.Linear(channels, channels)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    return linear


def _capture(store: dict, name: str):
    def patch(n, context, value, extra_options):
        store[name] = n
        return n, context, value
    return patch


class MapRecorder:
    """``patches_replace["attn2"]`` callable that keeps the layer's attention probabilities
    ``softmax(Q K^T / sqrt(d))`` [B, heads, Lq, Lk] under ``"map"`` of its store and otherwise runs the layer
    (or the replacement it chains) unchanged."""

    def __init__(self, store: dict, previous=None):
        self.store, self.previous = store, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        b, lq, inner = q.shape
        d = inner // heads
        qh = q.reshape(b, lq, heads, d).transpose(1, 2).float()
        kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
        self.store["map"] = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return host_attention(q, k, v, extra_options)
