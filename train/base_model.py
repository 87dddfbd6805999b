"""The base checkpoint, loaded by ComfyUI itself so trainers use the very modules the nodes patch.

``load_base`` goes through ``comfy.sd.load_checkpoint_guess_config`` (the loader behind CheckpointLoaderSimple)
with fp32 UNet weights, the trainer's master copy; on CUDA, bf16 autocast does the compute. Everything is
frozen on return: a method decides what trains. The UNet's parameter names are ComfyUI's
(``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``), the same names ComfyUI's
LoRA/"diff" loader and our model patches address.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model_patches.unet_layout import ARCHITECTURES


class BaseModelError(ValueError):
    """The base checkpoint is missing, unreadable or not an SD1.5-architecture model."""


@dataclass
class LoadedBase:
    path: Path
    patcher: object              # comfy.model_patcher.ModelPatcher (the MODEL type of the nodes)
    clip: object | None          # comfy.sd.CLIP
    vae: object | None           # comfy.sd.VAE
    architecture: str            # "sd15" | "sd15-inpainting"
    sha256: str = ""             # hex digest of the checkpoint file ("" when not computed)

    @property
    def model(self):
        """comfy.model_base.BaseModel: ``apply_model``, ``model_sampling``, ``process_latent_in``."""
        return self.patcher.model

    @property
    def unet(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def in_channels(self) -> int:
        return int(self.model.model_config.unet_config["in_channels"])


def file_sha256(path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_base(path, device, *, compute_hash: bool = True) -> LoadedBase:
    """UNet (fp32, on ``device``), CLIP and VAE of an SD1.5-architecture checkpoint, all frozen."""
    import comfy.sd
    import comfy.supported_models

    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"base checkpoint not found: {path}")
    try:
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, model_options={"dtype": torch.float32})
    except Exception as e:
        raise BaseModelError(f"could not load base checkpoint {path.name}: {e}") from None
    config = patcher.model.model_config
    if not isinstance(config, comfy.supported_models.SD15):
        raise BaseModelError(f"{path.name} is a {type(config).__name__} model; the trainers need an "
                             "SD1.5-architecture checkpoint")
    in_channels = int(config.unet_config["in_channels"])
    if in_channels not in ARCHITECTURES:
        raise BaseModelError(f"{path.name} has a UNet with {in_channels} input channels; expected 4 or 9")
    patcher.model.to(device)
    for module in (patcher.model, getattr(clip, "cond_stage_model", None),
                   getattr(vae, "first_stage_model", None)):
        if module is not None:
            module.requires_grad_(False)
    return LoadedBase(path=path, patcher=patcher, clip=clip, vae=vae, architecture=ARCHITECTURES[in_channels],
                      sha256=file_sha256(path) if compute_hash else "")


def load_vision_encoder(path, config_path: str, kind: str, user: str, *, what: str, config_option: str):
    """A frozen ComfyUI CLIP_VISION of ``kind`` (vision_features.CLIP / DINOV2) for a trainer, or a BaseModelError.

    Loaded as the stock Load CLIP Vision node loads it (ComfyUI detects the full-size layouts), or built from
    ``config_path``'s ComfyUI JSON config for other sizes. ``what`` names the file in messages ("image encoder"),
    ``user`` the trainer ("the AnyLogo trainer"), ``config_option`` the config key that gives a JSON config.
    """
    import comfy.clip_vision
    import comfy.utils

    from image_ops import vision_features as vf

    name = Path(path).name
    if not Path(path).is_file():
        raise BaseModelError(f"{what} not found: {path}")
    try:
        if config_path:
            encoder = comfy.clip_vision.ClipVisionModel(config_path)
            missing, _ = encoder.load_sd(comfy.utils.load_torch_file(str(path), safe_load=True))
            if missing:
                raise BaseModelError(f"{name} lacks {len(missing)} weights of {Path(config_path).name}, "
                                     f"e.g. {missing[:3]}")
        else:
            encoder = comfy.clip_vision.load(str(path))
        if encoder is None:
            raise BaseModelError(f"ComfyUI does not recognise {name} as a CLIP-vision/DINOv2 file (it detects "
                                 f"the full-size layouts); give {config_option} for another size")
        vf.require_kind(encoder, kind, user)
    except BaseModelError:
        raise
    except vf.VisionModelError as e:
        raise BaseModelError(str(e)) from None
    except Exception as e:  # safetensors raises its own error types for truncated or non-safetensors files
        label = {vf.DINOV2: "DINOv2", vf.CLIP: "CLIP vision"}.get(kind, kind)
        raise BaseModelError(f"could not load {what} {name} (expected a {label} .safetensors file): "
                             f"{type(e).__name__}: {e}") from None
    encoder.model.requires_grad_(False)
    return encoder
