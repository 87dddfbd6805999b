"""How far the convolutions alone carry content to each transformer layer of a micro UNet: measured, not derived.

A layer's self-attention can copy from anywhere, but it is only *needed* for a copy when the convolutions cannot
bring the source to the target: if every layer already sees the whole scene through its convolutions, a copy task
is solved without content-matching attention, and nothing teaches the attention to be selective. The reach is
measured by autograd on the real ``UNetModel``, with the two things that mix positions globally switched off:

* every self-attention is replaced (through ComfyUI's own ``patches_replace["attn1"]``) by its values, so each
  position keeps its own (the cross-attention reads one all-zero context token: position-wise);
* every GroupNorm keeps its affine map and drops its statistics (a forward hook), since its mean and variance
  over the feature map are a weak global path, not a convolution's reach.

The reach of a layer is then the exact support of the gradient of one query (at the centre of that layer's token
grid) with respect to the input latent: the side of the square of input cells that can change it.
"""
from __future__ import annotations

import math

import torch

from model_patches.unet_layout import transformer_slots


def _affine_only(module, inputs, output):
    weight = module.weight.view(1, -1, *([1] * (inputs[0].dim() - 2)))
    bias = module.bias.view(1, -1, *([1] * (inputs[0].dim() - 2)))
    return inputs[0] * weight + bias


def convolution_reach(model, size: int, *, timestep: float = 500.0) -> dict:
    """{slot name: side (in input latent cells) of the square that one centre query of that layer can see
    through the convolutions alone, and "output": the same for the UNet's prediction at the centre}, for a
    ``size`` x ``size`` input (large enough not to clip the reach)."""
    unet = model.diffusion_model
    slots = transformer_slots(model)
    captured = {}

    def keep_own_value(q, k, v, extra_options):  # each position keeps its own value: no mixing across positions
        key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
        captured[key] = q
        return v

    options = {"patches_replace": {"attn1": {slot.key: keep_own_value for slot in slots}}}
    hooks = [m.register_forward_hook(_affine_only) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        x = torch.zeros(1, unet.input_blocks[0][0].in_channels, size, size, requires_grad=True)
        context = torch.zeros(1, 1, int(model.model_config.unet_config["context_dim"]))
        out = unet(x, timesteps=torch.tensor([timestep]), context=context, transformer_options=options)
        reach = {}
        gen = torch.Generator().manual_seed(0)
        reads = {slot.name: captured[slot.key][0] for slot in slots}
        reads["output"] = out[0].flatten(1).T                            # [cells, channels]
        for name, q in reads.items():
            side = int(round(math.sqrt(q.shape[0])))
            centre = (side // 2) * side + side // 2
            direction = torch.randn(q.shape[1], generator=gen)           # a random read-out: no cancellation
            grad, = torch.autograd.grad(q[centre] @ direction, x, retain_graph=True)
            support = grad[0].abs().sum(dim=0) > 0
            rows, cols = support.any(dim=1).nonzero(), support.any(dim=0).nonzero()
            reach[name] = int(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
        return reach
    finally:
        for hook in hooks:
            hook.remove()
