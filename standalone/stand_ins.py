"""Stand-ins for weights a workflow names but this machine lacks: the embedded tiny / random-weight models.

Used by the demo (when the user has no real weights) and by the workflow tests (always). A stand-in keeps the
architecture the loader expects, so the stock loaders and our nodes take the same code path as with real
weights; only the numbers are meaningless.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import tiny_models

# (node type, input name) -> model folder the file is looked up in
LOADER_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("SC_AnyLogoLoader", "weights_name"): "anylogo",
}


@dataclass
class Substitution:
    node_id: str
    node_type: str
    input_name: str
    wanted: str
    stand_in: str


def stand_in_file(folder: str, wanted: str, cache: Path | None = None) -> Path:
    """The stand-in for the file `wanted` of a model folder, built on first use into cache/folder/."""
    cache = Path(cache or tiny_models.default_cache_dir())
    lowered = wanted.lower()
    if folder == "checkpoints":
        inpainting = "inpaint" in lowered
        path = cache / folder / ("tiny_sd15_inpainting.safetensors" if inpainting else "tiny_sd15.safetensors")
        tiny_models.build_sd15_checkpoint(path, inpainting=inpainting)
        return path
    if folder == "clip_vision":
        kind = "dinov2_large" if "dino" in lowered else "clip_vit_l"
        path = cache / folder / f"random_{kind}.safetensors"
        tiny_models.build_full_layout_vision_file(path, kind)
        return path
    if folder == "anylogo":
        path = cache / folder / "random_anylogo_sd15_inpainting.safetensors"
        tiny_models.build_anylogo_weights(path, inpainting=True)
        return path
    if folder in EQDIFF_STAND_INS:
        return EQDIFF_STAND_INS[folder](cache)
    if folder in CUSTOMCONTRAST_STAND_INS:
        return CUSTOMCONTRAST_STAND_INS[folder](cache)
    if folder in P3S_STAND_INS:
        return P3S_STAND_INS[folder](cache)
    raise KeyError(f"no stand-in is known for the model folder {folder!r}")


def missing_weights(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(node id, node type, input name, file name) of every loader input whose file is not installed."""
    import folder_paths

    missing = []
    for node_id, node in prompt.items():
        for (node_type, input_name), folder in LOADER_INPUTS.items():
            if node["class_type"] == node_type and isinstance(node["inputs"].get(input_name), str):
                wanted = node["inputs"][input_name]
                if folder_paths.get_full_path(folder, wanted) is None:
                    missing.append((node_id, node_type, input_name, wanted))
    return missing


def substitute_stand_ins(prompt: dict, cache: Path | None = None) -> tuple[dict, list[Substitution]]:
    """A copy of prompt whose missing weights point at stand-ins (built on first use into cache)."""
    import folder_paths

    cache = Path(cache or tiny_models.default_cache_dir())
    prompt = {nid: {**node, "inputs": dict(node["inputs"])} for nid, node in prompt.items()}
    done = []
    for node_id, node_type, input_name, wanted in missing_weights(prompt):
        folder = LOADER_INPUTS[(node_type, input_name)]
        stand_in = stand_in_file(folder, wanted, cache).name
        folder_paths.add_model_folder_path(folder, str(cache / folder))
        prompt[node_id]["inputs"][input_name] = stand_in
        done.append(Substitution(node_id, node_type, input_name, wanted, stand_in))
    return prompt, done


# Widget values that only set how long a run takes. With stand-in models the pictures mean nothing, so the demo
# and the tests run the shipped graph with these capped: same nodes, links and every other value.
SPEED_CAPS = {("KSampler", "steps"): 3, ("KSamplerAdvanced", "steps"): 3, ("SC_AnyLogoApply", "subject_size"): 128}


def cap_for_stand_ins(prompt: dict) -> tuple[dict, list[str]]:
    """A copy of prompt with SPEED_CAPS applied, and a note per changed value."""
    prompt = {nid: {**node, "inputs": dict(node["inputs"])} for nid, node in prompt.items()}
    notes = []
    for node_id, node in prompt.items():
        for (node_type, input_name), cap in SPEED_CAPS.items():
            value = node["inputs"].get(input_name)
            if node["class_type"] == node_type and isinstance(value, int) and value > cap:
                node["inputs"][input_name] = cap
                notes.append(f"node {node_id} {node_type}.{input_name}: {value} -> {cap}")
    return prompt, notes


# ---- EqDiff: the three files a trained subject leaves (models/eqdiff, models/loras, models/embeddings) ---------
# Built from the tiny SD1.5 checkpoint in the formats the trainer exports (the pack's own save functions and key
# forms), with seeded random values: the stock LoRA loader and text encoder and EqDiff Loader/Apply take the same
# path as with a trained subject. An embedding is named in the prompt text (`embedding:NAME`), not by a loader
# input, so `prompt_embeddings` finds those names for the frontend's base directory.
LOADER_INPUTS.update({("SC_EqDiffLoader", "weights_name"): "eqdiff",
                      ("LoraLoaderModelOnly", "lora_name"): "loras",
                      ("SC_EqDiffTrainSubject", "ckpt_name"): "checkpoints"})
# the trainer node's run length; the stand-in checkpoint makes its result meaningless anyway
SPEED_CAPS.update({("SC_EqDiffTrainSubject", "steps"): 2, ("SC_EqDiffTrainSubject", "resolution"): 64,
                   ("SC_EqDiffTrainSubject", "num_class_images"): 1,
                   ("SC_EqDiffTrainSubject", "class_image_steps"): 1, ("SC_EqDiffApply", "reference_size"): 128})


def _tiny_sd15(cache: Path) -> Path:
    return tiny_models.build_sd15_checkpoint(cache / "checkpoints" / "tiny_sd15.safetensors")


def _eqdiff_stand_in(cache: Path) -> Path:
    path = cache / "eqdiff" / "random_eqdiff_sd15.safetensors"
    if not path.exists():
        import comfy.sd

        from .tiny_eqdiff import build_eqdiff_weights

        model = comfy.sd.load_checkpoint_guess_config(str(_tiny_sd15(cache)), output_vae=False,
                                                      output_clip=False)[0]
        build_eqdiff_weights(path, model)
    return path


def _eqdiff_kv_stand_in(cache: Path, seed: int = 0) -> Path:
    """K/V weight differences under the exported keys (diffusion_model.….attn2.to_k/to_v.diff)."""
    path = cache / "loras" / "random_eqdiff_kv.safetensors"
    if not path.exists():
        import safetensors
        import torch

        from model_patches.custom_diffusion import diff_key
        from model_patches.weight_files import save_weights

        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        with safetensors.safe_open(str(_tiny_sd15(cache)), framework="pt") as f:
            for key in sorted(f.keys()):
                if key.startswith("model.diffusion_model.") and (key.endswith(".attn2.to_k.weight")
                                                                  or key.endswith(".attn2.to_v.weight")):
                    shape = f.get_slice(key).get_shape()
                    tensors[diff_key(key[len("model."):])] = torch.randn(shape, generator=generator) * 0.01
        save_weights(path, tensors, {"method": "eqdiff-kv", "loader": "LoraLoaderModelOnly",
                                     "tiny_model": "random-eqdiff-kv"})
    return path


def _eqdiff_embedding_stand_in(cache: Path, seed: int = 0) -> Path:
    """A stock textual-inversion file {"clip_l": [1, 768]} (the summed token S*_LF + S*_HF)."""
    path = cache / "embeddings" / "random_eqdiff_embedding.safetensors"
    if not path.exists():
        import torch

        from model_patches.weight_files import save_weights

        vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(seed)) * 0.02
        save_weights(path, {"clip_l": vector}, {"method": "eqdiff-embedding", "band": "original",
                                                "tiny_model": "random-eqdiff-embedding"})
    return path


EQDIFF_STAND_INS = {"eqdiff": _eqdiff_stand_in, "loras": _eqdiff_kv_stand_in,
                    "embeddings": _eqdiff_embedding_stand_in}
