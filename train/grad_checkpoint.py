"""Gradient checkpointing for a ComfyUI UNet, without touching ComfyUI's classes.

ComfyUI's UNet has no switch for it: ``ResBlock`` only knows the legacy re-entrant ``CheckpointFunction`` and
``BasicTransformerBlock`` ignores its ``checkpoint`` argument, and no ``transformer_options`` patch point wraps a
whole block. So this trainer-only helper sets an *instance* attribute ``forward`` on each ResBlock and each
BasicTransformerBlock of the model being trained: a ``CheckpointedForward`` that calls the class's own forward
through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. Classes, other instances and state-dict
keys are unchanged (the parameters stay where they are, so exported key names and ComfyUI patches still match),
and ``handle.remove()`` deletes the attributes again. It is only ever installed by the trainer process on the
model it owns; nodes never see it.

Two consequences for methods, because a checkpointed block runs its forward again during backward:
* ``transformer_options`` is mutated by the UNet as it walks the blocks (``block``, ``block_index``,
  ``transformer_index``), so each block keeps a shallow copy taken at forward time and replays with it;
* attention patches inside a block (``attn1_patch``, ``patches_replace``…) run again in backward with the same
  inputs: they must be pure functions of their inputs, or tolerate a replay (a bank that records states writes
  the same values twice; a bank that is read must still hold them when backward runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint


class CheckpointedForward:
    """Callable stored as ``module.forward``: the module's class forward, recomputed in backward."""

    def __init__(self, module: torch.nn.Module):
        self.inner = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        if isinstance(kwargs.get("transformer_options"), dict):
            kwargs["transformer_options"] = dict(kwargs["transformer_options"])
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@dataclass
class CheckpointingHandle:
    modules: list = field(default_factory=list)

    def remove(self) -> None:
        for m in self.modules:
            if isinstance(m.__dict__.get("forward"), CheckpointedForward):
                del m.forward
        self.modules.clear()


def checkpointed_block_types() -> tuple[type, ...]:
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return (ResBlock, BasicTransformerBlock)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> CheckpointingHandle:
    """Checkpoint every ResBlock and BasicTransformerBlock of ``unet``; returns a handle to undo it."""
    kinds = checkpointed_block_types()
    handle = CheckpointingHandle()
    for module in unet.modules():
        if isinstance(module, kinds) and not isinstance(module.__dict__.get("forward"), CheckpointedForward):
            module.forward = CheckpointedForward(module)
            handle.modules.append(module)
    if not handle.modules:
        raise ValueError(f"{type(unet).__name__} has no ResBlock or BasicTransformerBlock to checkpoint")
    return handle
