"""The P3S weight file (``models/p3s/*.safetensors``): what ``python -m train.p3s`` exports and P3S Loader reads.

Tensors:
  ``copy.<key>``      the injection copy (its ResNet blocks, transformers, zero-initialised projections and
                      ``copy.gates``, one self-attention gate per slot), under the module names of
                      ``InjectionCopy`` built from the base UNet;
  ``rngr.<key>``      the RNGR encoder (Z, W_Q, W_K, W_V of Eq. 4/5);
  ``reference.latent`` / ``reference.clip_states``   the training reference ``I'`` (model-space latent, negatives
                      removed) and its CLIP last hidden state ``c_s``, so P3S Apply works without re-wiring the
                      photo and reproduces the trainer's forward exactly.
Metadata: method "p3s", format_version, base_architecture, copy_layout (the base's transformer slots, JSON),
lambda, weight_curve/alpha/beta/k used in training, identifier, class_word, prompt, positive_points,
negative_points, mask_sha256, resolution, clip_width, rngr_width, plus the engine's base_hash/config/steps.

Format version 2 added ``copy.gates``. A version-1 file (trained without gates, i.e. with the plain Eq. 8) loads
with every gate at 1, which is exactly the attention it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .p3s_copy import InjectionCopy, layout_signature
from .p3s_rngr import RNGREncoder
from .weight_files import (WeightFileError, load_weights, metadata_json, require_architecture_of, require_keys,
                           require_supported_architecture, require_usable_tensors, save_weights)

METHOD = "p3s"
FORMAT_VERSION = 2
GATES = "gates"
COPY, RNGR, REFERENCE = "copy.", "rngr.", "reference."


@dataclass
class P3SWeights:
    copy_state: dict[str, torch.Tensor]
    rngr: RNGREncoder
    reference_latent: torch.Tensor
    clip_states: torch.Tensor
    metadata: dict[str, str]
    name: str = ""

    @property
    def architecture(self) -> str:
        return self.metadata.get("base_architecture", "")

    @property
    def lam(self) -> float:
        return float(metadata_json(self.metadata, "lambda", 0.2))

    @property
    def clip_width(self) -> int:
        return self.rngr.clip_width


def export_tensors(copy: InjectionCopy, rngr: RNGREncoder, reference_latent: torch.Tensor,
                   clip_states: torch.Tensor, dtype=torch.float32) -> dict[str, torch.Tensor]:
    tensors = {COPY + k: v.detach().to(dtype) for k, v in copy.state_dict().items()}
    tensors.update({RNGR + k: v.detach().float() for k, v in rngr.state_dict().items()})
    tensors[REFERENCE + "latent"] = reference_latent.detach().float()
    tensors[REFERENCE + "clip_states"] = clip_states.detach().float()
    return tensors


def save_p3s_weights(path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    return save_weights(path, tensors, {**metadata, "method": METHOD, "format_version": str(FORMAT_VERSION)})


def load_p3s_weights(path) -> P3SWeights:
    tensors, metadata = load_weights(path, method=METHOD, supported_version=FORMAT_VERSION)
    name = Path(path).name
    require_supported_architecture(metadata, name, "P3S")
    rngr_keys = [RNGR + k for k in ("z.weight", "z.bias", "to_q.weight", "to_k.weight", "to_v.weight")]
    require_keys(tensors, rngr_keys + [REFERENCE + "latent", REFERENCE + "clip_states"], name)
    if not any(k.startswith(COPY) for k in tensors):
        raise WeightFileError(f"{name} holds no injection copy (no 'copy.*' tensors); re-export it with "
                              "python -m train.p3s")
    require_usable_tensors(tensors, name)
    latent, states = tensors[REFERENCE + "latent"], tensors[REFERENCE + "clip_states"]
    if latent.ndim != 4 or latent.shape[:2] != (1, 4) or states.ndim != 3 or states.shape[0] != 1:
        raise WeightFileError(f"{name}: reference tensors have shapes {list(latent.shape)} and {list(states.shape)}; "
                              "expected [1, 4, h, w] and [1, tokens, width]")
    z, to_k = tensors[RNGR + "z.weight"], tensors[RNGR + "to_k.weight"]
    rngr = RNGREncoder(clip_width=to_k.shape[1], width=z.shape[0])
    try:
        rngr.load_state_dict({k[len(RNGR):]: v.float() for k, v in tensors.items() if k.startswith(RNGR)})
    except RuntimeError as e:
        raise WeightFileError(f"{name}: the RNGR encoder tensors do not fit together ({e})") from None
    if states.shape[-1] != rngr.clip_width:
        raise WeightFileError(f"{name}: the stored CLIP states are {states.shape[-1]}-wide but the RNGR encoder "
                              f"reads {rngr.clip_width}")
    rngr.requires_grad_(False).eval()
    copy_state = {k[len(COPY):]: v for k, v in tensors.items() if k.startswith(COPY)}
    return P3SWeights(copy_state, rngr, latent.float(), states.float(), metadata, name)


def copy_for_model(weights: P3SWeights, model_patcher) -> InjectionCopy:
    """The injection copy of ``weights`` built for this MODEL, or a clear error when it does not fit."""
    require_architecture_of(model_patcher, weights.architecture, weights.name,
                            "load the checkpoint it was trained from")
    stored = metadata_json(weights.metadata, "copy_layout")
    if stored is not None and stored != layout_signature(model_patcher):
        raise WeightFileError(f"{weights.name} holds a copy for a UNet with {len(stored)} transformer layers "
                              f"{_names(stored)}; this MODEL has {_names(layout_signature(model_patcher))}. It "
                              "was trained on another UNet layout")
    copy = InjectionCopy(model_patcher)
    own = copy.state_dict()
    state = dict(weights.copy_state)
    if int(weights.metadata.get("format_version", FORMAT_VERSION)) == 1 and GATES not in state:
        state[GATES] = torch.ones_like(own[GATES])  # trained with the ungated Eq. 8 (module doc)
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    bad = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unknown or bad:
        raise WeightFileError(f"{weights.name} does not fit this UNet's P3S copy: {len(missing)} tensors missing "
                              f"(e.g. {missing[:2]}), {len(unknown)} unknown (e.g. {unknown[:2]}), {len(bad)} of "
                              f"another shape (e.g. {bad[:2]})")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key].to(tensor.dtype))
    return copy.eval()


def _names(layout) -> str:
    return "[" + ", ".join(f"{b}{i}.{j}@{c}" for b, i, j, _level, c, _h in layout) + "]"
