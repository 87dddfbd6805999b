"""Tiny, seeded, real-architecture models for tests and for the demo when no real weights are installed.

No pretrained weight can be downloaded where this pack is tested, so every model here is ComfyUI's own class
at a reduced size with seeded random weights:

* ``build_sd15_checkpoint``: a checkpoint the stock ``CheckpointLoaderSimple`` detects as SD1.5 (ComfyUI
  matches SD1.5 on ``model_channels=320`` and ``context_dim=768`` and reads depth and levels from the weights),
  with a two-level UNet, the full CLIP-L text encoder and the full SD VAE (their configs are fixed in ComfyUI,
  and a key left out would load as uninitialised memory, so all are written). ``in_channels=9`` gives the
  inpainting variant.
* ``tiny_clip_vision`` / ``tiny_dinov2``: ComfyUI's ``ClipVisionModel`` built from a small config file, i.e. the
  real CLIP_VISION class at a small width and depth.
* ``build_full_layout_vision_file``: a full-size ViT-L/14 CLIP-vision or DINOv2-large file with random weights,
  for the stock ``CLIPVisionLoader``, which only recognises full-size layouts.

Images made with these models are noise-like: they prove the plumbing, not picture quality.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

BUILDER_VERSION = 1  # bump when a model here changes, so on-disk caches are rebuilt

TINY_UNET = dict(
    model_channels=320,          # SD1.5's width: ComfyUI's detector keys on it
    channel_mult=[1, 2],         # SD1.5 has [1, 2, 4, 4]
    num_res_blocks=[1, 1],       # SD1.5 has 2 per level
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    num_heads=8,
)


def _norm_params_to_identity_(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()


def _init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim <= 1:
                # biases, class tokens, layer scales: small, so random models stay numerically tame
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "embedding" in name and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            if leaf == "lambda1":  # DINOv2 layer scale
                p.fill_(1.0)
    _norm_params_to_identity_(module)
    return module


def sd15_state_dict(*, in_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full checkpoint state dict (UNet + CLIP-L text + VAE) in the original SD1.5 key layout."""
    import comfy.clip_model
    import comfy.ldm.models.autoencoder
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=in_channels, out_channels=4, use_spatial_transformer=True,
                     legacy=False, use_linear_in_transformer=False, adm_in_channels=None,
                     num_head_channels=-1, use_temporal_resblock=False, use_temporal_attention=False,
                     operations=ops, **TINY_UNET)
    sd = {f"model.diffusion_model.{k}": v for k, v in _init_(unet, seed).state_dict().items()}

    comfy_dir = Path(comfy.clip_model.__file__).parent
    with open(comfy_dir / "sd1_clip_config.json") as f:
        clip_config = json.load(f)
    clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", ops)
    clip_sd = _init_(clip, seed + 1).state_dict()
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_sd.items()
               if not k.startswith("text_projection")})

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd.update({f"first_stage_model.{k}": v for k, v in _init_(vae, seed + 2).state_dict().items()})
    return sd


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from model_patches.weight_files import save_weights

    save_weights(path, tensors, metadata)


def build_sd15_checkpoint(path: Path | str, *, inpainting: bool = False, seed: int = 0) -> Path:
    """Write a tiny SD1.5(-inpainting) checkpoint in fp16 (unless it is already there) and return its path."""
    path = Path(path)
    if not path.exists():
        sd = sd15_state_dict(in_channels=9 if inpainting else 4, seed=seed)
        _atomic_save({k: v.half() for k, v in sd.items()}, path,
                     {"tiny_model": "sd15-inpainting" if inpainting else "sd15", "seed": str(seed),
                      "builder_version": str(BUILDER_VERSION)})
    return path


TINY_CLIP_VISION_CONFIG = {
    "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_hidden_layers": 6, "num_channels": 3, "image_size": 224, "patch_size": 14,
    "projection_dim": 32, "layer_norm_eps": 1e-5,
}

TINY_DINOV2_CONFIG = {
    "model_type": "dinov2", "hidden_size": 64, "use_mask_token": True, "patch_size": 14, "image_size": 518,
    "num_channels": 3, "num_attention_heads": 4, "hidden_act": "gelu", "mlp_ratio": 2, "num_hidden_layers": 8,
    "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False, "layerscale_value": 1.0,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def vision_model_from_config(config: dict, *, seed: int = 0, state_dict: dict | None = None):
    """ComfyUI's ClipVisionModel (the CLIP_VISION type) built from a config dict, seeded or from weights."""
    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(config))
        model = comfy.clip_vision.ClipVisionModel(str(cfg))
    if state_dict is None:
        _init_(model.model, seed)
    else:
        missing, unexpected = model.load_sd(state_dict)
        if missing:
            raise KeyError(f"vision weights are missing {len(missing)} keys, e.g. {missing[:3]}")
    return model


def tiny_clip_vision(seed: int = 0, **overrides):
    return vision_model_from_config({**TINY_CLIP_VISION_CONFIG, **overrides}, seed=seed)


def tiny_dinov2(seed: int = 0, **overrides):
    return vision_model_from_config({**TINY_DINOV2_CONFIG, **overrides}, seed=seed)


def build_full_layout_vision_file(path: Path | str, kind: str = "clip_vit_l", *, seed: int = 0) -> Path:
    """A full-size ViT-L/14 file the stock CLIPVisionLoader recognises ("clip_vit_l" or "dinov2_large")."""
    import comfy.clip_vision

    path = Path(path)
    if path.exists():
        return path
    comfy_dir = Path(comfy.clip_vision.__file__).parent
    config_file = {"clip_vit_l": comfy_dir / "clip_vision_config_vitl.json",
                   "dinov2_large": comfy_dir / "image_encoders" / "dino2_large.json"}[kind]
    model = comfy.clip_vision.ClipVisionModel(str(config_file))
    _init_(model.model, seed)
    _atomic_save({k: v.half() for k, v in model.get_sd().items()}, path,
                 {"tiny_model": f"full-layout-{kind}", "seed": str(seed), "builder_version": str(BUILDER_VERSION)})
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("SUBJECT_CUSTOMIZATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-subject-customization")
    return Path(base) / f"tiny-models-v{BUILDER_VERSION}"


