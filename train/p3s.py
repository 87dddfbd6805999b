"""P3S trainer: one subject from one photo and a click (plus a click on the look-alike), on the shared engine.

    python -m train.p3s --config p3s.yaml [--set epochs=60]
    torchrun --nproc_per_node=2 -m train.p3s --config p3s.yaml

Data: a one-row manifest ``{"image": "photo.png", "positive_points": "120,80", "negative_points": "300,90"}``
(points in the formats Points to Mask accepts: plain ``x,y; x,y`` or points-editor JSON, in pixels), or with a
ready ``negatives_mask`` (a mask image, white = remove) or your own ``inpainted`` photo instead of negative
points. The negatives' mask comes from the same point-to-mask helper as the node (the negative points as the
clicked subject, the positive ones as its negatives); OpenCV inpainting fills it (Eq. 3). The photo with the
look-alike removed, centre-cropped to ``resolution``, is both the training image and the RNGR reference ``I'``.

Each step: the prompt ``"a photo of {identifier} {class_word}"`` (dropped to "" with ``condition_dropout``, 10 %),
a timestep, noise; the frozen UNet with the P3S patch (model_patches/p3s.py, the very object P3S Apply installs)
predicts the noise while the injection copy and the RNGR encoder train. ``L = L_LDM + γ·L_ac`` (γ 0.1) with
L_ac between the copy's and the UNet's last cross-attention maps (``consistency_layers: all`` uses every layer,
Table IV). One epoch is one pass over the rows: with one photo and batch 1, the default 60 epochs are 60 steps
(the paper's "60 epochs, 6 minutes on a 3090" implies several hundred steps per subject: raise ``epochs``).

Export: ``models/p3s/<export_name>.safetensors`` (model_patches/p3s_weights.py) for P3S Loader.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from image_ops import vision_features as vf
from image_ops.p3s_reference import encode_reference, mask_sha256, removed_negatives, square_resize
from model_patches import p3s_weights
from model_patches.p3s import (CURVES, ConsistencyRecord, P3SPatch, P3SSettings, attention_consistency_loss,
                               with_map_recording)
from model_patches.p3s_copy import InjectionCopy, layout_signature
from model_patches.p3s_rngr import DEFAULT_WIDTH, RNGREncoder
from model_patches.unet_layout import transformer_slots

from .base_model import BaseModelError, load_vision_encoder
from .config import ConfigError, TrainConfig, option
from .diffusion import TextCache, draw_sigmas, implied_noise, noised
from .distributed import mix_seed
from .engine import run
from .manifest import FieldSpec, ManifestSchema
from .method import TrainContext, TrainingMethod

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MANIFEST_SCHEMA = ManifestSchema(
    fields={"image": FieldSpec("image"), "positive_points": FieldSpec("text", False),
            "negative_points": FieldSpec("text", False), "negatives_mask": FieldSpec("mask", False),
            "inpainted": FieldSpec("image", False)},
    same_size=(("image", "negatives_mask", "inpainted"),))


@dataclass
class P3SConfig(TrainConfig):
    """P3S: injection copy + RNGR encoder for one subject of one photo (exports models/p3s weights)."""

    clip_vision: str = option("", "CLIP ViT vision weights (.safetensors) as ComfyUI's Load CLIP Vision reads them "
                              "(the paper: CLIP ViT-L/14)")
    clip_vision_config: str = option("", "JSON config of ComfyUI's CLIP vision for other sizes than the stock ones")
    identifier: str = option("sks", "the rare token that names the subject ([V] in the paper)")
    class_word: str = option("", "the subject's class word, e.g. dog")
    prompt_template: str = option("a photo of {identifier} {class_word}", "the training prompt")
    epochs: int = option(60, "passes over the rows (sets steps; 0 = use steps)", minimum=0)
    resolution: int = option(512, "side of the square training image (a multiple of 8)", minimum=8)
    clip_size: int = option(224, "CLIP input side for c_s (a multiple of the patch)", minimum=14)
    encoder_size: int = option(224, "CLIP input side of the point → mask selection", minimum=14)
    blur_sigma: float = option(1.0, "point mask: Gaussian sigma in patches", minimum=0.0)
    mask_dilation_px: int = option(0, "point mask: dilation in pixels", minimum=0)
    condition_dropout: float = option(0.1, "probability of training a sample with the empty prompt", minimum=0.0)
    consistency_weight: float = option(0.1, "γ of L = L_LDM + γ·L_ac", minimum=0.0)
    consistency_layers: str = option("last", "cross-attention layers of L_ac (Table IV)", choices=("last", "all"))
    lam: float = option(0.2, "λ of Eq. 7", minimum=0.0)
    train_curve: str = option("fixed", "ε_t during training (the paper schedules it at inference)",
                              choices=CURVES)
    cross_attention: bool = option(True, "train the cross-attention enhancement too")
    rngr_width: int = option(DEFAULT_WIDTH, "query/key width of the RNGR attention", minimum=1)
    export_dtype: str = option("fp16", "dtype of the exported copy", choices=tuple(EXPORT_DTYPES))
    validation_prompts: list[str] = option([], "prompts of the validation images ({identifier}/{class_word} filled)")
    validation_steps: int = option(20, "sampling steps of a validation image", minimum=1)
    validation_cfg: float = option(7.5, "CFG of the validation images", minimum=0.0)

    def check(self) -> list[str]:
        problems = super().check()
        if not self.clip_vision:
            problems.append("clip_vision is required (a CLIP ViT vision file)")
        if not self.class_word:
            problems.append("class_word is required (e.g. dog): the prompt is 'a photo of sks dog'")
        if self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.condition_dropout > 1:
            problems.append(f"condition_dropout must be <= 1, got {self.condition_dropout}")
        return problems

    @property
    def prompt(self) -> str:
        return self.prompt_template.format(identifier=self.identifier, class_word=self.class_word)


def load_clip_vision(path, config_path: str = ""):
    """ComfyUI's CLIP_VISION (frozen), as the stock loader or from ``config_path``'s architecture."""
    return load_vision_encoder(path, config_path, vf.CLIP, "the P3S trainer", what="CLIP vision file",
                               config_option="clip_vision_config")


def load_pixels(path) -> torch.Tensor:
    """An RGB image file as [3, H, W] float 0..1 (no resizing: the points are in its pixels)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).movedim(-1, 0)


