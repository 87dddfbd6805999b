"""What the pack's vision encoders are checked against: ComfyUI's own forward of a CLIP_VISION model, the
reference DINOv2 position-embedding rule written out independently, and a counter of block forward calls.

Used by the tests and the encoder benchmark; nothing here is used by the nodes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def comfy_pixel_values(clip_vision, images_bchw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own preprocessing (8-bit quantisation, normalisation) of square images, at their own size."""
    import comfy.clip_vision

    return comfy.clip_vision.clip_preprocess(images_bchw.movedim(1, -1), size=images_bchw.shape[-1],
                                             mean=clip_vision.image_mean, std=clip_vision.image_std).float()


@torch.no_grad()
def direct_layer(clip_vision, images_bchw: torch.Tensor, layer: int) -> torch.Tensor:
    """ComfyUI's forward, one layer per call: ``model(pixel_values, intermediate_output=layer-1)[1]``."""
    return clip_vision.model(pixel_values=comfy_pixel_values(clip_vision, images_bchw),
                             intermediate_output=layer - 1)[1]


@torch.no_grad()
def reference_dinov2_states(clip_vision, images_bchw: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """DINOv2 at any square size by the reference rule: the patch position embeddings (a side x side grid, 37x37
    for the 518-px models) resized bicubically, no antialias, with scale factor (grid + 0.1) / side; the class
    position kept; then the blocks one by one."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    model = clip_vision.model
    emb = model.embeddings
    patches = emb.patch_embeddings(comfy_pixel_values(clip_vision, images_bchw))
    pos = emb.position_embeddings
    side, dim = math.isqrt(pos.shape[1] - 1), pos.shape[-1]
    grid = images_bchw.shape[-1] // emb.patch_embeddings.projection.kernel_size[0]
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                              scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), antialias=False)
    if patch_pos.shape[-2:] != (grid, grid):
        raise AssertionError(f"reference interpolation gave {tuple(patch_pos.shape[-2:])}, not {(grid, grid)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    x = torch.cat([emb.cls_token.expand(len(patches), -1, -1), patches], 1) + torch.cat([pos[:, :1], patch_pos], 1)
    attention = optimized_attention_for_device(x.device, False, small_input=True)
    out = {}
    for index, block in enumerate(model.encoder.layer, start=1):
        x = block(x, attention)
        out[index] = x.clone()
    return {layer: out[layer] for layer in layers}


class BlockCalls:
    """Context manager counting forward calls of each transformer block and of the patch embedding."""

    def __init__(self, clip_vision):
        model = clip_vision.model
        if hasattr(model, "encoder"):  # DINOv2
            blocks, patch = model.encoder.layer, model.embeddings.patch_embeddings
        else:
            blocks, patch = model.vision_model.encoder.layers, model.vision_model.embeddings.patch_embedding
        self.blocks = [0] * len(blocks)
        self.embeddings = 0
        self._handles = [block.register_forward_hook(lambda *_, i=i: self._count(i))
                         for i, block in enumerate(blocks)]
        self._handles.append(patch.register_forward_hook(lambda *_: self._embed()))

    def _count(self, index):
        self.blocks[index] += 1

    def _embed(self):
        self.embeddings += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
