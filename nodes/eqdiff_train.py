"""EqDiff Train Subject: the trainer of ``python -m train.eqdiff`` inside ComfyUI, on images wired into it."""
from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import validation

NODE = "EqDiff Train Subject"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _trainer():
    """train.eqdiff_subject from this pack. The trainers import the pack's packages by their top-level names
    (they run standalone), so the pack root joins sys.path *behind* ComfyUI's own modules, never in front."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.append(str(root))
    module = importlib.import_module("train.eqdiff_subject")
    if not Path(module.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"{NODE}: 'train' resolves to {module.__file__}, not this pack's trainers; another "
                           "package named 'train' shadows it")
    return module


class EqDiffTrainSubject:
    DESCRIPTION = (
        "Trains EqDiff on 3-5 photos of one subject (official defaults: 600 steps, batch 2 + 2 class images, band "
        "tokens drawn 0.1/0.1/0.8, mask-guided noising, residual reference attention) and writes three things: "
        "models/embeddings/<name> (+ _low, _high) for 'embedding:<name>' in CLIPTextEncode, "
        "models/loras/<name>_kv for LoraLoaderModelOnly, and models/eqdiff/<name> for EqDiff Loader. Class images "
        "missing from output/eqdiff_class_images/<class>_<size> are generated first with the checkpoint. Cancel "
        "stops cleanly: nothing is written into the model folders before the last step. The trainer loads its "
        "own fp32 copy of the checkpoint (the MODEL of your graph is not touched).")
    CATEGORY = "subject_customization/eqdiff"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("eqdiff_name", "embedding_name", "lora_name")
    OUTPUT_TOOLTIPS = ("File name in models/eqdiff, for EqDiff Loader.",
                       "Write embedding:<this> in the prompt (the _low / _high variants hold one band).",
                       "File name in models/loras, for LoraLoaderModelOnly.")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {
                    "tooltip": "The SD1.5 checkpoint to train on (and to sample with later)."}),
                "images": ("IMAGE", {"tooltip": "3-5 photos of the subject (a batch; centre-cropped square)."}),
                "class_word": ("STRING", {"default": "cat", "tooltip":
                               "The subject's class in one word (prompt 'photo of a sks <class>', class images, "
                               "token initialisation)."}),
                "name": ("STRING", {"default": "my_subject", "tooltip":
                         "Name of the files and of the embedding (letters, digits, _ and -)."}),
                "steps": ("INT", {"default": 600, "min": 1, "max": 100000, "tooltip": "Optimizer steps (600)."}),
                "learning_rate": ("FLOAT", {"default": 4e-5, "min": 0.0, "max": 1e-2, "step": 1e-6, "tooltip":
                                  "AdamW learning rate (official 1e-5 scaled to 4e-5)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip":
                               "Training side in pixels."}),
                "num_class_images": ("INT", {"default": 200, "min": 1, "max": 10000, "tooltip":
                                     "Class images for prior preservation (generated when missing)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                         "Seed of the data order and every training draw."}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "Subject masks, one per photo (same size). Without them the whole "
                                              "photo trains, background included."}),
                "placeholder": ("STRING", {"default": "sks", "tooltip": "Rare one-token word for the subject in "
                                                                       "the training prompt."}),
                "class_image_steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip":
                                      "Sampling steps of each generated class image."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace files of the same name."}),
            },
        }

    def train(self, ckpt_name, images, class_word, name, steps, learning_rate, resolution, num_class_images, seed,
              masks=None, placeholder="sks", class_image_steps=25, overwrite=False):
        import comfy.model_management
        import comfy.utils
        import folder_paths

        images = validation.image(images, "images", NODE)
        if masks is not None:
            masks = validation.mask(masks, "masks", NODE, images=images.shape[0], of="image")
            if tuple(masks.shape[1:]) != tuple(images.shape[1:3]):
                raise validation.InputError(f"{NODE}: masks are {masks.shape[2]}x{masks.shape[1]} but the images "
                                            f"{images.shape[2]}x{images.shape[1]}; give masks of the images' size")
            for i, mask in enumerate(masks):
                if not bool((mask > 0.5).any()):
                    raise validation.InputError(f"{NODE}: mask {i} is empty; every photo needs subject pixels")
        validation.float_widgets(type(self), NODE, learning_rate=learning_rate)
        if not class_word.strip() or len(class_word.split()) != 1:
            raise validation.InputError(f"{NODE}: class_word is {class_word!r}; expected one word, e.g. 'cat'")
        if not NAME_PATTERN.match(name):
            raise validation.InputError(f"{NODE}: name {name!r} must be letters, digits, _ or - (up to 64)")
        folders = {kind: Path(folder_paths.get_folder_paths(kind)[0]) for kind in ("eqdiff", "embeddings", "loras")}
        existing = [str(p) for p in (folders["eqdiff"] / f"{name}.safetensors",
                                     folders["embeddings"] / f"{name}.safetensors",
                                     folders["loras"] / f"{name}_kv.safetensors") if p.exists()]
        if existing and not overwrite:
            raise validation.InputError(f"{NODE}: {existing[0]} exists; choose another name or turn overwrite on")
        trainer = _trainer()
        settings = {"class_word": class_word.strip(), "placeholder": placeholder.strip(), "steps": steps,
                    "learning_rate": float(learning_rate), "resolution": resolution,
                    "num_class_images": num_class_images, "seed": seed, "prior_steps": class_image_steps,
                    "prior_dir": str(Path(folder_paths.get_output_directory()) / "eqdiff_class_images" /
                                     f"{class_word.strip()}_{resolution}")}
        bar = comfy.utils.ProgressBar(steps)

        def on_loss(step, loss):
            # ComfyUI's Cancel: the stop point is here, before the step is applied
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(step, steps)
            logging.info(f"{NODE} {name}: step {step}/{steps} loss {loss:.4f}")

        # ComfyUI removes its temp folder at start-up and recreates it only when a preview is saved
        temp = Path(folder_paths.get_temp_directory())
        temp.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"eqdiff_{name}_", dir=temp))
        try:
            # ComfyUI runs nodes under inference_mode; training needs autograd back
            with torch.inference_mode(False), torch.enable_grad():
                files = trainer.train_subject(
                    base_checkpoint=folder_paths.get_full_path_or_raise("checkpoints", ckpt_name),
                    images=images.clone(), masks=None if masks is None else masks.clone(), run_dir=run_dir,
                    folders=folders, name=name, settings=settings,
                    device=comfy.model_management.get_torch_device(), on_loss=on_loss)
        except trainer.USER_ERRORS as e:
            raise validation.InputError(f"{NODE}: {e}") from None
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return {"ui": {"text": [f"embedding:{files.embedding}", files.lora, files.eqdiff]},
                "result": (files.eqdiff, files.embedding, files.lora)}


NODE_CLASS_MAPPINGS = {"SC_EqDiffTrainSubject": EqDiffTrainSubject}
NODE_DISPLAY_NAME_MAPPINGS = {"SC_EqDiffTrainSubject": "EqDiff Train Subject"}
