"""EqDiff's Residual Reference Attention (seed 001 Eq. 8–10), the one implementation for sampling and training.

Per self-attention layer of the middle and decoder blocks (the official ``fusion_blocks: midup``):

    ra  = SA(Q, W_k_res F^r, W_v_res F^r)        reference attention, the layer's own query
    sa  = SA(Q, K, V)                            the stock self-attention (before ``to_out``)
    h   = to_out(sa)                             what the stock layer returns (H_s, frozen)
    [r ; m~] = H_r([ra ; sa]),  m = clamp(m~, 0, 1)     H_r: Linear(2C -> C+1), zero-initialised
    out = h * (1 - s·m) + r * (s·m)              Eq. 9; s = the user's strength (1 = the paper)

``F^r`` are the layer's self-attention *inputs* (norm1 outputs) in a pass of the same UNet on the reference
latent (the official reference UNet is a frozen copy of the base; here it is the same model, so node and trainer
both read the reference through the very weights they sample with, trained K/V included — see README "EqDiff").
At zero initialisation m = 0 and r = 0, so ``out = h * 1 + 0 = h`` exactly: the patched model is the stock one.

Three hooks, all dispatched by the layer's slot key and driven by a status object the caller puts under
``STATUS_KEY`` in ``transformer_options`` (the same pattern as AnyLogo's recycling, so nothing lives in the
copied options dicts):

* ``ReferenceCapture`` (``attn1_patch``): in the reference pass, banks each RRA layer's norm1 output, and stops
  the pass once the last one is banked (the rest of the UNet is not needed);
* ``RRAAttention`` (``attn1`` replacement): in the reading pass, computes ``sa`` with the host's kernel (so an
  untouched layer is the stock layer) and ``ra`` from the bank, and keeps both for the output hook;
* ``RRAOutput`` (``attn1_output_patch``): applies H_r and Eq. 9 to ``to_out``'s result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import extra_pass
from .attention_ops import host_attention
from .unet_layout import DECODER, MIDDLE, TransformerSlot, select_slots

STATUS_KEY = "subject_customization.eqdiff"
RRA_BLOCKS = (MIDDLE, DECODER)
REFERENCE_MODES = ("clean", "noised", "training")  # see reference_input


class StopCapture(Exception):
    """Raised inside the reference pass once every RRA layer's input is banked."""


def clamp_unit(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, 0, 1) whose gradient passes where 0 <= x <= 1, boundaries included.

    Eq. 8's φ. The torch this pack runs on gives clamp a zero gradient *at* the bounds, so a zero-initialised
    head (m̃ = 0 exactly) would never receive one and RRA could not start training; the official code trained
    under the inclusive convention. Values are clamp's exactly (identity at initialisation holds bit for bit)."""
    inside = (x >= 0) & (x <= 1)
    return torch.where(inside, x, x.detach().clamp(0.0, 1.0))


class ResidualReferenceAttention(torch.nn.Module):
    """The trainable part of one RRA layer: reference K/V projections and the fusion head H_r."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.to_k_res = torch.nn.Linear(channels, channels, bias=False)
        self.to_v_res = torch.nn.Linear(channels, channels, bias=False)
        self.fusion = torch.nn.Linear(2 * channels, channels + 1)
        torch.nn.init.zeros_(self.fusion.weight)  # identity at the start (the official code asserts it)
        torch.nn.init.zeros_(self.fusion.bias)

    @classmethod
    def from_layer(cls, attn1) -> "ResidualReferenceAttention":
        """Reference projections start as copies of the layer's own to_k / to_v (the official initialisation)."""
        module = cls(attn1.to_q.in_features)
        with torch.no_grad():
            module.to_k_res.weight.copy_(attn1.to_k.weight.float())
            module.to_v_res.weight.copy_(attn1.to_v.weight.float())
        return module

    def _weights(self, like: torch.Tensor):
        """(W_k_res, W_v_res, H_r weight, H_r bias) on ``like``'s device and dtype. Frozen weights (sampling) are
        cast once per device/dtype and kept: a copy to the GPU per layer and step would cost more than the layer;
        weights that train are used as they are, so gradients reach them."""
        params = (self.to_k_res.weight, self.to_v_res.weight, self.fusion.weight, self.fusion.bias)
        key = (like.device, like.dtype)
        if any(p.requires_grad for p in params) or (params[0].device, params[0].dtype) == key:
            return [p.to(*key) for p in params]
        cached = self.__dict__.get("_cast")
        if cached is None or cached[0] != key:
            cached = (key, [p.detach().to(*key) for p in params])
            self.__dict__["_cast"] = cached
        return cached[1]

    def reference_kv(self, features: torch.Tensor, like: torch.Tensor):
        w_k, w_v = self._weights(like)[:2]
        features = features.to(like.device, like.dtype)
        return torch.nn.functional.linear(features, w_k), torch.nn.functional.linear(features, w_v)

    def fuse(self, h: torch.Tensor, ra: torch.Tensor, sa: torch.Tensor, strength: float = 1.0):
        """Eq. 8 (H_r, split, clamp) and Eq. 9; returns (output, m) with m [B, L, 1] after the strength."""
        weight, bias = self._weights(h)[2:]
        out = torch.nn.functional.linear(torch.cat([ra, sa], dim=-1), weight, bias)
        r, m = out[..., :self.channels], clamp_unit(out[..., self.channels:])
        if strength != 1.0:
            m = m * strength
        return h * (1 - m) + r * m, m


