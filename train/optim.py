"""AdamW and the learning-rate schedule (linear warm-up, then constant, linear or cosine decay to 0)."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of learning_rate for the update that completes optimizer step ``step + 1``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig):
    """(optimizer, scheduler). Both are stepped once per optimizer step; their states go into checkpoints."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    # a plain closure, not a callable object: LambdaLR would save an object's attributes into the checkpoint and
    # restore them on resume, overriding a changed `steps` when a run is extended
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler
