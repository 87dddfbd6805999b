"""Randomness that does not depend on how the work is split: per-sample generators, and RNG state capture.

Every random draw a method makes for a training sample (noise, timestep, caption dropout, augmentation) comes
from that sample's own CPU generator, seeded by (seed, step, position of the sample in the global batch). The
draws are then the same whether the sample is computed by rank 0 of 1 or rank 1 of 2, in a micro-batch of 1
or of 8, in the first run or after a resume. Draws happen on the CPU (the CPU stream is identical on every
machine) and are moved to the device afterwards; for latent-sized tensors this costs little.

The global RNGs (torch, CUDA, numpy, python) are still captured into checkpoints and restored on resume, so
code that does use them (a library's own dropout, say) continues where it left off on each rank.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .distributed import mix_seed


class SampleRandom:
    """Draws for the samples of one micro-batch; each method returns a tensor with one row per sample."""

    def __init__(self, seed: int, step: int, positions: list[int], device, stream: str = "train"):
        self.positions = list(positions)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(mix_seed(seed, stream, step, j)) for j in self.positions]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw) -> torch.Tensor:
        return torch.stack([draw(g) for g in self.generators]).to(self.device)

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return self._stack(lambda g: torch.randn(shape, generator=g, dtype=dtype))

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return self._stack(lambda g: torch.rand(shape, generator=g, dtype=dtype))

    def randint(self, low: int, high: int, *shape) -> torch.Tensor:
        return self._stack(lambda g: torch.randint(low, high, shape, generator=g))

    def bernoulli(self, p: float) -> torch.Tensor:
        """A bool per sample, True with probability ``p``."""
        return self.rand() < p


def capture_rng_state() -> dict:
    """This process's global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value):
    # random.setstate needs tuples; a round trip through a checkpoint may hand back lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