class RRAModules(torch.nn.ModuleDict):
    """One ResidualReferenceAttention per slot, keyed by the slot's name ("output3.0"); what is trained and
    exported (``<slot name>.<param>`` keys in models/eqdiff files)."""

    @classmethod
    def for_model(cls, model, slots: list[TransformerSlot]) -> "RRAModules":
        from .unet_layout import diffusion_model_of

        unet = diffusion_model_of(model)
        modules = cls()
        for slot in slots:
            modules[slot.name.replace(".", "_")] = ResidualReferenceAttention.from_layer(attn1_of(unet, slot))
        return modules

    def of(self, slot: TransformerSlot) -> ResidualReferenceAttention:
        return self[slot.name.replace(".", "_")]


def attn1_of(unet, slot: TransformerSlot):
    from comfy.ldm.modules.attention import SpatialTransformer

    block = {"input": unet.input_blocks, "output": unet.output_blocks}.get(slot.block)
    module = unet.middle_block if slot.block == MIDDLE else block[slot.block_id]
    transformer = next(m for m in module.modules() if isinstance(m, SpatialTransformer))
    return transformer.transformer_blocks[slot.block_index].attn1


def rra_slots(model) -> list[TransformerSlot]:
    return select_slots(model, RRA_BLOCKS)


def slot_key_of(extra_options) -> tuple | None:
    block = extra_options.get("block")
    if block is None:
        return None
    return (block[0], block[1], extra_options.get("block_index", 0))


# ---- statuses -----------------------------------------------------------------------------------------------

@dataclass
class ReferenceBank:
    """norm1 outputs of the reference pass per slot key, [references, L_ref, C]: one reference for every row
    (sampling) or one per row (training)."""
    features: dict = field(default_factory=dict)

    def clear(self):
        self.features.clear()


@dataclass
class Capture:
    bank: ReferenceBank
    slots: tuple                       # slot keys to bank

    def __deepcopy__(self, memo):      # lives in transformer_options, which ComfyUI may copy
        return self


@dataclass
class Read:
    bank: ReferenceBank
    modules: RRAModules
    strength: float = 1.0
    key_bias: dict | None = None                 # L_ref -> [refs, L_ref] additive logits (a reference mask)
    recorder: "ReferenceRecorder | None" = None
    stash: dict = field(default_factory=dict)    # slot key -> (ra, sa), from the attention to the output hook

    def __deepcopy__(self, memo):
        return self


@dataclass
class ReferenceRecorder:
    """What RRA did, per layer: the fusion mask m (where the output copies from the reference; the heatmap) and,
    where ``foreground`` holds the reference's subject mask for a layer's token count, the per-query attention
    mass on it (Eq. 10's first term), kept with gradients for the reference-attention loss."""
    foreground: dict = field(default_factory=dict)   # reference token count -> [refs, L_ref] subject mask
    masses: dict = field(default_factory=dict)       # slot name -> [rows, Lq] (differentiable)
    mask_sums: dict = field(default_factory=dict)    # slot name -> running sum of [rows, Lq] fusion masks
    mask_counts: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)        # slot name -> (h, w) of the query grid
    per_layer: dict = field(default_factory=dict)    # slot name -> [(sigma, mean m)]

    def __deepcopy__(self, memo):
        return self

    def reset(self):
        for store in (self.masses, self.mask_sums, self.mask_counts, self.grids, self.per_layer):
            store.clear()


