"""A pretrained micro base for the per-subject methods (EqDiff, P3S), which fine-tune or steer a base that already
generates the class: the 4-channel micro UNet with the micro text encoder, trained once as a text-to-image
denoiser of the class "toy" (textured glyphs of the training index range on smooth backgrounds, 16 px scenes).

The pretraining is plain EPS denoising through ComfyUI's model (``apply_model``, the SD1.5 schedule), the pack's
``train.diffusion`` helpers for the noising, AdamW; 10 % of the captions are dropped to "" so the base has an
unconditional branch for CFG. The result is cached as one file per settings (a second miniature, or a rerun,
loads it: every seed and arm of a miniature forks from the same base).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from . import subjects as S
from .micro_models import build_micro_model, build_micro_text_encoder

CLASS_WORD = "toy"             # one token in CLIP's tokenizer (the EqDiff trainer's init word must be)
CLASS_PROMPT = f"a photo of a {CLASS_WORD}"
BASE_SETTINGS = dict(steps=2000, batch=16, lr=1e-3, seed=0, dropout=0.1, subjects=2000)


def class_scene(index: int, stream_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [1, 16, 16] in -1..1, subject mask) of class image ``index``: a training-range textured glyph on
    its own background at an even position."""
    rng = torch.Generator().manual_seed(stream_seed * 1_000_003 + index)
    y, x = (int(v) * S.BLOCK for v in torch.randint(0, (S.SCENE_PX - S.SUBJECT_PX) // S.BLOCK + 1, (2,), generator=rng))
    glyph = S.textured_subject(S.TRAIN_SUBJECTS[index % BASE_SETTINGS["subjects"]])
    scene = S.place(S.background(5_000_000 + index), glyph, y, x)
    return scene, S.box_mask(scene.shape[-2:], y, x)


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_base(cache_dir: Path | str, *, device="cpu", log=print, **overrides):
    """(BaseModel, ModelPatcher, CLIP) of the pretrained micro base (trained now if not cached)."""
    settings = {**BASE_SETTINGS, **overrides}
    path = Path(cache_dir) / f"micro_base_{_key(settings)}.safetensors"
    model, patcher = build_micro_model(seed=settings["seed"], inpainting=False, device=device)
    clip = build_micro_text_encoder(seed=settings["seed"], device=device)
    if path.exists():
        import safetensors.torch

        model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(path)))
        model.diffusion_model.requires_grad_(False)
        return model, patcher, clip
    _pretrain(model, clip, settings, torch.device(device), log)
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.diffusion_model.state_dict().items()},
                                str(tmp), {"settings": json.dumps(settings)})
    tmp.replace(path)
    return model, patcher, clip


def _pretrain(model, clip, settings: dict, device, log) -> None:
    from train.diffusion import implied_noise, noised

    with torch.no_grad():
        texts = {c: clip.encode_from_tokens(clip.tokenize(c)).float().to(device) for c in (CLASS_PROMPT, "")}
    pool = torch.stack([S.space_to_depth(class_scene(i)[0]) for i in range(4 * settings["subjects"])])
    params = list(model.diffusion_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(settings["seed"] + 77)
    sigmas = model.model_sampling.sigmas.float()
    started, window = time.perf_counter(), []
    for step in range(1, settings["steps"] + 1):
        index = torch.randint(0, len(pool), (settings["batch"],), generator=gen)
        t = torch.randint(0, len(sigmas), (settings["batch"],), generator=gen)
        noise = torch.randn((settings["batch"],) + tuple(pool.shape[1:]), generator=gen).to(device)
        dropped = (torch.rand(settings["batch"], generator=gen) < settings["dropout"]).to(device)
        context = torch.where(dropped.view(-1, 1, 1), texts[""], texts[CLASS_PROMPT])
        x0, sigma = pool[index].to(device), sigmas[t].to(device)
        x = noised(model, x0, noise, sigma)
        loss = torch.nn.functional.mse_loss(implied_noise(x, model.apply_model(x, sigma, c_crossattn=context), sigma),
                                            noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        if step % 500 == 0 or step == settings["steps"]:
            log(f"  micro base step {step}: loss {sum(window) / len(window):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            window = []
    model.diffusion_model.requires_grad_(False)
