"""AnyLogo trainer: model recycling with sparse signatures and DINOv2 conditioning on SD1.5-inpainting.

    python -m train.prepare_manifest DATA --out DATA/manifest.jsonl --method anylogo
    python -m train.anylogo --config anylogo.yaml [--set steps=50000]
    torchrun --nproc_per_node=4 -m train.anylogo --config anylogo.yaml

Each sample (``train.anylogo_data``): a square zoom-in crop of the scene around its region, the region mask,
and the subject prepared as the nodes prepare it (white outside its mask, cropped, padded square) and augmented
(flip, rotation, optical distortion, resolution change). Each step (``train.anylogo_step``): the UNet runs once
on the subject latents (extraction status) and once on the noised scenes (generation status); the loss is the
noise-prediction MSE of the generation status only (Eq. 6). Each recycled layer's signature is kept per sample
when a uniform draw is <= ``sparse_threshold`` (Λ, Eq. 5); ``condition_dropout`` drops a sample's DINOv2 tokens
and signatures together (the unconditional prediction of Eq. 7). Cross-attention reads the subject's DINOv2
token groups plus the masked scene's global token through a trained projection instead of text (App. A).

The export (``models/anylogo/<name>.safetensors``, read by the AnyLogo Loader node) holds ``unet.<key>`` for
every trained UNet tensor and ``image_projection.weight/bias``, with the metadata listed in
``model_patches/anylogo_weights.py``. DINOv2 comes from ``image_encoder``: a file ComfyUI's Load CLIP Vision
reads (dinov2-large/giant), or any size of ComfyUI's DINOv2 with ``image_encoder_config`` (its JSON config).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from image_ops import vision_features as vf
from image_ops.hierarchical_encode import encode_dinov2_hierarchical, resolve_layers
from image_ops.subject_preprocess import prepare_subject, resize
from model_patches import anylogo_weights
from model_patches.anylogo import POSITIONS, SUBJECT_CONCAT, RecyclingSettings
from model_patches.image_context import ImageContextPatch, ImageProjection, group_tokens

from . import anylogo_data as data
from .anylogo_preview import sample_insertion
from .anylogo_step import (RecyclingLayout, anylogo_loss, encode_latent, inpaint_inputs, keep_decisions,
                           masked_scene)
from .base_model import BaseModelError, load_vision_encoder
from .config import ConfigError, TrainConfig, option
from .diffusion import draw_sigmas
from .distributed import mix_seed
from .engine import run
from .finetune import LAYER_SETS
from .method import TrainContext, TrainingMethod

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class AnyLogoConfig(TrainConfig):
    """AnyLogo: model recycling + DINOv2 conditioning on an SD1.5-inpainting UNet (exports models/anylogo weights)."""

    image_encoder: str = option("", "DINOv2 weights (.safetensors) as ComfyUI's Load CLIP Vision reads them")
    image_encoder_config: str = option("", "JSON config of ComfyUI's DINOv2 for other sizes than large/giant")
    image_layers: str = option("quarters", "DINOv2 layers of the four groups: 'quarters' (6,12,18,24 of ViT-L) "
                               "or a comma list")
    image_resolution: int = option(224, "DINOv2 input side (224 as in the paper; a multiple of the patch size)",
                                   minimum=14)
    resolution: int = option(512, "side of the square scene crop (a multiple of 8)", minimum=8)
    subject_size: int = option(512, "side the subject is encoded at (a multiple of 8)", minimum=8)
    train_layers: str = option("full", "UNet weights that train (full = the paper)", choices=tuple(LAYER_SETS))
    recycling_positions: str = option("decoder", "self-attention layers that recycle the subject (Table 4)",
                                      choices=tuple(POSITIONS))
    include_middle: bool = option(False, "also recycle in the middle block")
    sparse_threshold: float = option(0.6, "Λ: a layer's signature is kept when a uniform draw is <= Λ "
                                     "(per layer, sample and step); 0 = blocked flow", minimum=0.0)
    condition_dropout: float = option(0.1, "probability of training a sample unconditionally (no DINOv2 "
                                      "tokens, no signatures) for classifier-free guidance", minimum=0.0)
    detach_signatures: bool = option(False, "no gradient through the extraction pass (cheaper; the paper "
                                     "trains through it)")
    subject_concat: str = option("known", "inpainting channels of the subject pass: known = mask 0 + clean "
                                 "subject latent, unknown = mask 1 + a grey image's latent", choices=SUBJECT_CONCAT)
    zoom_in: bool = option(True, "random zoom-in crop around the region (off: the largest centred square)")
    zoom_fill: list[float] = option([0.3, 1.0], "range of the region's longer side as a fraction of the crop")
    augment_subject: bool = option(True, "random flip, rotation, optical distortion, resolution change")
    flip_probability: float = option(0.5, "subject horizontal flip probability", minimum=0.0)
    max_rotation: float = option(10.0, "subject rotation, degrees (uniform in ±)", minimum=0.0)
    max_distortion: float = option(0.1, "radial distortion coefficient (uniform in ±)", minimum=0.0)
    min_resolution_scale: float = option(0.5, "subject resolution change: down to a factor in [this, 1]",
                                         minimum=0.01)
    source_weights: list[str] = option([], "share of the draws per data source, e.g. [logos=2, tryon=1] "
                                       "(unnamed sources weigh 1; empty = every row once per epoch)")
    cache_latents: bool = option(True, "keep each row's latents and DINOv2 tokens (only when zoom_in and "
                                 "augment_subject are off, i.e. when they do not change between steps)")
    export_dtype: str = option("fp16", "dtype of the exported UNet weights", choices=tuple(EXPORT_DTYPES))
    validation_count: int = option(2, "manifest rows drawn as validation images", minimum=0)
    validation_threshold: float = option(1.0, "Λ of validation sampling (1 = complete, as the node's default)",
                                         minimum=0.0)
    validation_steps: int = option(20, "sampling steps of a validation image", minimum=1)
    validation_cfg: float = option(5.0, "CFG scale of the validation images", minimum=0.0)
    validation_sampler: str = option("ddim", "ComfyUI sampler name of the validation images")
    validation_scheduler: str = option("ddim_uniform", "ComfyUI scheduler name of the validation images")

    def check(self) -> list[str]:
        problems = super().check()
        if not self.image_encoder:
            problems.append("image_encoder is required (a DINOv2 CLIP-vision file)")
        for name in ("resolution", "subject_size"):
            if getattr(self, name) % 8:
                problems.append(f"{name} must be a multiple of 8, got {getattr(self, name)}")
        for name in ("sparse_threshold", "condition_dropout", "flip_probability", "validation_threshold",
                     "min_resolution_scale"):
            if getattr(self, name) > 1:
                problems.append(f"{name} must be <= 1, got {getattr(self, name)}")
        if len(self.zoom_fill) != 2 or not 0 < self.zoom_fill[0] <= self.zoom_fill[1] <= 1:
            problems.append(f"zoom_fill must be [low, high] with 0 < low <= high <= 1, got {self.zoom_fill}")
        try:
            self.weights_by_source()
        except ValueError as e:
            problems.append(str(e))
        return problems

    def weights_by_source(self) -> dict[str, float]:
        weights = {}
        for item in self.source_weights:
            name, sep, value = item.partition("=")
            try:
                weights[name.strip()] = float(value) if sep and name.strip() else -1.0
            except ValueError:
                weights[name.strip()] = -1.0
            if weights[name.strip()] < 0:
                raise ValueError(f"source_weights entries are source=weight with a weight >= 0, got {item!r}")
        return weights


def load_image_encoder(path, config_path: str = ""):
    """ComfyUI's CLIP_VISION DINOv2 (frozen): the stock loader's detection, or ``config_path``'s architecture."""
    return load_vision_encoder(path, config_path, vf.DINOV2, "the AnyLogo trainer", what="image encoder",
                               config_option="image_encoder_config")


