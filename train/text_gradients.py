"""Gradients through ComfyUI's CLIP text encoder, for trainers whose trainable tokens enter the caption.

ComfyUI's ``CLIPLayer.forward`` adds its residuals in place (``x += self.self_attn(self.layer_norm1(x))``), which
autograd refuses: the layer norm's backward needs the ``x`` the addition overwrote. Inference never notices.
``enable_text_gradients`` gives each CLIPLayer *instance* of one CLIP object a forward that adds out of place —
the same two float additions, so the outputs are bit-identical (a test checks it against the stock forward) —
without touching ComfyUI's class; ``remove()`` restores them. Trainer processes only: nodes never see it.
"""
from __future__ import annotations


class OutOfPlaceResidual:
    """Stored as ``layer.forward``: CLIPLayer's forward with ``x = x + …`` instead of ``x += …``."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, mask=None, optimized_attention=None):
        layer = self.layer
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))


class TextGradientHandle:
    def __init__(self, layers):
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def enable_text_gradients(clip) -> TextGradientHandle:
    from comfy.clip_model import CLIPLayer

    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, CLIPLayer)]
    for layer in layers:
        layer.forward = OutOfPlaceResidual(layer)
    return TextGradientHandle(layers)
