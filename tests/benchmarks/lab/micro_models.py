"""Micro models of the real classes: ComfyUI's own UNetModel (inside its BaseModel and ModelPatcher) and its
DINOv2 CLIP_VISION class, small enough that thousands of training steps fit on two CPU cores.

The UNet is built from an SD1.5 model config with the width, context and depth changed, so everything that
reads the config (``RecyclingLayout``, the patches' slot discovery, ``model_sampling``'s SD1.5 schedule) sees
what it sees on SD1.5. ComfyUI's BaseModel uses weight-init-free operations (real checkpoints overwrite every
weight), so the weights are initialised here with torch's default initialisers under a fixed seed.
"""
from __future__ import annotations

import torch

LATENT_CHANNELS = 4  # SD1.5's latent width: the pack's AnyLogo checks subject latents are [1, 4, h, w]

MICRO_UNET = dict(
    model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=64, num_heads=4,
    num_head_channels=-1, use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False, image_size=32,
    out_channels=LATENT_CHANNELS)

MICRO_DINOV2 = {
    "model_type": "dinov2", "hidden_size": 32, "use_mask_token": True, "patch_size": 14, "image_size": 518,
    "num_channels": 3, "num_attention_heads": 4, "hidden_act": "gelu", "mlp_ratio": 2, "num_hidden_layers": 4,
    "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False, "layerscale_value": 1.0,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}
MICRO_DINOV2_RESOLUTION = 28  # 2x2 patches + the class token: the subject is 8 px, more patches add nothing


def _torch_default_init_(module: torch.nn.Module) -> None:
    """torch's own initialiser of each layer (ComfyUI's ops classes skip it by design)."""
    for m in module.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break


UNET_SHAPES = ("two-level", "one-level")


def micro_unet_config(*, inpainting: bool = True, width: int = 32, context_dim: int = 64, heads: int = 4,
                      shape: str = "two-level") -> dict:
    """``shape`` "one-level": no downsampling and no middle block (ComfyUI's UNetModel builds none for a middle
    depth below -1), so a layer's convolutions see only a few cells around it (15 at the last decoder layer
    against 41-61 for "two-level"): in a scene wider than that, only attention can carry content across it."""
    if shape not in UNET_SHAPES:
        raise ValueError(f"micro UNet shape must be one of {UNET_SHAPES}, got {shape!r}")
    channels = LATENT_CHANNELS * 2 + 1 if inpainting else LATENT_CHANNELS  # [z_t; mask; masked scene]
    config = {**MICRO_UNET, "in_channels": channels, "model_channels": width, "context_dim": context_dim,
              "num_heads": heads}
    if shape == "one-level":
        config.update(channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                      transformer_depth_middle=-2)
    return config


def build_micro_model(*, seed: int = 0, inpainting: bool = True, width: int = 32, context_dim: int = 64,
                      heads: int = 4, shape: str = "two-level", device="cpu"):
    """(BaseModel, ModelPatcher) of an EPS SD1.5-config model around a micro ``UNetModel``; fp32, seeded."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(micro_unet_config(inpainting=inpainting, width=width,
                                                           context_dim=context_dim, heads=heads, shape=shape))
    # SD15's extra config forces 8 heads; ours applies after it
    config.unet_config.update(num_heads=heads, num_head_channels=-1)
    config.set_inference_dtype(torch.float32, None)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        _torch_default_init_(model.diffusion_model)
    if inpainting:
        model.set_inpaint()  # what ComfyUI's get_model does for a 9-channel UNet (mask + masked-image inputs)
    model = model.to(device).float()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    return model, patcher


def build_micro_image_encoder(*, seed: int = 0):
    """ComfyUI's DINOv2 (the CLIP_VISION class AnyLogo's conditioning reads) at width 32, depth 4; frozen,
    random (the lab has no pretrained encoder: it stands for a fixed feature map of the subject)."""
    from standalone.tiny_models import vision_model_from_config

    encoder = vision_model_from_config(MICRO_DINOV2, seed=seed)
    encoder.model.requires_grad_(False)
    return encoder


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


MICRO_CLIP_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 64,
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    "model_type": "clip_text_model", "torch_dtype": "float32",
}


class _MicroTextTarget:
    """What ``comfy.sd.CLIP`` is built from (a supported model's ``clip_target``): the SD1 tokenizer, and
    ComfyUI's SD1 text model with the micro config instead of CLIP-L's."""

    def __init__(self):
        import comfy.sd1_clip

        self.clip = comfy.sd1_clip.SD1ClipModel
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer
        self.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": dict(MICRO_CLIP_TEXT),
                       "return_projected_pooled": False}


def build_micro_text_encoder(*, seed: int = 0, device="cpu"):
    """ComfyUI's CLIP object (the stock CLIP type: SD1 tokenizer, ``SDClipModel`` text transformer) at width 64
    (the micro UNet's context), 2 layers, fp32, random under ``seed`` (the lab has no pretrained text encoder:
    it stands for a fixed map from words to context vectors, in which a learned vector can take a word's place,
    as in textual inversion)."""
    import comfy.sd

    device = torch.device(device)
    clip = comfy.sd.CLIP(_MicroTextTarget(), model_options={"dtype": torch.float32, "load_device": device,
                                                             "offload_device": device, "initial_device": device})
    model = clip.cond_stage_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _torch_default_init_(model)
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(m.weight, std=0.02)  # CLIP's own initialiser of the token/position tables
    model.requires_grad_(False)
    return clip
