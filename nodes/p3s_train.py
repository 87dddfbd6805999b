"""P3S Train Subject: python -m train.p3s inside ComfyUI, on the photo and the clicks wired into the node.

The node writes the photo (and the optional negatives mask / inpainted photo) with a one-row manifest into a
fresh folder under ComfyUI's temp directory, runs the shared engine's Trainer with ``train.p3s.P3SMethod`` (the
same code as the command line), and moves the export into ``models/p3s/<name>.safetensors`` atomically. ComfyUI
runs nodes under ``torch.inference_mode()``; training leaves it explicitly. The progress bar advances once per
optimizer step and the loss is printed to the console; ComfyUI's Cancel raises inside the bar's update at the
start of a step, which stops the run before that step with nothing written to models/p3s.
"""
from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import torch

from . import validation

CATEGORY = "subject_customization/p3s"
NODE = "P3S Train Subject"


def _save_png(pixels: torch.Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    array = (pixels.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(array).save(path)


class P3STrainSubject:
    DESCRIPTION = (
        "Trains a P3S subject (injection copy + RNGR encoder) on one photo: click the subject (positive points) "
        "and the look-alike to exclude (negative points); the look-alike is found with the point-to-mask helper "
        "and inpainted away (or give your own mask/inpainting). Same trainer as `python -m train.p3s`; the result "
        "goes to models/p3s and its name comes out for P3S Loader. Loads its own fp32 copy of the checkpoint.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("weights_name", "prompt")
    OUTPUT_TOOLTIPS = ("The file written to models/p3s (select it in P3S Loader after a refresh).",
                       "The training prompt with the identifier and class word.")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {
                    "tooltip": "The SD1.5 checkpoint to train on (the one you will generate with)."}),
                "clip_vision_name": (folder_paths.get_filename_list("clip_vision"), {
                    "tooltip": "CLIP ViT vision weights (the paper: CLIP ViT-L/14) for the mask and the RNGR."}),
                "image": ("IMAGE", {"tooltip": "The photo with the subject (first image used); points are in its "
                                               "pixels."}),
                "positive_points": ("STRING", {"multiline": True, "default": "", "tooltip":
                                    "Clicks on the subject: 'x,y; x,y' or points-editor JSON, in pixels."}),
                "negative_points": ("STRING", {"multiline": True, "default": "", "tooltip":
                                    "Clicks on the look-alike to remove (may be empty)."}),
                "class_word": ("STRING", {"default": "dog", "tooltip": "The subject's class (prompt: 'a photo of "
                                                                       "sks dog')."}),
                "identifier": ("STRING", {"default": "sks", "tooltip": "The rare token that names the subject."}),
                "name": ("STRING", {"default": "p3s_subject", "tooltip": "File name in models/p3s (no extension)."}),
                "epochs": ("INT", {"default": 60, "min": 1, "max": 100000, "tooltip":
                           "Passes over the photo (one step each at batch 1; the paper: 60 epochs)."}),
                "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1.0, "step": 1e-6,
                                            "round": False, "tooltip": "AdamW learning rate (paper 1e-5)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                               "Side of the square training crop."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seed of the training draws."}),
            },
            "optional": {
                "negatives_mask": ("MASK", {"tooltip": "A ready mask of what to remove (instead of negative "
                                                       "points)."}),
                "inpainted": ("IMAGE", {"tooltip": "Your own inpainting of the photo with the look-alike removed."}),
            },
        }

    def train(self, ckpt_name, clip_vision_name, image, positive_points, negative_points, class_word, identifier,
              name, epochs, learning_rate, resolution, seed, negatives_mask=None, inpainted=None):
        import folder_paths

        image = validation.image(image, "image", NODE)
        validation.float_widgets(type(self), NODE, learning_rate=learning_rate)
        height, width = image.shape[1:3]
        if not name or any(c in name for c in "/\\:") or name.startswith("."):
            raise validation.InputError(f"{NODE}: name {name!r} must be a plain file name (no folders)")
        if not class_word.strip():
            raise validation.InputError(f"{NODE}: class_word is empty; give the subject's class, e.g. dog")
        if resolution % 8:
            raise validation.InputError(f"{NODE}: resolution {resolution} must be a multiple of 8")
        work = Path(folder_paths.get_temp_directory()) / f"p3s_train_{uuid.uuid4().hex[:12]}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            row = {"image": "photo.png", "positive_points": positive_points, "negative_points": negative_points}
            _save_png(image[0], work / "photo.png")
            if negatives_mask is not None:
                mask = validation.mask(negatives_mask, "negatives_mask", NODE, images=image.shape[0])[0]
                if tuple(mask.shape) != (height, width):
                    raise validation.InputError(f"{NODE}: negatives_mask is {mask.shape[1]}x{mask.shape[0]} pixels "
                                                f"but the image is {width}x{height}")
                _save_png(mask[..., None].expand(-1, -1, 3), work / "negatives.png")
                row["negatives_mask"] = "negatives.png"
            if inpainted is not None:
                inpainted = validation.image(inpainted, "inpainted", NODE)
                if tuple(inpainted.shape[1:3]) != (height, width):
                    raise validation.InputError(f"{NODE}: inpainted is {inpainted.shape[2]}x{inpainted.shape[1]} "
                                                f"pixels but the image is {width}x{height}")
                _save_png(inpainted[0], work / "inpainted.png")
                row["inpainted"] = "inpainted.png"
            (work / "manifest.jsonl").write_text(json.dumps(row) + "\n")
            values = dict(base_checkpoint=folder_paths.get_full_path_or_raise("checkpoints", ckpt_name),
                          clip_vision=folder_paths.get_full_path_or_raise("clip_vision", clip_vision_name),
                          manifest=str(work / "manifest.jsonl"), output_dir=str(work / "run"), class_word=class_word,
                          identifier=identifier, epochs=epochs, learning_rate=learning_rate, resolution=resolution,
                          seed=seed, export_name=name, progress=False, resume="never", checkpoint_every=10 ** 9,
                          export_dtype="fp16")
            export = self._run(values)
            target = Path(folder_paths.get_folder_paths("p3s")[0]) / f"{name}.safetensors"
            _move_atomically(export, target)
            prompt = f"a photo of {identifier} {class_word}"
            return {"ui": {"text": [f"{target.name}: {epochs} epochs"]}, "result": (target.name, prompt)}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _run(values: dict) -> Path:
        import comfy.utils

        build_config, DistInfo, Trainer, P3SConfig, P3SMethod = _trainer_modules()

        config = build_config(P3SConfig, [(k, v, "P3S Train Subject") for k, v in values.items()])
        config.method = "p3s"
        progress = comfy.utils.ProgressBar(config.epochs)

        class NodeMethod(P3SMethod):
            def training_loss(self, batch, ctx, rng):
                progress.update_absolute(ctx.step, config.steps)  # Cancel raises here, before the step
                loss, metrics = super().training_loss(batch, ctx, rng)
                print(f"{NODE}: step {ctx.step + 1}/{config.steps} loss {float(loss.detach()):.4f}", file=sys.stderr)
                return loss, metrics

        device = _training_device()
        with torch.inference_mode(False), torch.enable_grad():
            trainer = Trainer(NodeMethod(config), DistInfo(device=device))
            trainer.prepare()
            progress.update_absolute(0, config.steps)
            trainer.train()
        progress.update_absolute(config.steps, config.steps)
        return Path(values["output_dir"]) / f"{values['export_name']}.safetensors"


def _trainer_modules():
    """The standalone trainer's classes, imported as the command line imports them (top-level ``train``).

    Inside ComfyUI the pack root is not on sys.path; it is appended *behind* everything, so ComfyUI's own
    modules (``nodes``) and site-packages keep winning. ``train`` reorders sys.path for standalone runs when it
    is imported (standalone.host.bootstrap); the server's order is put back right after."""
    pack_root = str(Path(__file__).resolve().parent.parent)
    saved = list(sys.path)
    try:
        if pack_root not in sys.path:
            sys.path.append(pack_root)
        from train.config import build_config
        from train.distributed import DistInfo
        from train.engine import Trainer
        from train.p3s import P3SConfig, P3SMethod
    finally:
        sys.path[:] = saved + ([pack_root] if pack_root not in saved else [])
    return build_config, DistInfo, Trainer, P3SConfig, P3SMethod


def _training_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def _move_atomically(source: Path, target: Path) -> None:
    from ..model_patches.weight_files import atomic_write

    with atomic_write(target) as tmp:
        shutil.copyfile(source, tmp)


NODE_CLASS_MAPPINGS = {"SC_P3STrainSubject": P3STrainSubject}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_P3STrainSubject": "P3S Train Subject"}
