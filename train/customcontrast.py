"""CustomContrast trainer (seed 003): the MFI encoder and the visual K_v/V_v on a frozen SD1.5, multi-view data.

    python -m train.prepare_manifest DATA --out DATA/manifest.jsonl --method customcontrast
    python -m train.customcontrast --config train/configs/customcontrast_sd15.yaml
    torchrun --nnodes=2 --nproc_per_node=3 ... -m train.customcontrast --config ...   (see README)

Data (``train.customcontrast_data``): views of subjects with segmentation masks and captions holding the
placeholder; the order puts ``views_per_subject`` views of every drawn subject into each global batch. Each
sample: the segmented view is encoded by CLIP vision at ``image_layers`` (concatenated coarse to fine, as CLIP
Hierarchical Encode does for the Apply node) and by CLIP's image embedding (MACL's appearance similarity); the
view's latent is noised at a uniformly drawn timestep; the UNet runs with the decoupled visual cross-attention
and the per-layer S+ contexts (``train.customcontrast_step``). Loss (Eq. 9): L_LDM + λ1 (CSCL + MACL) + λ2 L_loc,
the contrastive terms over the global batch (features gathered across processes with gradients). The UNet, the
text encoder and CLIP vision are frozen; the encoder and every layer's K_v/V_v train (K_v/V_v start at zero, so
step 0 is the base model with S+ tokens).

The export (``models/customcontrast/<name>.safetensors``, read by the CustomContrast Loader) is written by
``model_patches.customcontrast_weights.save_customcontrast_weights`` with the engine's metadata (base hash,
trained steps, config) added.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from image_ops import vision_features as vf
from image_ops.hierarchical_encode import encode_clip_hierarchical, resolve_layers
from image_ops.similarity import clip_image_embeddings
from image_ops.subject_preprocess import FITS, prepare_subject
from model_patches import customcontrast_weights
from model_patches.customcontrast import VisualAttention
from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
from model_patches.customcontrast_text import PlaceholderError, PlaceholderPrompt
from model_patches.unet_layout import transformer_slots

from . import customcontrast_data as data
from .base_model import BaseModelError, load_vision_encoder
from .config import ConfigError, TrainConfig, option
from .customcontrast_step import (CSCL_NEGATIVES, LossWeights, StepInputs, batch_patch, customcontrast_loss,
                                  latent_mask)
from .diffusion import LatentCache, TextCache, draw_sigmas
from .distributed import mix_seed
from .engine import run
from .manifest import ManifestError
from .method import TrainContext, TrainingMethod
from .text_gradients import enable_text_gradients


@dataclass
class CustomContrastConfig(TrainConfig):
    """CustomContrast: MFI encoder + visual K_v/V_v on a frozen SD1.5 UNet (exports models/customcontrast)."""

    clip_vision: str = option("", "CLIP ViT vision weights (.safetensors) as ComfyUI's Load CLIP Vision reads them "
                              "(the paper: CLIP ViT-L/14)")
    clip_vision_config: str = option("", "JSON config of ComfyUI's CLIP vision for other sizes than the stock ones")
    image_layers: str = option("thirds", "CLIP vision layers concatenated coarse to fine: 'thirds' (8,16,24 of "
                               "ViT-L/14: 3 layers, §3.2), 'default' (CLIP Hierarchical Encode's), or a comma list")
    subject_fit: str = option("center_crop", "how the segmented view is squared for CLIP (CLIP Hierarchical "
                              "Encode's fit, which the Apply node's embeds must use too)", choices=tuple(FITS))
    learning_rate: float = option(3e-5, "peak learning rate of AdamW (the paper's 3e-5)", minimum=0.0)
    placeholder: str = option("sks", "the caption word that stands for the subject (one CLIP token)")
    resolution: int = option(512, "side of the square view the UNet denoises (centre crop; a multiple of 8)",
                             minimum=8)
    views_per_subject: int = option(2, "views of each drawn subject in a global batch (>= 2: MACL positives)",
                                    minimum=2)
    contrastive_weight: float = option(1e-2, "λ1: weight of CSCL + MACL (Eq. 9)", minimum=0.0)
    location_weight: float = option(1e-3, "λ2: weight of L_loc (Eq. 9)", minimum=0.0)
    temperature: float = option(0.07, "τ of MACL (Eq. 7)", minimum=1e-6)
    min_similarity: float = option(0.25, "r_ij is clamped at this before α = 1/r (α <= 4): a non-positive "
                                   "similarity would flip the factor, a small one swamp MACL's softmax (Eq. 7 has "
                                   "no clamp; CLIP ViT-L cosines of object crops are rarely below it)",
                                   minimum=1e-6)
    cscl_negatives: str = option("all", "negatives of CSCL (Eq. 4): 'all' other samples of the global batch, as "
                                 "printed (a subject's other views included, which pushes them apart), or "
                                 "'other_subjects' (a subject's other views left out)", choices=CSCL_NEGATIVES)
    encoder_dim: int = option(768, "width of the Q-Formers", minimum=8)
    visual_tokens: int = option(16, "m: visual tokens of the visual cross-attention", minimum=1)
    encoder_depth: int = option(4, "Perceiver-attention layers per Q-Former (4 in the paper)", minimum=1)
    encoder_heads: int = option(8, "heads of the Q-Formers' attention", minimum=1)
    fourier_bands: int = option(64, "frequencies of the timestep's Fourier encoding", minimum=1)
    cache_inputs: bool = option(True, "keep each view's latent, CLIP features and caption encoding in memory "
                                "(nothing in them is random; about 3 MB per view at ViT-L, 3 layers)")

    def check(self) -> list[str]:
        problems = super().check()
        if not self.clip_vision:
            problems.append("clip_vision is required (a CLIP ViT vision file)")
        if self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.encoder_dim % self.encoder_heads:
            problems.append(f"encoder_dim ({self.encoder_dim}) must be a multiple of encoder_heads "
                            f"({self.encoder_heads})")
        if self.batch_size % self.views_per_subject:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of views_per_subject "
                            f"({self.views_per_subject})")
        elif self.batch_size < 2 * self.views_per_subject:
            problems.append(f"batch_size ({self.batch_size}) must hold at least two subjects "
                            f"(2 x views_per_subject = {2 * self.views_per_subject}): the contrastive losses need "
                            "negatives")
        return problems


def load_clip_vision(path, config_path: str = ""):
    return load_vision_encoder(path, config_path, vf.CLIP, "the CustomContrast trainer", what="CLIP vision file",
                               config_option="clip_vision_config")


class CustomContrastMethod(TrainingMethod):
    name = customcontrast_weights.METHOD
    format_version = customcontrast_weights.FORMAT_VERSION
    config_class = CustomContrastConfig
    manifest_schema = data.MANIFEST_SCHEMA
    folder_layout = data.FOLDER_LAYOUT

    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        cfg, device = self.config, ctx.device
        if ctx.base.in_channels != 4:
            raise BaseModelError(f"the CustomContrast trainer starts from an SD1.5 (4-channel) UNet; "
                                 f"{ctx.base.path.name} is {ctx.base.architecture}")
        self.clip_vision = load_clip_vision(cfg.clip_vision, cfg.clip_vision_config)
        info = self.vision_info = vf.describe(self.clip_vision)
        try:
            self.image_layers = (vf.quarter_layers(info.depth, 3) if cfg.image_layers.strip().lower() == "thirds"
                                 else resolve_layers(cfg.image_layers, info.depth, None) or ())
        except vf.VisionModelError as e:
            raise ConfigError(f"image_layers: {e}") from None
        if not self.image_layers:  # "default": CLIP Hierarchical Encode's own default
            from image_ops.hierarchical_encode import clip_default_layers

            self.image_layers = clip_default_layers(info.depth)
        self.slots = transformer_slots(ctx.base.model)
        clip = ctx.base.clip
        clip.cond_stage_model.to(device)  # the text encoder runs inside every step (S+ per layer)
        enable_text_gradients(clip)       # S+ trains through it
        width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
        config = EncoderConfig(feature_dim=info.width * len(self.image_layers), layers=len(self.slots),
                               dim=cfg.encoder_dim, token_dim=width, visual_tokens=cfg.visual_tokens,
                               depth=cfg.encoder_depth, heads=cfg.encoder_heads, fourier_bands=cfg.fourier_bands)
        with torch.random.fork_rng(devices=[]):  # the initialisation is drawn from the run's seed
            torch.manual_seed(mix_seed(cfg.seed, "customcontrast_init") % (1 << 62))
            self.encoder = MFIEncoder(config).to(device)
            self.visual = VisualAttention(self.slots, width).to(device)  # zero: step 0 adds nothing
        self.weights = LossWeights(cfg.contrastive_weight, cfg.location_weight, cfg.temperature, cfg.min_similarity,
                                   cscl_negatives=cfg.cscl_negatives)
        self.latents = LatentCache(ctx.base.vae, ctx.base.model, enabled=cfg.cache_inputs)
        self.texts = TextCache(clip)
        self.cache = {}
        self.patch = self.patched = None  # installed on a MODEL clone once the captions are known (make_dataset)
        named = {f"encoder.{n}": p for n, p in self.encoder.named_parameters()}
        named.update({f"visual.{n}": p for n, p in self.visual.layers.named_parameters()})
        return named

    def make_dataset(self, rows, ctx: TrainContext):
        self.dataset = data.ViewDataset(rows, self.config.placeholder)
        self.prompts = {}
        for index, row in enumerate(rows):
            caption = self.dataset.caption(index)
            if caption not in self.prompts:
                try:
                    self.prompts[caption] = PlaceholderPrompt.of(ctx.base.clip, caption, self.config.placeholder)
                except PlaceholderError as e:
                    raise ManifestError(f"line {row['_line']}: {e}") from None
        # the Apply node's patch on a clone of the base MODEL; each step gives it the batch's rows
        self.patch, self.patched = batch_patch(ctx.base.patcher, self.slots, self.encoder, self.visual,
                                               next(iter(self.prompts.values())))
        return self.dataset

    def collate(self, items):
        return data.collate_views(items)

    def sample_stream(self, dataset, ctx: TrainContext):
        cfg = self.config
        stream = data.SubjectViewStream([dataset.subject_of(i) for i in range(len(dataset))],
                                        cfg.views_per_subject, cfg.seed, cfg.shuffle)
        short = [dataset.subjects[s] for s in stream.subjects if len(stream.members[s]) < cfg.views_per_subject]
        if short:
            raise ConfigError(f"views_per_subject is {cfg.views_per_subject}, but subjects {short[:5]} have fewer "
                              "views; lower it or add views")
        return stream

    # ---- one view -----------------------------------------------------------------------------------------
    def segmented(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[3, S, S]: the subject on white, squared as CLIP Hierarchical Encode prepares it (margin 0)."""
        return prepare_subject(image[None], mask[None], size=self.vision_info.native_size,
                               fit=self.config.subject_fit)[0][0]

    def subject_inputs(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP features [T, F] at ``image_layers``, CLIP image embedding [D]) of the segmented view."""
        pixels = self.segmented(image, mask)[None]
        with torch.no_grad():
            embeds = encode_clip_hierarchical(self.clip_vision, pixels, layers=self.image_layers,
                                              size=self.vision_info.native_size)
            appearance = clip_image_embeddings(self.clip_vision, [pixels[0]])[0]
        return embeds.concatenated()[0].float().cpu(), appearance

    def prepare(self, item: dict, ctx: TrainContext):
        """(latent [4, h, w], latent mask [h, w], features, appearance, caption encoding) of one view."""
        key = item["index"]
        if key in self.cache:
            return self.cache[key]
        size = self.config.resolution
        view = data.center_square(item["image"], size)
        mask = data.center_square(item["mask"][None], size)[0]
        z0 = self.latents(key, view.movedim(0, -1))
        features, appearance = self.subject_inputs(item["image"], item["mask"])
        out = (z0, latent_mask(mask, *z0.shape[-2:]), features, appearance, self.texts(item["caption"]))
        if self.config.cache_inputs:
            self.cache[key] = out
        return out

    def step_inputs(self, batch, ctx: TrainContext) -> StepInputs:
        device = ctx.device
        prepared = [self.prepare({k: v[i] for k, v in batch.items()}, ctx) for i in range(len(batch["index"]))]
        z0, masks, features, appearance, context = (torch.stack([p[k] for p in prepared]).to(device)
                                                    for k in range(5))
        return StepInputs(z0, masks, features, appearance, torch.tensor(batch["subject"], device=device),
                          [self.prompts[c] for c in batch["caption"]], context)

    def training_loss(self, batch, ctx: TrainContext, rng):
        model = ctx.base.model
        inputs = self.step_inputs(batch, ctx)
        sigma = draw_sigmas(model, rng)
        noise = rng.randn(*inputs.z0.shape[1:])
        loss, parts = customcontrast_loss(self.patch, self.patched, inputs, sigma, noise, self.weights)
        return loss, {**{k: float(v) for k, v in parts.items()}, "sigma_mean": float(sigma.mean())}

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self, path, ctx: TrainContext):
        return customcontrast_weights.save_customcontrast_weights(
            path, self.encoder, self.visual, self.slots, image_layers=list(self.image_layers),
            training_config=self.config.to_dict(), extra_metadata=ctx.export_metadata())


METHOD = CustomContrastMethod


def main(argv=None) -> int:
    return run(CustomContrastMethod, argv)


if __name__ == "__main__":
    sys.exit(main())