def load_mask(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


def negatives_mask_from_points(clip_vision, pixels: torch.Tensor, positive_text: str, negative_text: str, *,
                               encoder_size: int = 224, blur_sigma: float = 1.0, dilation_px: int = 0):
    """(negatives mask [H, W] or None, the parsed (positives, negatives)) — the look-alike's own mask from the
    point-to-mask helper: the negative points are its clicks, the positive points its exclusions."""
    from image_ops.point_mask import select_subject
    from image_ops.point_parsing import PIXELS, batch_points

    height, width = pixels.shape[-2:]
    positives, negatives = batch_points(positive_text or "", negative_text or "", 1, width, height, PIXELS)[0]
    if not negatives or not positives:  # the helper needs a positive point; no look-alike marked: nothing to do
        return None, (positives, negatives)
    mask = select_subject(clip_vision, pixels, negatives, positives, encoder_size=encoder_size,
                          blur_sigma=blur_sigma, dilation_px=dilation_px)
    return mask, (positives, negatives)


class SubjectDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"index": index}


class P3SMethod(TrainingMethod):
    name = p3s_weights.METHOD
    format_version = p3s_weights.FORMAT_VERSION
    config_class = P3SConfig
    manifest_schema = MANIFEST_SCHEMA

    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        cfg = self.config
        self.clip_vision = load_clip_vision(cfg.clip_vision, cfg.clip_vision_config)
        info = vf.describe(self.clip_vision)
        self.copy = InjectionCopy(ctx.base.patcher).to(ctx.device).float()
        self.rngr = RNGREncoder(clip_width=info.width, width=cfg.rngr_width).to(ctx.device)
        self.rngr.reset_parameters(torch.Generator().manual_seed(mix_seed(cfg.seed, "rngr")))
        slots = transformer_slots(ctx.base.patcher)
        self.record_slots = tuple(s.key for s in (slots if cfg.consistency_layers == "all" else slots[-1:]))
        self.texts = TextCache(ctx.base.clip)
        named = {f"copy.{n}": p for n, p in self.copy.named_parameters()}
        named.update({f"rngr.{n}": p for n, p in self.rngr.named_parameters()})
        return named

    def make_dataset(self, rows, ctx: TrainContext):
        cfg = self.config
        if len(rows) != 1:
            raise ConfigError(f"P3S trains one subject from one photo: the manifest has {len(rows)} rows, "
                              "expected 1")
        try:
            return self._prepare_reference(rows, ctx)
        except (vf.VisionModelError, ValueError) as e:  # points outside the photo, a mask of another size, …
            if isinstance(e, (ConfigError, BaseModelError)):
                raise
            raise ConfigError(f"manifest line {rows[0].get('_line', 1)}: {e}") from None

    def _prepare_reference(self, rows, ctx: TrainContext):
        cfg = self.config
        row = rows[0]
        pixels = load_pixels(row["image"])
        # the points are checked against the photo (and recorded) even when a ready mask replaces them
        mask, (positives, negatives) = negatives_mask_from_points(
            self.clip_vision, pixels, row.get("positive_points", ""),
            "" if row.get("negatives_mask") else row.get("negative_points", ""),
            encoder_size=cfg.encoder_size, blur_sigma=cfg.blur_sigma, dilation_px=cfg.mask_dilation_px)
        if row.get("negatives_mask"):
            mask = load_mask(row["negatives_mask"])
        inpainted = load_pixels(row["inpainted"]) if row.get("inpainted") else None
        self.reference_pixels = square_resize(removed_negatives(pixels, mask, inpainted), cfg.resolution)
        self.reference_latent, self.clip_states = encode_reference(self.reference_pixels, ctx.base.vae,
                                                                   ctx.base.model, self.clip_vision, cfg.clip_size)
        self.provenance = {"positive_points": [list(p) for p in positives],
                           "negative_points": [list(p) for p in negatives], "mask_sha256": mask_sha256(mask),
                           "negatives_removal": "inpainted" if inpainted is not None else
                           "opencv-telea" if mask is not None else "none"}
        self.patch = self.make_patch(ctx, strength=1.0, curve=cfg.train_curve)
        self.patched = ctx.base.patcher.clone()
        self.patch.install(self.patched)
        if cfg.epochs:
            cfg.steps = cfg.epochs * math.ceil(len(rows) / cfg.batch_size)
        return SubjectDataset(rows)

    def make_patch(self, ctx: TrainContext, **settings) -> P3SPatch:
        cfg = self.config
        return P3SPatch(self.copy, self.rngr, self.reference_latent.to(ctx.device), self.clip_states.to(ctx.device),
                        P3SSettings(lam=cfg.lam, cross_attention=cfg.cross_attention, **settings),
                        ctx.base.model.model_sampling)

    def forward(self, x_noisy, sigma, context, ctx: TrainContext):
        """(denoised prediction, ConsistencyRecord) of the patched UNet — the path P3S Apply samples with."""
        record = ConsistencyRecord(self.record_slots)
        options = with_map_recording(self.patched.model_options["transformer_options"], record)
        denoised = ctx.base.model.apply_model(x_noisy, sigma, c_crossattn=context, transformer_options=options)
        return denoised, record

    def training_loss(self, batch, ctx: TrainContext, rng):
        cfg, model = self.config, ctx.base.model
        rows = len(rng)
        x0 = self.reference_latent.to(ctx.device).expand(rows, -1, -1, -1)
        dropped = rng.bernoulli(cfg.condition_dropout).cpu()
        context = self.texts.batch(["" if d else cfg.prompt for d in dropped.tolist()], ctx.device)
        sigma = draw_sigmas(model, rng)
        noise = rng.randn(*x0.shape[1:])
        x_noisy = noised(model, x0, noise, sigma)
        denoised, record = self.forward(x_noisy, sigma, context, ctx)
        ldm = torch.nn.functional.mse_loss(implied_noise(x_noisy, denoised.float(), sigma), noise)
        lac = torch.stack([attention_consistency_loss(record.copy_maps[k]["map"], record.base_maps[k]["map"])
                           for k in self.record_slots]).mean()
        loss = ldm + cfg.consistency_weight * lac
        return loss, {"ldm": float(ldm.detach()), "l_ac": float(lac.detach()),
                      "condition_dropped": float(dropped.float().mean()), "sigma_mean": float(sigma.mean())}

    def validation_samples(self, ctx: TrainContext, step: int, generator: torch.Generator):
        import comfy.sample

        cfg, size = self.config, self.config.resolution // 8
        patched = ctx.base.patcher.clone()
        self.make_patch(ctx, strength=1.0, curve="paper").install(patched)
        negative = [[self.texts("")[None], {}]]
        samples = []
        for i, prompt in enumerate(cfg.validation_prompts):
            text = prompt.format(identifier=cfg.identifier, class_word=cfg.class_word)
            latent = torch.zeros(1, 4, size, size)
            noise = torch.randn(latent.shape, generator=generator)
            out = comfy.sample.sample(patched, noise, cfg.validation_steps, cfg.validation_cfg, "ddim",
                                      "ddim_uniform", [[self.texts(text)[None], {}]], negative, latent,
                                      disable_pbar=True, seed=cfg.validation_seed + i)
            samples.append((f"prompt_{i:02d}", ctx.base.vae.decode(out)[0]))
        return samples

    def export(self, path, ctx: TrainContext):
        cfg = self.config
        tensors = p3s_weights.export_tensors(self.copy, self.rngr, self.reference_latent, self.clip_states,
                                             EXPORT_DTYPES[cfg.export_dtype])
        return ctx.save_export(path, tensors, copy_layout=layout_signature(ctx.base.patcher), **{"lambda": cfg.lam},
                               weight_curve="paper", alpha=0.5, beta=0.2, k=2.0, train_curve=cfg.train_curve,
                               identifier=cfg.identifier, class_word=cfg.class_word, prompt=cfg.prompt,
                               resolution=cfg.resolution, clip_size=cfg.clip_size,
                               clip_width=self.rngr.clip_width, rngr_width=self.rngr.width,
                               cross_attention=cfg.cross_attention, copy_dtype=cfg.export_dtype, **self.provenance)


METHOD = P3SMethod


def main(argv=None) -> int:
    return run(P3SMethod, argv)


if __name__ == "__main__":
    sys.exit(main())