# ---- the hooks ----------------------------------------------------------------------------------------------

def _expand(bank_rows: torch.Tensor, rows: int, slot_name: str) -> torch.Tensor:
    if bank_rows.shape[0] == rows:
        return bank_rows
    if bank_rows.shape[0] == 1:
        return bank_rows.expand(rows, *bank_rows.shape[1:])
    raise RuntimeError(f"EqDiff layer {slot_name}: {bank_rows.shape[0]} references for {rows} rows")


def foreground_mass(q: torch.Tensor, k_res: torch.Tensor, foreground: torch.Tensor, heads: int) -> torch.Tensor:
    """sum_j softmax(q k_res^T / sqrt(d))_ij * M^r_j per query, averaged over heads: [B, Lq] (Eq. 10)."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2).float()
    kh = k_res.reshape(b, -1, heads, d).transpose(1, 2).float()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (probs @ foreground.float().view(b, 1, -1, 1)).squeeze(-1).mean(dim=1)


class ReferenceCapture:
    """``attn1_patch``: banks the RRA layers' inputs in the reference pass; a pass-through otherwise."""

    def __call__(self, n, context, value, extra_options):
        status = extra_options.get(STATUS_KEY)
        if isinstance(status, Capture):
            key = slot_key_of(extra_options)
            if key in status.slots and key not in status.bank.features:
                status.bank.features[key] = n.detach()
                if len(status.bank.features) == len(status.slots):
                    raise StopCapture()
        return n, context, value


