"""The EqDiff trainer run inside ComfyUI (the EqDiff Train Subject node): the same engine and method as
``python -m train.eqdiff``, on images handed over as tensors, with a per-step callback, then the five exports
installed into ComfyUI's model folders.

Nothing reaches a model folder before training has finished: the run writes into its own folder, and the files
are copied (each atomically, the models/eqdiff file last) only after the last step. An interrupt (the callback
raising ComfyUI's InterruptProcessingException) therefore leaves the model folders as they were.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError, build_config
from .distributed import DistInfo
from .engine import Trainer
from .eqdiff import EqDiffConfig, EqDiffMethod, export_paths


@dataclass
class InstalledFiles:
    eqdiff: str        # file name in models/eqdiff
    embedding: str     # name to write as embedding:<name>
    lora: str          # file name in models/loras


class _CallbackMethod(EqDiffMethod):
    """EqDiffMethod that reports each loss to ``on_loss`` (which may raise to stop the run before the step)."""

    on_loss: Callable[[int, float], None] | None = None

    def training_loss(self, batch, ctx, rng):
        loss, metrics = super().training_loss(batch, ctx, rng)
        if self.on_loss is not None:
            self.on_loss(ctx.step + 1, float(loss.detach()))
        return loss, metrics


def write_subject_folder(folder: Path, images: torch.Tensor, masks: torch.Tensor | None) -> Path:
    """PNG files of [B, H, W, 3] images (+ [B|1, H, W] masks) and their manifest; returns the manifest path."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        path = folder / f"subject_{i:03d}.png"
        Image.fromarray((image.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)
        row = {"image": path.name}
        if masks is not None:
            mask = masks[i if masks.shape[0] > 1 else 0]
            mask_path = folder / f"subject_{i:03d}_mask.png"
            Image.fromarray(((mask.float() > 0.5).cpu().numpy() * 255).astype(np.uint8)).save(mask_path)
            row["mask"] = mask_path.name
        rows.append(row)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def install(paths: dict[str, Path], folders: dict[str, Path], name: str) -> InstalledFiles:
    from model_patches.weight_files import atomic_write

    targets = {"embedding": folders["embeddings"] / f"{name}.safetensors",
               "embedding_low": folders["embeddings"] / f"{name}_low.safetensors",
               "embedding_high": folders["embeddings"] / f"{name}_high.safetensors",
               "lora": folders["loras"] / f"{name}_kv.safetensors",
               "eqdiff": folders["eqdiff"] / f"{name}.safetensors"}
    for key in ("embedding", "embedding_low", "embedding_high", "lora", "eqdiff"):  # the RRA file last
        with atomic_write(targets[key]) as tmp:
            shutil.copyfile(paths[key], tmp)
    return InstalledFiles(targets["eqdiff"].name, name, targets["lora"].name)


def train_subject(*, base_checkpoint: str, images: torch.Tensor, masks: torch.Tensor | None, run_dir: Path,
                  folders: dict[str, Path], name: str, settings: dict, device: torch.device,
                  on_loss: Callable[[int, float], None] | None = None) -> InstalledFiles:
    """Train one subject and install its files; ``settings`` are EqDiffConfig fields (class_word, steps, …)."""
    manifest = write_subject_folder(run_dir / "subject", images, masks)
    values = {"base_checkpoint": base_checkpoint, "manifest": str(manifest), "output_dir": str(run_dir / "run"),
              "export_name": name, "progress": False, "resume": "never", "method": "eqdiff", **settings}
    config = build_config(EqDiffConfig, [(k, v, "node input") for k, v in values.items()])
    method = _CallbackMethod(config)
    method.on_loss = on_loss
    trainer = Trainer(method, DistInfo(device=device))
    trainer.prepare()
    trainer.train()
    return install(export_paths(Path(config.output_dir) / f"{name}.safetensors"), folders, name)


from .base_model import BaseModelError  # noqa: E402
from .manifest import ManifestError  # noqa: E402

USER_ERRORS = (ConfigError, ManifestError, BaseModelError)  # what the node shows as a bad input
