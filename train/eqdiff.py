"""EqDiff trainer: one subject's band tokens, cross-attention K/V and residual reference attention.

    python -m train.prepare_manifest PHOTOS --out PHOTOS/manifest.jsonl --method eqdiff
    python -m train.eqdiff --config train/configs/eqdiff_sd15.yaml --manifest PHOTOS/manifest.jsonl \
        --class_word cat --export_name my_cat
    torchrun --nproc_per_node=2 -m train.eqdiff ...

Each sample (seed 001 §4, official train.sh defaults): a band drawn 0.1/0.1/0.8 (FDTE, Eq. 5) picks the
low-pass, high-pass (the official grayscale FFT bands, ``image_ops.frequency.paper_split``) or original photo
and its token (S*_LF, S*_HF or their sum) at the placeholder of ``instance_prompt``; the latent is noised only
inside the 5×-dilated subject mask (MGDP, Eq. 6) and the loss is masked and area-normalised (Eq. 7); another
photo of the subject, noised with the same noise at t − 2, runs through the same UNet as the reference whose
middle/decoder self-attention inputs feed RRA (Eq. 8–9) (``reference_noise: independent``, not official, gives
the reference its own noise draw instead). Each sample brings one class image (prior
preservation, full mask, weight 1.0). Losses: instance + prior + 0.1·cross-attention (placeholder map vs subject
mask) + 0.1·reference attention (Eq. 10), both at the 1/4-latent grid (16×16 at 512 px).

What trains: the two 768-d band tokens (both initialised from ``init_word``'s embedding, as the official
code), attn2 to_k/to_v of every transformer (Custom Diffusion, gradient blocked at the start token), and the
RRA layers. Exports (file names from ``export_name``):

* ``<out>/<name>.safetensors`` — the RRA weights, for EqDiff Loader (models/eqdiff);
* ``<out>/embeddings/<name>.safetensors`` (+ ``_low``, ``_high``) — ``{"clip_l": [1, 768]}``, used as
  ``embedding:<name>`` in the stock CLIPTextEncode (models/embeddings);
* ``<out>/loras/<name>_kv.safetensors`` — ``diffusion_model.….attn2.to_k/to_v.diff`` weight differences for the
  stock LoraLoaderModelOnly (models/loras).

The reference pass is the trained UNet itself (K/V included), not a frozen copy of the base as in the official
code: at sampling, ComfyUI has one MODEL, and the node runs the reference through it — the trainer does the
same so that what is trained is what is sampled.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from image_ops.frequency import paper_split
from model_patches.custom_diffusion import (TokenMapRecorder, cross_attention_replacements, diff_key,
                                            kv_parameter_names)
from model_patches.eqdiff import REFERENCE_TIME_GAP
from model_patches.eqdiff_mask import dilate, latent_mask, masked_loss, mgdp_input
from model_patches.eqdiff_rra import (RRAModules, ReferenceRecorder, install_rra, reference_input, rra_slots)
from model_patches import eqdiff_tokens as fdte
from model_patches.weight_files import save_weights

from .base_model import BaseModelError
from .config import ConfigError, TrainConfig, option
from .diffusion import LatentCache, TextCache, implied_noise, noised
from .eqdiff_data import SubjectDataset, class_images, ensure_class_images, mask_from_points
from .eqdiff_step import (cross_attention_loss, eqdiff_forward, grid_mask, loss_grid, reference_attention_loss)
from .engine import run
from .manifest import FieldSpec, ManifestSchema
from .method import TrainContext, TrainingMethod
from .prepare_manifest import Companion, FolderLayout


@dataclass
class EqDiffConfig(TrainConfig):
    """EqDiff: frequency-decoupled subject tokens, mask-guided training and residual reference attention."""

    class_word: str = option("", "the subject's class, e.g. 'cat' (prior prompt and default init word)")
    placeholder: str = option("sks", "rare one-token word standing for the subject in instance_prompt")
    instance_prompt: str = option("", "training prompt with the placeholder (default 'photo of a <placeholder> "
                                      "<class_word>')")
    init_word: str = option("", "one-token word whose embedding initialises both band tokens (default: "
                                "class_word)")
    class_prompt: str = option("", "prompt of the class images (default: class_word, as the official code)")
    prior_dir: str = option("", "folder of class images (default <output_dir>/class_images); missing ones are "
                                "generated with the base model")
    num_class_images: int = option(200, "class images used for prior preservation", minimum=1)
    prior_weight: float = option(1.0, "weight of the prior-preservation loss", minimum=0.0)
    prior_steps: int = option(25, "sampling steps of a generated class image", minimum=1)
    prior_cfg: float = option(7.5, "CFG scale of the generated class images", minimum=0.0)
    resolution: int = option(512, "training side in pixels (a multiple of 64)", minimum=64)
    band_probabilities: list[float] = option([0.1, 0.1, 0.8], "p_l, p_h, p_o of Eq. 5")
    dilation: int = option(5, "max-pool iterations on the latent subject mask (MGDP)", minimum=0)
    dilation_kernel: int = option(5, "window of each dilation max-pool (official 5x5; odd)", minimum=1)
    reference_noise: str = option("same", "noise of the training reference at t - 2: 'same' as the target's "
                                          "(official) or 'independent' (its own draw)",
                                  choices=("same", "independent"))
    cross_attention_weight: float = option(0.1, "weight of the placeholder cross-attention loss", minimum=0.0)
    reference_attention_weight: float = option(0.1, "weight of the reference attention loss (Eq. 10)",
                                               minimum=0.0)
    steps: int = option(600, "optimizer steps (official: 600)", minimum=1)
    batch_size: int = option(2, "subject images per step (each brings one class image)", minimum=1)
    learning_rate: float = option(4e-5, "AdamW lr: the official 1e-5 scaled by batch 2 and prior x2", minimum=0.0)
    export_dtype: str = option("fp32", "dtype of the K/V differences", choices=("fp32", "bf16", "fp16"))
    clip_vision: str = option("", "CLIP ViT vision file (as Load CLIP Vision reads it) for manifest rows that give "
                                  "positive_points / negative_points instead of a mask")
    clip_vision_config: str = option("", "JSON config of ComfyUI's CLIP vision for other sizes than the stock ones")
    encoder_size: int = option(224, "CLIP input side of the point → mask selection", minimum=14)
    blur_sigma: float = option(1.0, "point mask: Gaussian sigma in patches", minimum=0.0)

    def check(self) -> list[str]:
        problems = super().check()
        if not self.class_word:
            problems.append("class_word is required (e.g. --class_word cat)")
        if self.resolution % 64:
            problems.append(f"resolution must be a multiple of 64, got {self.resolution}")
        p = self.band_probabilities
        if len(p) != 3 or any(x < 0 for x in p) or abs(sum(p) - 1) > 1e-6:
            problems.append(f"band_probabilities must be three non-negative numbers summing to 1, got {p}")
        prompt = self.resolved_instance_prompt()
        if self.placeholder and self.placeholder not in prompt.split():
            problems.append(f"instance_prompt {prompt!r} does not contain the placeholder {self.placeholder!r}")
        if self.dilation_kernel % 2 == 0:
            problems.append(f"dilation_kernel must be odd, got {self.dilation_kernel}")
        if self.gradient_checkpointing:
            problems.append("gradient_checkpointing is not supported by the EqDiff trainer")
        return problems

    def resolved_instance_prompt(self) -> str:
        return self.instance_prompt or f"photo of a {self.placeholder} {self.class_word}"


def image_digest(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class EqDiffMethod(TrainingMethod):
    name = "eqdiff"
    format_version = 1
    config_class = EqDiffConfig
    manifest_schema = ManifestSchema(fields={"image": FieldSpec("image"), "mask": FieldSpec("mask", False),
                                             "positive_points": FieldSpec("text", False),
                                             "negative_points": FieldSpec("text", False)},
                                     same_size=(("image", "mask"),))
    folder_layout = FolderLayout("image", (Companion("mask", ("_mask.png", "_mask.jpg")),))

    # ---- setup ----------------------------------------------------------------------------------------------
    def build(self, ctx: TrainContext) -> dict[str, torch.nn.Parameter]:
        import comfy.sd

        cfg = self.config
        if ctx.base.in_channels != 4:
            raise BaseModelError(f"EqDiff trains a 4-channel SD1.5 UNet; {ctx.base.path.name} is "
                                 f"{ctx.base.architecture}")
        # the text encoder in fp32: a token's gradient underflows in ComfyUI's default fp16 CLIP
        ctx.base.clip = comfy.sd.load_checkpoint_guess_config(
            str(ctx.base.path), output_vae=False, output_model=False,
            te_model_options={"dtype": torch.float32})[1]
        self.clip = ctx.base.clip
        try:
            self.placeholder_positions = fdte.placeholder_positions(self.clip, cfg.resolved_instance_prompt(),
                                                                    cfg.placeholder)
            init = fdte.init_vector(self.clip, cfg.init_word or cfg.class_word)
        except fdte.PlaceholderError as e:
            raise ConfigError(str(e)) from None
        self.tokens = torch.nn.Parameter(torch.stack([init, init.clone()]).to(ctx.device))
        self.initial_tokens = self.tokens.detach().cpu().clone()
        self.slots = rra_slots(ctx.base.patcher)
        self.rra = RRAModules.for_model(ctx.base.patcher, self.slots).to(ctx.device)
        self.kv_names = kv_parameter_names(ctx.base.model)
        params = dict(ctx.base.model.named_parameters())
        self.initial_kv = {n: params[n].detach().float().cpu().clone() for n in self.kv_names}
        # the hooks the node installs, plus the training-only K/V cross-attention
        patcher = ctx.base.patcher.clone()
        install_rra(patcher, self.slots)
        for key, replacement in cross_attention_replacements(patcher).items():
            patcher.set_model_attn2_replace(replacement, *key)
        self.transformer_options = patcher.model_options["transformer_options"]
        self.latents = LatentCache(ctx.base.vae, ctx.base.model)
        self.texts = TextCache(self.clip)
        self.grid = None
        self._load_class_images(ctx)
        named = {"tokens": self.tokens}
        named.update({f"rra.{k}": p for k, p in self.rra.named_parameters()})
        named.update({n: params[n] for n in self.kv_names})
        return named

    def _load_class_images(self, ctx: TrainContext) -> None:
        from . import distributed
        from .finetune import load_square_image

        cfg = self.config
        folder = Path(cfg.prior_dir) if cfg.prior_dir else Path(cfg.output_dir) / "class_images"
        if ctx.dist.is_main and len(class_images(folder)) < cfg.num_class_images:
            ensure_class_images(folder, cfg.num_class_images, patcher=ctx.base.patcher, clip=self.clip,
                                vae=ctx.base.vae, prompt=cfg.class_prompt or cfg.class_word,
                                resolution=cfg.resolution, steps=cfg.prior_steps, cfg=cfg.prior_cfg,
                                seed=cfg.validation_seed)
        distributed.barrier(ctx.dist)
        paths = class_images(folder)[:cfg.num_class_images]
        self.class_pixels = [load_square_image(p, cfg.resolution) for p in paths]

    def make_dataset(self, rows: list[dict], ctx: TrainContext):
        point_masks = self._masks_from_points(rows)
        self._dataset = SubjectDataset(rows, self.config.resolution, point_masks)  # the reference draws read it
        return self._dataset

    def _masks_from_points(self, rows: list[dict]) -> dict[int, torch.Tensor]:
        """Masks of the rows that give clicked points and no mask file (Points to Mask's helper, CLIP vision)."""
        from image_ops import vision_features as vf
        from image_ops.point_parsing import PointsError

        from .base_model import load_vision_encoder

        cfg = self.config
        wanted = [i for i, r in enumerate(rows)
                  if not r.get("mask") and (r.get("positive_points") or r.get("negative_points"))]
        if not wanted:
            return {}
        if not cfg.clip_vision:
            raise ConfigError(f"manifest line {rows[wanted[0]].get('_line', wanted[0] + 1)} gives points instead "
                              "of a mask: clip_vision is required (a CLIP ViT vision file) to make the mask")
        vision = load_vision_encoder(cfg.clip_vision, cfg.clip_vision_config, vf.CLIP, "the EqDiff trainer",
                                     what="CLIP vision file", config_option="clip_vision_config")
        masks = {}
        for i in wanted:
            row = rows[i]
            try:
                masks[i] = mask_from_points(vision, row["image"], row.get("positive_points", ""),
                                            row.get("negative_points", ""), encoder_size=cfg.encoder_size,
                                            blur_sigma=cfg.blur_sigma)
            except (PointsError, vf.VisionModelError, ValueError) as e:
                raise ConfigError(f"manifest line {row.get('_line', i + 1)} ({Path(row['image']).name}): {e}") \
                    from None
        return masks

    # ---- one step -------------------------------------------------------------------------------------------
    def band_latent(self, index: int, pixels: torch.Tensor, band: int) -> torch.Tensor:
        if band == fdte.ORIGINAL:
            return self.latents(("subject", index, band), pixels)
        low, high = paper_split(pixels.movedim(-1, 0)[None])
        return self.latents(("subject", index, band), (low if band == fdte.LOW else high)[0].movedim(0, -1))

    def training_loss(self, batch, ctx: TrainContext, rng):
        cfg, model = self.config, ctx.base.model
        device = ctx.device
        indices = [int(i) for i in batch["index"]]
        n = len(indices)
        bands = [fdte.draw_band(g, tuple(cfg.band_probabilities)) for g in rng.generators]
        x0 = torch.stack([self.band_latent(i, p, b) for i, p, b in zip(indices, batch["pixels"], bands)]).to(device)
        hw = tuple(x0.shape[-2:])
        mask = batch["mask"].to(device)
        subject_cells = dilate(latent_mask(mask, hw), cfg.dilation, cfg.dilation_kernel)
        t = rng.randint(0, len(model.model_sampling.sigmas))
        sigma = model.model_sampling.sigmas.to(device)[t].float()
        noise = rng.randn(*x0.shape[1:])
        x_in = mgdp_input(noised(model, x0, noise, sigma), x0, subject_cells)

        # the reference: another photo of the subject (itself when there is one), same noise at t − 2
        offsets = rng.randint(1, max(2, self.dataset_len))  # 1 .. len-1: never the sample's own photo
        ref_indices = ([(i + int(o)) % self.dataset_len for i, o in zip(indices, offsets)] if self.dataset_len > 1
                       else indices)
        ref_items = [self.dataset_item(j) for j in ref_indices]
        ref0 = torch.stack([self.latents(("subject", j, fdte.ORIGINAL), item["pixels"])
                            for j, item in zip(ref_indices, ref_items)]).to(device)
        ref_mask = torch.stack([item["mask"] for item in ref_items]).to(device)

        # prior preservation: one class image per sample, full mask
        prior_index = rng.randint(0, len(self.class_pixels))
        prior0 = torch.stack([self.latents(("class", int(k)), self.class_pixels[int(k)])
                              for k in prior_index]).to(device)
        prior_t = rng.randint(0, len(model.model_sampling.sigmas))
        prior_sigma = model.model_sampling.sigmas.to(device)[prior_t].float()
        prior_noise = rng.randn(*x0.shape[1:])
        prior_x = noised(model, prior0, prior_noise, prior_sigma)
        # drawn after every official draw, so the default ('same') keeps the official draws and their order
        ref_noise = noise if cfg.reference_noise == "same" else rng.randn(*x0.shape[1:])
        ref_x, ref_sigma = reference_input(model, ref0, sigma, "training", noise=ref_noise, gap=REFERENCE_TIME_GAP)

        prompt = cfg.resolved_instance_prompt()
        contexts = [fdte.encode_with_vector(self.clip, prompt, cfg.placeholder, fdte.band_token(self.tokens, b))
                    for b in bands]
        context = torch.cat(contexts).to(device)
        prior_context = self.texts.batch([cfg.class_prompt or cfg.class_word] * n, device)

        grid = loss_grid(hw, self.slots)
        recorder = ReferenceRecorder(foreground={grid[0] * grid[1]: grid_mask(ref_mask, grid).repeat(2, 1)})
        position = self.placeholder_positions[0]
        token_maps = TokenMapRecorder([position] * n + [None] * n)
        out = eqdiff_forward(model, self.transformer_options, self.slots, self.rra,
                             torch.cat([x_in, prior_x]), torch.cat([sigma, prior_sigma]),
                             torch.cat([context, prior_context]), ref_x, ref_sigma, context,
                             recorder=recorder, token_maps=token_maps)
        eps = implied_noise(torch.cat([x_in, prior_x]), out.float(), torch.cat([sigma, prior_sigma]))
        instance = masked_loss(eps[:n], noise, subject_cells).mean()
        prior = torch.nn.functional.mse_loss(eps[n:], prior_noise)
        ca = cross_attention_loss(token_maps, mask, grid)
        ra = reference_attention_loss(recorder, mask, n)
        loss = (instance + cfg.prior_weight * prior + cfg.cross_attention_weight * ca
                + cfg.reference_attention_weight * ra)
        counts = torch.bincount(torch.tensor(bands), minlength=3).float() / n
        return loss, {"instance_loss": float(instance.detach()), "prior_loss": float(prior.detach()),
                      "cross_attention_loss": float(ca.detach()), "reference_attention_loss": float(ra.detach()), "band_low": float(counts[0]),
                      "band_high": float(counts[1]), "sigma_mean": float(sigma.mean())}

    @property
    def dataset_len(self) -> int:
        return len(self._dataset)

    def dataset_item(self, index: int) -> dict:
        return self._dataset[index]

    # ---- export ---------------------------------------------------------------------------------------------
    def export(self, path, ctx: TrainContext):
        return export_files(self, Path(path), ctx)


def export_paths(path: Path) -> dict[str, Path]:
    """Where one export's files go: the RRA file at ``path``, the others in embeddings/ and loras/ beside it."""
    stem, folder = path.stem, path.parent
    return {"eqdiff": path, "embedding": folder / "embeddings" / f"{stem}.safetensors",
            "embedding_low": folder / "embeddings" / f"{stem}_low.safetensors",
            "embedding_high": folder / "embeddings" / f"{stem}_high.safetensors",
            "lora": folder / "loras" / f"{stem}_kv.safetensors"}


def export_files(method: EqDiffMethod, path: Path, ctx: TrainContext, paths: dict | None = None) -> Path:
    """Write the five files (each atomically); the RRA file last, so its presence means a complete export."""
    cfg = method.config
    paths = paths or export_paths(path)
    stem = paths["embedding"].stem
    for suffix, tensors in fdte.embedding_files(method.tokens).items():
        save_weights(paths["embedding" + {"": "", "_low": "_low", "_high": "_high"}[suffix]], tensors,
                     {"method": "eqdiff-embedding", "band": suffix.strip("_") or "original",
                      "placeholder": cfg.placeholder, "class_word": cfg.class_word})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.export_dtype]
    params = dict(ctx.base.model.named_parameters())
    kv = {diff_key(n): (params[n].detach().float().cpu() - method.initial_kv[n]).to(dtype) for n in method.kv_names}
    save_weights(paths["lora"], kv, {"method": "eqdiff-kv", "loader": "LoraLoaderModelOnly",
                                     "base_hash": f"sha256:{ctx.base.sha256}"})
    tensors = {f"rra.{k}": v.detach().float().cpu() for k, v in method.rra.state_dict().items()}
    reference_hashes = sorted({image_digest(method.dataset_item(i)["pixels"]) for i in range(method.dataset_len)})
    return ctx.save_export(paths["eqdiff"], tensors, layers=json.dumps([s.name for s in method.slots]),
                           embedding=stem, embedding_low=f"{stem}_low", embedding_high=f"{stem}_high",
                           lora=paths["lora"].name, placeholder=cfg.placeholder, class_word=cfg.class_word,
                           instance_prompt=cfg.resolved_instance_prompt(), reference_mode="training (t-2) / "
                           "inference: clean", reference_time_gap=str(REFERENCE_TIME_GAP),
                           reference_image_hashes=json.dumps(reference_hashes))


METHOD = EqDiffMethod


def main(argv=None) -> int:
    return run(EqDiffMethod, argv)


if __name__ == "__main__":
    sys.exit(main())
