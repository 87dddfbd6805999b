"""A random-weight EqDiff file for the tiny SD1.5 checkpoint (tests and the demo): the RRA layers of the model
with their reference projections copied from the layers and a seeded nonzero fusion head, so applying it
changes the output. It proves loading and the sampling path, not what trained weights do."""
from __future__ import annotations

from pathlib import Path

import torch


def build_eqdiff_weights(path: Path | str, model_patcher, *, seed: int = 0, scale: float = 0.05) -> Path:
    from model_patches.eqdiff import save_eqdiff_weights
    from model_patches.eqdiff_rra import RRAModules, rra_slots

    path = Path(path)
    slots = rra_slots(model_patcher)
    modules = RRAModules.for_model(model_patcher, slots)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            module.fusion.weight.copy_(torch.randn(module.fusion.weight.shape, generator=generator) * scale)
            module.fusion.bias.copy_(torch.randn(module.fusion.bias.shape, generator=generator) * scale + 0.3)
    return save_eqdiff_weights(path, modules, slots, {"tiny_model": "random-eqdiff", "embedding": "tiny_subject",
                                                      "lora": "tiny_subject_kv.safetensors", "class_word": "cat"})
