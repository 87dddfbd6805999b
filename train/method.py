"""What a training method provides to the engine, and what the engine hands it (see train/engine.py)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base_model import LoadedBase
from .config import TrainConfig
from .distributed import DistInfo
from .manifest import ManifestSchema


@dataclass
class TrainContext:
    """Shared state of one training run; the same object is passed to every hook."""

    config: TrainConfig
    dist: DistInfo
    base: LoadedBase
    output_dir: Path
    method_name: str
    format_version: int
    step: int = 0                      # optimizer steps completed so far
    extras: dict = field(default_factory=dict)  # free room for a method's per-run objects

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        """bf16 autocast on CUDA when mixed_precision is "bf16"; a no-op on the CPU (fp32 there)."""
        if self.device.type == "cuda" and self.config.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def export_metadata(self, **extra) -> dict:
        """The metadata every export carries, plus the method's own keys."""
        return {"method": self.method_name, "format_version": str(self.format_version),
                "base_architecture": self.base.architecture, "base_hash": f"sha256:{self.base.sha256}",
                "base_name": self.base.path.name, "trained_steps": str(self.step),
                "config": json.dumps(self.config.to_dict(), sort_keys=True), **extra}

    def save_export(self, path, tensors: dict[str, torch.Tensor], **extra_metadata) -> Path:
        """Write an export atomically (temporary file, then rename) with the standard metadata."""
        from model_patches.weight_files import save_weights

        return save_weights(path, tensors, self.export_metadata(**extra_metadata))


def default_collate(items: list[dict]) -> dict:
    """Stack tensors of equal shape per key; everything else becomes a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class TrainingMethod:
    """Base class of a method; override the hooks marked *required*. Instantiated once per run with its config.

    ``name``/``format_version`` go into export metadata; ``config_class`` is the method's TrainConfig subclass;
    ``manifest_schema`` validates the rows; ``folder_layout`` (optional) lets ``train.prepare_manifest`` build a
    manifest from a folder.
    """

    name: str = ""
    format_version: int = 1
    config_class: type[TrainConfig] = TrainConfig
    manifest_schema: ManifestSchema = ManifestSchema(fields={})
    folder_layout = None

    def __init__(self, config: TrainConfig):
        self.config = config

    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        """*Required.* Create/attach trainable modules on the base model (``ctx.base``); return the trainable
        parameters by stable name (the names key the checkpoints). The engine sets requires_grad on them and
        copies rank 0's values to all ranks."""
        raise NotImplementedError

    def make_dataset(self, rows: list[dict], ctx: TrainContext):
        """*Required.* A map-style dataset over the validated manifest rows; ``dataset[i]`` must be a pure
        function of ``i`` (random draws belong in ``training_loss``). Items are dicts (see ``collate``)."""
        raise NotImplementedError

    def collate(self, items: list[dict]):
        return default_collate(items)

    def sample_weights(self, dataset, ctx: TrainContext):
        """Optional: a relative weight per dataset index. The global order then draws each epoch's
        ``len(dataset)`` samples with replacement in proportion (seeded, independent of the process split);
        None (the default) visits every row once per epoch."""
        return None

    def sample_stream(self, dataset, ctx: TrainContext):
        """Optional: an object with ``index_at(position) -> dataset index`` (a pure function of the stream
        position) and ``check_split(batch_size, samples_per_micro_step)`` (raises ValueError for a split it cannot
        serve), used instead of the shuffle; None (the default) keeps the engine's order."""
        return None

    def training_loss(self, batch, ctx: TrainContext, rng) -> tuple[torch.Tensor, dict[str, float]]:
        """*Required.* The mean loss over the micro-batch and metrics to log (the same keys on every call and
        every rank). Draw all randomness from ``rng`` (a ``train.randomness.SampleRandom``, one generator per
        sample). Runs under ``ctx.autocast()``; the engine does backward, reduction, clipping and the step."""
        raise NotImplementedError

    def validation_samples(self, ctx: TrainContext, step: int, generator: torch.Generator):
        """Optional: ``[(name, image)]`` with image ``[H, W, 3]`` or ``[3, H, W]`` in 0..1, made under no_grad on
        the first process. ``generator`` is seeded with ``validation_seed`` afresh at every interval."""
        return []

    def export(self, path: Path, ctx: TrainContext) -> Path:
        """*Required.* Write the file the nodes load (use ``ctx.save_export`` for metadata and atomicity)."""
        raise NotImplementedError