class AnyLogoMethod(TrainingMethod):
    name = anylogo_weights.METHOD
    format_version = anylogo_weights.FORMAT_VERSION
    config_class = AnyLogoConfig
    manifest_schema = data.MANIFEST_SCHEMA
    folder_layout = data.FOLDER_LAYOUT

    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        cfg, model = self.config, ctx.base.model
        if ctx.base.in_channels != 9:
            raise BaseModelError(f"the AnyLogo trainer starts from an SD1.5-inpainting (9-channel) UNet; "
                                 f"{ctx.base.path.name} is {ctx.base.architecture}")
        self.encoder = load_image_encoder(cfg.image_encoder, cfg.image_encoder_config)
        info = vf.describe(self.encoder)
        try:
            self.image_layers = resolve_layers(cfg.image_layers, info.depth, vf.quarter_layers(info.depth))
        except vf.VisionModelError as e:
            raise ConfigError(f"image_layers: {e}") from None
        self.layout = RecyclingLayout.of(model, cfg.recycling_positions, cfg.include_middle, len(self.image_layers))
        self.projection = ImageProjection(info.width, self.layout.context_dim).to(ctx.device)
        generator = torch.Generator().manual_seed(mix_seed(cfg.seed, "image_projection"))
        with torch.no_grad():  # torch's Linear initialisation, drawn from the run's seed
            bound = 1 / info.width ** 0.5
            for p in self.projection.parameters():
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
        markers = LAYER_SETS[cfg.train_layers]
        named = {n: p for n, p in model.named_parameters()
                 if n.startswith("diffusion_model.") and any(m in n for m in markers)}
        self.unet_names = set(named)
        named.update({f"image_projection.{n}": p for n, p in self.projection.named_parameters()})
        self.augmentation = data.SubjectAugmentation(cfg.flip_probability, cfg.max_rotation, cfg.max_distortion,
                                                     cfg.min_resolution_scale)
        self.cache = {}
        return named

    def make_dataset(self, rows, ctx: TrainContext):
        self.dataset = data.AnyLogoDataset(rows)
        return self.dataset

    def collate(self, items):
        return data.collate_lists(items)

    def sample_weights(self, dataset, ctx: TrainContext):
        weights = self.config.weights_by_source()
        sources = [row.get("source") or data.DEFAULT_SOURCE for row in dataset.rows]
        absent = sorted(set(weights) - set(sources))
        if absent and ctx.dist.is_main:
            print(f"note: source_weights name sources without rows: {absent}", file=sys.stderr)
        return data.source_weights(sources, weights)

    # ---- one sample ------------------------------------------------------------------------------------------
    def prepare(self, item: dict, ctx: TrainContext, generator: torch.Generator | None):
        """(scene latent, concat, subject latent, DINOv2 token groups, scene crop, region, subject pixels) of one
        item: random crop and augmentation with ``generator``, the deterministic crop and no augmentation without.
        Cached per row when nothing in it is random."""
        cfg, model, vae = self.config, ctx.base.model, ctx.base.vae
        cacheable = cfg.cache_latents and not (cfg.zoom_in or cfg.augment_subject) or generator is None
        key = (item["index"], generator is None)
        if cacheable and key in self.cache:
            return self.cache[key]
        scene, region = data.zoom_crop(item["scene"], item["mask"], item["box"], cfg.resolution,
                                       generator if cfg.zoom_in else None, cfg.zoom_fill)
        subject = prepare_subject(item["subject"][None], item["subject_mask"], size=cfg.subject_size)[0][0]
        if cfg.augment_subject and generator is not None:
            subject = data.augment_subject(subject, generator, self.augmentation)
        z0, concat = inpaint_inputs(vae, model, scene, region)
        embeds = encode_dinov2_hierarchical(self.encoder, subject[None], layers=self.image_layers,
                                            size=cfg.image_resolution,
                                            background_pixels=masked_scene(scene, region)[None])
        tokens = [t[0] for t in group_tokens(embeds.groups, embeds.background)]
        out = (z0, concat, encode_latent(vae, model, subject), tokens, scene, region, subject)
        if cacheable:  # training entries keep what a step reads (pixels only for the few validation rows)
            self.cache[key] = out if generator is None else out[:4] + (None,) * 3
        return out

    def training_loss(self, batch, ctx: TrainContext, rng):
        cfg, model, device = self.config, ctx.base.model, ctx.device
        items = [{k: v[i] for k, v in batch.items()} for i in range(len(rng))]
        prepared = [self.prepare(item, ctx, g) for item, g in zip(items, rng.generators)]
        z0, concat, subject = (torch.stack([p[k] for p in prepared]).to(device) for k in range(3))
        dropped = rng.bernoulli(cfg.condition_dropout)
        tokens = [torch.stack([torch.zeros_like(p[3][g]) if d else p[3][g] for p, d in zip(prepared, dropped)])
                  for g in range(len(self.image_layers))]
        sigma = draw_sigmas(model, rng)
        noise, subject_noise = rng.randn(*z0.shape[1:]), rng.randn(*subject.shape[1:])
        keep = keep_decisions(rng.rand(len(self.layout.slots)), cfg.sparse_threshold, dropped)
        loss, region_loss = anylogo_loss(model, self.layout, z0, concat, subject,
                                         ImageContextPatch(self.projection, tokens, self.layout.group_of), sigma,
                                         noise, subject_noise, keep, subject_known=cfg.subject_concat == "known",
                                         detach_signatures=cfg.detach_signatures)
        return loss, {"sigma_mean": float(sigma.mean()), "condition_dropped": float(dropped.float().mean()),
                              "signatures_kept": float(keep.float().mean()), "region_loss": float(region_loss)}

    # ---- validation and export -------------------------------------------------------------------------------
    def preview(self, ctx: TrainContext, index: int, threshold: float, seed: int) -> tuple[torch.Tensor, ...]:
        """(scene crop [3,R,R], region [R,R], subject [3,S,S], sampled latent [1,4,R/8,R/8]) for dataset row
        ``index``, sampled as the nodes sample with recycling threshold ``threshold``."""
        cfg = self.config
        z0, concat, subject_latent, tokens, scene, region, subject = self.prepare(
            self.dataset[index], ctx, None)
        settings = RecyclingSettings(positions=cfg.recycling_positions, include_middle=cfg.include_middle,
                                     threshold=threshold, seed=seed, subject_concat=cfg.subject_concat)
        image_context = ImageContextPatch(self.projection, [t[None] for t in tokens], self.layout.group_of)
        out = sample_insertion(ctx.base.patcher, ctx.base.vae, scene, region, subject_latent[None], image_context,
                               settings, steps=cfg.validation_steps, cfg=cfg.validation_cfg,
                               sampler=cfg.validation_sampler, scheduler=cfg.validation_scheduler, seed=seed)
        return scene, region, subject, out

    def validation_samples(self, ctx: TrainContext, step: int, generator: torch.Generator):
        samples = []
        for i in range(min(self.config.validation_count, len(self.dataset))):
            seed = int(torch.randint(0, 2 ** 31, (), generator=generator))
            scene, _, subject, latent = self.preview(ctx, i, self.config.validation_threshold, seed)
            side = scene.shape[-1]
            out = ctx.base.vae.decode(latent)[0].float().clamp(0, 1)
            strip = torch.cat([scene.movedim(0, -1), resize(subject[None], side, side)[0].movedim(0, -1), out], 1)
            samples.append((f"row_{i:02d}", strip))
        return samples

    def export(self, path, ctx: TrainContext):
        cfg, dtype = self.config, EXPORT_DTYPES[self.config.export_dtype]
        prefix = "diffusion_model."
        unet = {n[len(prefix):]: p.detach().to(dtype).cpu() for n, p in ctx.base.model.named_parameters()
                if n in self.unet_names}
        metadata = ctx.export_metadata(
            unet_in_channels=str(self.layout.in_channels), image_encoder=vf.DINOV2,
            image_layers=list(self.image_layers), image_resolution=cfg.image_resolution,
            image_width=self.projection.proj.in_features, recycling_positions=cfg.recycling_positions,
            include_middle=cfg.include_middle, sparse_threshold=cfg.sparse_threshold,
            subject_concat=cfg.subject_concat, train_layers=cfg.train_layers, unet_dtype=cfg.export_dtype)
        anylogo_weights.save_anylogo_weights(path, unet, self.projection, metadata)
        return Path(path)


METHOD = AnyLogoMethod


def main(argv=None) -> int:
    return run(AnyLogoMethod, argv)


if __name__ == "__main__":
    sys.exit(main())