def build_anylogo_weights(path: Path | str, *, inpainting: bool = True, seed: int = 0,
                          image_width: int = 1024) -> Path:
    """A random-weight AnyLogo file for the tiny SD1.5(-inpainting) checkpoint, in the format the trainer exports:
    the UNet's cross-attention key/value weights (what changes most when DINOv2 tokens replace text) and a
    1024→768 projection. It proves the loader and the conditioning path, not what trained weights do."""
    import safetensors.torch
    from model_patches.anylogo_weights import save_anylogo_weights
    from model_patches.unet_layout import ARCHITECTURES
    from model_patches.image_context import ImageProjection

    path = Path(path)
    if path.exists():
        return path
    base = build_sd15_checkpoint(path.parent.parent / "checkpoints" /
                                 ("tiny_sd15_inpainting.safetensors" if inpainting else "tiny_sd15.safetensors"),
                                 inpainting=inpainting)
    prefix = "model.diffusion_model."
    gen = torch.Generator().manual_seed(seed)
    unet = {}
    with safetensors.safe_open(str(base), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix) and (".attn2.to_k." in key or ".attn2.to_v." in key):
                weight = f.get_tensor(key).float()
                unet[key[len(prefix):]] = (weight + 0.01 * torch.randn(weight.shape, generator=gen)).half()
    projection = ImageProjection(image_width, 768)
    _init_(projection, seed + 3)
    save_anylogo_weights(path, unet, projection, {
        "base_architecture": ARCHITECTURES[9 if inpainting else 4], "unet_in_channels": str(9 if inpainting else 4),
        "image_encoder": "dinov2", "image_layers": [6, 12, 18, 24], "image_resolution": 224,
        "recycling_positions": "decoder", "sparse_threshold": 0.6, "tiny_model": "random-anylogo",
        "builder_version": str(BUILDER_VERSION)})
    return path


def build_controlnet(path: Path | str, *, seed: int = 0) -> Path:
    """A ControlNet with the tiny UNet's layout and random weights, in the original (control_model.*) format
    ComfyUI's ControlNetLoader detects."""
    import comfy.cldm.cldm
    import comfy.ops

    path = Path(path)
    if not path.exists():
        net = comfy.cldm.cldm.ControlNet(
            hint_channels=3, image_size=32, in_channels=4, use_spatial_transformer=True, legacy=False,
            use_linear_in_transformer=False, adm_in_channels=None, num_head_channels=-1,
            operations=comfy.ops.disable_weight_init, **TINY_UNET)
        tensors = {f"control_model.{k}": v.half() for k, v in _init_(net, seed + 5).state_dict().items()}
        _atomic_save(tensors, path, {"tiny_model": "controlnet", "seed": str(seed),
                                     "builder_version": str(BUILDER_VERSION)})
    return path


def build_tiny_dinov2_files(folder: Path | str, *, seed: int = 0) -> tuple[Path, Path]:
    """The tiny DINOv2 as a weight file plus its ComfyUI config JSON (the stock loader only detects full-size
    layouts; trainers take the config alongside): (weights path, config path)."""
    folder = Path(folder)
    weights, config = folder / "tiny_dinov2.safetensors", folder / "tiny_dinov2.json"
    if not weights.exists():
        model = tiny_dinov2(seed)
        _atomic_save({k: v.contiguous() for k, v in model.get_sd().items()}, weights,
                     {"tiny_model": "dinov2", "seed": str(seed), "builder_version": str(BUILDER_VERSION)})
    if not config.exists():
        config.write_text(json.dumps(TINY_DINOV2_CONFIG))
    return weights, config


def build_customcontrast_weights(path: Path | str, model, *, image_layers=(1, 2, 3), vision_width: int = 64,
                                 seed: int = 0, zero_visual: bool = False) -> Path:
    """A CustomContrast file for ``model``'s cross-attention layers: a small MFI encoder (seeded) and seeded
    K_v/V_v (zero with ``zero_visual``, as training starts), over the tiny CLIP vision's ``image_layers``."""
    import torch

    from model_patches.customcontrast import VisualAttention
    from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
    from model_patches.customcontrast_weights import save_customcontrast_weights
    from model_patches.unet_layout import transformer_slots

    slots = transformer_slots(model)
    torch.manual_seed(seed)
    encoder = MFIEncoder(EncoderConfig(feature_dim=vision_width * len(image_layers), layers=len(slots), dim=32,
                                       visual_tokens=4, depth=2, heads=4, fourier_bands=8))
    visual = VisualAttention(slots)
    if not zero_visual:
        for p in visual.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return save_customcontrast_weights(path, encoder, visual, slots, image_layers=list(image_layers),
                                       training_config={"tiny_model": True, "seed": seed})


def shallow_text_encoder(clip, layers: int = 2):
    """Keep the first ``layers`` blocks of this CLIP object's (random) CLIP-L text transformer: the same classes
    and code path at a fraction of the cost, for tests of methods that run the text encoder inside every
    sampling step (CustomContrast: l encodes per step). Changes this CLIP object only."""
    encoder = clip.cond_stage_model.clip_l.transformer.text_model.encoder
    encoder.layers = encoder.layers[:layers]
    return clip