EMBEDDING_IN_TEXT = re.compile(r"embedding:([A-Za-z0-9_.-]+)")


def prompt_embeddings(prompt: dict) -> set[tuple[str, str]]:
    """("embeddings", file name) of every `embedding:NAME` in a CLIPTextEncode text of the prompt."""
    return {("embeddings", name if name.endswith(".safetensors") else f"{name}.safetensors")
            for node in prompt.values() if node["class_type"] == "CLIPTextEncode"
            and isinstance(node["inputs"].get("text"), str)
            for name in EMBEDDING_IN_TEXT.findall(node["inputs"]["text"])}


# ---- CustomContrast: the MFI encoder + K_v/V_v file (models/customcontrast) -------------------------------------
# Built for the tiny SD1.5 checkpoint's cross-attention layers over the full-layout CLIP ViT-L stand-in's layers
# 8, 16, 24 (the trainer's default "thirds", 1024 wide each), in the format the trainer exports, seeded random.
LOADER_INPUTS.update({("SC_CustomContrastLoader", "weights_name"): "customcontrast"})


def _customcontrast_stand_in(cache: Path) -> Path:
    path = cache / "customcontrast" / "random_customcontrast_sd15.safetensors"
    if not path.exists():
        import comfy.sd

        model = comfy.sd.load_checkpoint_guess_config(str(_tiny_sd15(cache)), output_vae=False,
                                                      output_clip=False)[0]
        tiny_models.build_customcontrast_weights(path, model, image_layers=(8, 16, 24), vision_width=1024)
    return path


CUSTOMCONTRAST_STAND_INS = {"customcontrast": _customcontrast_stand_in}


# ---- P3S: a trained subject file (models/p3s) and the trainer node's run length ------------------------------
# The stand-in is built for the tiny SD1.5 checkpoint in the trainer's export format (the pack's own export and
# save functions), with seeded random projections and gates so the injection visibly acts, an RNGR encoder for
# the stand-in CLIP ViT-L (width 1024) and a random stored reference: P3S Loader/Apply take the trained path.
LOADER_INPUTS.update({("SC_P3SLoader", "weights_name"): "p3s",
                      ("SC_P3STrainSubject", "ckpt_name"): "checkpoints",
                      ("SC_P3STrainSubject", "clip_vision_name"): "clip_vision"})
SPEED_CAPS.update({("SC_P3STrainSubject", "epochs"): 2, ("SC_P3STrainSubject", "resolution"): 64})


def _p3s_stand_in(cache: Path, seed: int = 0) -> Path:
    path = cache / "p3s" / "random_p3s_sd15.safetensors"
    if not path.exists():
        import comfy.sd
        import torch

        from model_patches.p3s_copy import InjectionCopy, layout_signature
        from model_patches.p3s_rngr import RNGREncoder
        from model_patches.p3s_weights import export_tensors, save_p3s_weights
        from model_patches.unet_layout import ARCHITECTURES

        model = comfy.sd.load_checkpoint_guess_config(str(_tiny_sd15(cache)), output_vae=False,
                                                      output_clip=False)[0]
        copy = InjectionCopy(model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for proj in (*copy.self_proj, *copy.cross_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * 0.05)
            copy.gates.copy_(0.5 + torch.rand(copy.gates.shape, generator=generator))
        width = 1024  # the stand-in CLIP ViT-L's hidden width, so a wired reference also fits
        tensors = export_tensors(copy, RNGREncoder(clip_width=width), torch.randn(1, 4, 8, 8, generator=generator),
                                 torch.randn(1, 257, width, generator=generator))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_p3s_weights(path, tensors, {
            "base_architecture": ARCHITECTURES[4], "copy_layout": layout_signature(model), "lambda": 0.2,
            "resolution": 64, "clip_size": 224, "clip_width": width, "identifier": "sks", "class_word": "badge",
            "prompt": "a photo of sks badge", "tiny_model": "random-p3s"})
    return path


P3S_STAND_INS = {"p3s": _p3s_stand_in}