class RRAAttention:
    """``patches_replace["attn1"]`` for one RRA layer; chains the slot's previous occupant."""

    def __init__(self, slot: TransformerSlot, previous: Callable | None = None):
        self.slot, self.previous = slot, previous

    def _inner(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return host_attention(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        sa = self._inner(q, k, v, extra_options)
        status = extra_options.get(STATUS_KEY)
        if not isinstance(status, Read) or self.slot.key not in status.bank.features:
            return sa
        module = status.modules.of(self.slot)
        reference = _expand(status.bank.features[self.slot.key], q.shape[0], self.slot.name)
        k_res, v_res = module.reference_kv(reference, q)
        mask = None
        if status.key_bias is not None:
            bias = _expand(status.key_bias[k_res.shape[1]].to(q.device, q.dtype), q.shape[0], self.slot.name)
            mask = bias[:, None, :]  # [rows, 1, L_ref]: the same key bias for every query
        ra = host_attention(q, k_res, v_res, extra_options, mask)
        status.stash[self.slot.key] = (ra, sa)
        recorder = status.recorder
        if recorder is not None and k_res.shape[1] in recorder.foreground:
            foreground = _expand(recorder.foreground[k_res.shape[1]].to(q.device), q.shape[0], self.slot.name)
            recorder.masses[self.slot.name] = foreground_mass(q, k_res, foreground, extra_options["n_heads"])
            recorder.grids[self.slot.name] = token_grid(extra_options, q.shape[1])
        return sa


class RRAOutput:
    """``attn1_output_patch``: Eq. 8–9 on the layer output, for the layers RRAAttention stashed."""

    def __init__(self, slots: list[TransformerSlot]):
        self.slots = {slot.key: slot for slot in slots}

    def __call__(self, h, extra_options):
        status = extra_options.get(STATUS_KEY)
        key = slot_key_of(extra_options)
        if not isinstance(status, Read) or key not in status.stash or key not in self.slots:
            return h
        slot = self.slots[key]
        ra, sa = status.stash[key]
        out, m = status.modules.of(slot).fuse(h, ra, sa, status.strength)
        if status.recorder is not None:
            _record_mask(status.recorder, slot, m, extra_options)
        return out


def _record_mask(recorder: ReferenceRecorder, slot, m, extra_options):
    share = m.detach().float().squeeze(-1).cpu()
    name = slot.name
    if name in recorder.mask_sums and recorder.mask_sums[name].shape == share.shape:
        recorder.mask_sums[name] += share
        recorder.mask_counts[name] += 1
    else:
        recorder.mask_sums[name], recorder.mask_counts[name] = share.clone(), 1
    recorder.grids[name] = token_grid(extra_options, share.shape[1])
    sigma = extra_options.get("sigmas")
    sigma = float(sigma.flatten()[0]) if sigma is not None else float("nan")
    recorder.per_layer.setdefault(name, []).append((sigma, float(share.mean())))


def token_grid(extra_options, tokens: int) -> tuple[int, int]:
    original = extra_options.get("original_shape")
    if original:
        for down in range(8):
            h, w = -(-original[-2] // 2 ** down), -(-original[-1] // 2 ** down)
            if h * w == tokens:
                return h, w
    side = int(round(math.sqrt(tokens)))
    return (side, side) if side * side == tokens else (1, tokens)


def level_grids(latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Token grid of each UNet level for a latent of ``latent_hw`` (a stride-2 conv halves, rounding up)."""
    h, w = latent_hw
    grids = []
    for _ in range(levels):
        grids.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return grids


def per_level_masks(mask: torch.Tensor, latent_hw: tuple[int, int], levels: int) -> dict:
    """{token count: [B, L] area share of the subject per token} for each level's grid of a [B, H, W] mask."""
    out = {}
    for h, w in level_grids(latent_hw, levels):
        pooled = torch.nn.functional.adaptive_avg_pool2d(mask.float()[:, None], (h, w))
        out[h * w] = pooled.flatten(1)
    return out


def reference_key_bias(mask: torch.Tensor, latent_hw: tuple[int, int], levels: int) -> dict:
    """A reference mask as attention bias: 0 on reference tokens that hold subject pixels, -inf elsewhere."""
    return {n: torch.where(share > 0, 0.0, -math.inf) for n, share in per_level_masks(mask, latent_hw,
                                                                                     levels).items()}


def install_rra(model_patcher, slots: list[TransformerSlot]) -> None:
    """Put the three hooks on a (cloned) ModelPatcher; a previous attn1 replacement on a slot keeps running
    inside ours. A second EqDiff on the same slots is refused (its bank would hide ours)."""
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for slot in slots:
        previous = replace.get(slot.key) or replace.get(slot.key[:2])
        if isinstance(previous, RRAAttention):
            raise ValueError(f"self-attention layer {slot.name} already has EqDiff reference attention; apply "
                             "EqDiff once per model")
        model_patcher.set_model_attn1_replace(RRAAttention(slot, previous), *slot.key)
    model_patcher.set_model_attn1_patch(ReferenceCapture())
    model_patcher.set_model_attn1_output_patch(RRAOutput(slots))


# ---- the reference pass -------------------------------------------------------------------------------------

def reference_sigma(model_sampling, sigma: torch.Tensor, gap: int) -> torch.Tensor:
    """The sigma ``gap`` discrete timesteps below ``sigma`` (the official reference noise at t − 2), floored at 0."""
    t = model_sampling.timestep(sigma.float())
    return model_sampling.sigma(torch.clamp(t - gap, min=0))


def reference_input(base_model, latent: torch.Tensor, sigma: torch.Tensor, mode: str, *,
                    noise: torch.Tensor | None = None, gap: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, sigma) to give ``apply_model`` for the reference latent (model space) at the current ``sigma``.

    ``clean`` — the official inference: the UNet sees the clean latent itself at the current timestep. ComfyUI's
    apply_model scales its input by c_in = 1/sqrt(sigma²+1), so x = latent / c_in.
    ``noised`` — the latent forward-noised to the current sigma with ``noise``.
    ``training`` — the official training: noised with ``noise`` at ``gap`` timesteps less (t − 2).
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
    sigma = sigma.view(-1).to(latent)
    sampling = base_model.model_sampling
    if mode == "clean":
        scale = (sigma ** 2 + sampling.sigma_data ** 2).sqrt() / sampling.sigma_data
        return latent * scale.view(-1, 1, 1, 1), sigma
    if noise is None:
        raise ValueError(f"reference mode {mode!r} needs noise")
    if mode == "training":
        sigma = reference_sigma(sampling, sigma, gap).to(latent)
    return extra_pass.noised(base_model, latent, sigma, noise), sigma


def capture_reference(base_model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                      slots: list[TransformerSlot], transformer_options: dict) -> ReferenceBank:
    """Run the reference pass (the pack's extra pass, no gradient) and return the bank of the slots' inputs."""
    bank = ReferenceBank()
    options = {**transformer_options, STATUS_KEY: Capture(bank, tuple(slot.key for slot in slots))}
    with torch.no_grad():
        extra_pass.run_reference_pass(base_model, x, sigma, context=context, transformer_options=options,
                                      stop=StopCapture)
    missing = [slot.name for slot in slots if slot.key not in bank.features]
    if missing:
        raise RuntimeError(f"EqDiff: the reference pass did not reach layers {missing}")
    return bank
