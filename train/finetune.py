"""Plain denoising fine-tune of an SD1.5 UNet on images with captions; exports a stock-loadable "diff" file.

    python -m train.finetune --config finetune.yaml --set steps=2000
    torchrun --nproc_per_node=2 -m train.finetune --config finetune.yaml

Data: a manifest of ``{"image": "photos/a.png", "caption": "a photo of …"}`` rows (caption optional), or build
one from a folder of images with same-named ``.txt`` captions: ``python -m train.prepare_manifest FOLDER --out
FOLDER/manifest.jsonl --method finetune``. Images are resized (shorter side) and centre-cropped to
``resolution``.

Trains the attention projections (default), only the cross-attention ones, or the whole UNet, with the
epsilon-MSE objective and caption dropout. The export holds ``diffusion_model.<module>.diff`` (weight deltas)
and ``.diff_b`` (bias deltas) under ComfyUI's own key names, the form ComfyUI's LoRA loader applies as
``weight += strength * diff``: put it in ``models/loras`` and load it with the stock LoraLoaderModelOnly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .base_model import BaseModelError
from .config import TrainConfig, option
from .diffusion import LatentCache, TextCache, draw_sigmas, implied_noise, noised
from .engine import run
from .manifest import FieldSpec, ManifestSchema
from .method import TrainContext, TrainingMethod
from .prepare_manifest import Companion, FolderLayout

LAYER_SETS = {
    "attention": (".attn1.", ".attn2."),
    "cross_attention": (".attn2.",),
    "full": ("",),
}


@dataclass
class FinetuneConfig(TrainConfig):
    """Denoising fine-tune of an SD1.5 UNet (exports ComfyUI "diff" weights for LoraLoaderModelOnly)."""

    train_layers: str = option("attention", "which UNet weights train: the attention projections, only the "
                               "cross-attention ones, or all", choices=tuple(LAYER_SETS))
    resolution: int = option(512, "training images are resized and centre-cropped to this square size "
                             "(a multiple of 8)", minimum=8)
    caption_dropout: float = option(0.1, "probability of training a sample with an empty caption", minimum=0.0)
    cache_latents: bool = option(True, "encode each image once and keep its latent (64 kB per 512px image)")
    export_dtype: str = option("bf16", "dtype of the exported weight deltas", choices=("fp32", "bf16", "fp16"))
    validation_prompts: list[str] = option([], "prompts of the validation images")
    validation_steps: int = option(20, "sampling steps of a validation image", minimum=1)
    validation_cfg: float = option(7.0, "CFG scale of the validation images", minimum=0.0)
    validation_sampler: str = option("euler", "ComfyUI sampler name of the validation images")
    validation_scheduler: str = option("normal", "ComfyUI scheduler name of the validation images")

    def check(self) -> list[str]:
        problems = super().check()
        if self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.caption_dropout > 1:
            problems.append(f"caption_dropout must be <= 1, got {self.caption_dropout}")
        return problems


def load_square_image(path, size: int) -> torch.Tensor:
    """RGB ``[size, size, 3]`` float 0..1: shorter side resized to ``size`` (Lanczos), then centre-cropped."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        if scale != 1:
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.LANCZOS)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


class ImageCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], resolution: int):
        self.rows, self.resolution = rows, resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"index": index, "pixels": load_square_image(row["image"], self.resolution),
                "caption": row.get("caption") or ""}


def diff_key(param_name: str) -> str:
    """ComfyUI LoRA-file key of a weight/bias delta for a BaseModel parameter name."""
    if param_name.endswith(".weight"):
        return param_name[:-len(".weight")] + ".diff"
    if param_name.endswith(".bias"):
        return param_name[:-len(".bias")] + ".diff_b"
    raise ValueError(f"{param_name} is neither a weight nor a bias; ComfyUI's diff format cannot address it")


class FinetuneMethod(TrainingMethod):
    name = "finetune"
    format_version = 1
    config_class = FinetuneConfig
    manifest_schema = ManifestSchema(fields={"image": FieldSpec("image"), "caption": FieldSpec("text", False)})
    folder_layout = FolderLayout("image", (Companion("caption", (".txt",), "text"),))

    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        if ctx.base.in_channels != 4:
            raise BaseModelError(f"the finetune trainer needs a 4-channel SD1.5 UNet; {ctx.base.path.name} is "
                             f"{ctx.base.architecture}")
        markers = LAYER_SETS[self.config.train_layers]
        named = {n: p for n, p in ctx.base.model.named_parameters()
                 if n.startswith("diffusion_model.") and any(m in n for m in markers)}
        self.initial = {n: p.detach().float().cpu().clone() for n, p in named.items()}
        self.latents = LatentCache(ctx.base.vae, ctx.base.model, self.config.cache_latents)
        self.texts = TextCache(ctx.base.clip)
        return named

    def make_dataset(self, rows: list[dict], ctx: TrainContext):
        return ImageCaptionDataset(rows, self.config.resolution)

    def training_loss(self, batch, ctx: TrainContext, rng):
        model = ctx.base.model
        x0 = self.latents.batch(batch["index"], batch["pixels"], ctx.device)
        dropped = rng.bernoulli(self.config.caption_dropout).cpu()
        captions = ["" if d else c for d, c in zip(dropped.tolist(), batch["caption"])]
        context = self.texts.batch(captions, ctx.device)
        sigma = draw_sigmas(model, rng)
        noise = rng.randn(*x0.shape[1:])
        x_noisy = noised(model, x0, noise, sigma)
        denoised = model.apply_model(x_noisy, sigma, c_crossattn=context, transformer_options={})
        loss = torch.nn.functional.mse_loss(implied_noise(x_noisy, denoised.float(), sigma), noise)
        return loss, {"sigma_mean": float(sigma.mean()), "caption_dropped": float(dropped.float().mean())}

    def validation_samples(self, ctx: TrainContext, step: int, generator: torch.Generator):
        import comfy.sample

        cfg, size = self.config, self.config.resolution // 8
        negative = [[self.texts("")[None], {}]]
        samples = []
        for i, prompt in enumerate(cfg.validation_prompts):
            latent = torch.zeros(1, 4, size, size)
            noise = torch.randn(latent.shape, generator=generator)
            out = comfy.sample.sample(ctx.base.patcher, noise, cfg.validation_steps, cfg.validation_cfg,
                                      cfg.validation_sampler, cfg.validation_scheduler,
                                      [[self.texts(prompt)[None], {}]], negative, latent, disable_pbar=True,
                                      seed=cfg.validation_seed + i)
            samples.append((f"prompt_{i:02d}", ctx.base.vae.decode(out)[0]))
        return samples

    def export(self, path, ctx: TrainContext):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.config.export_dtype]
        tensors = {diff_key(n): (p.detach().float().cpu() - self.initial[n]).to(dtype)
                   for n, p in ctx.base.model.named_parameters() if n in self.initial}
        return ctx.save_export(path, tensors, train_layers=self.config.train_layers,
                               diff_dtype=self.config.export_dtype, loader="LoraLoaderModelOnly")


METHOD = FinetuneMethod


def main(argv=None) -> int:
    return run(FinetuneMethod, argv)


if __name__ == "__main__":
    sys.exit(main())
