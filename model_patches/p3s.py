"""P3S at sampling and training time: the injection copy's features enter the frozen UNet (Eq. 7–9).

``P3SPatch`` is installed on a clone of the MODEL:

* a ``DIFFUSION_MODEL`` wrapper runs, for each UNet call, the RNGR encoder (``I''`` from the stored reference
  latent ``I'`` and CLIP states ``c_s``) and the injection copy on ``x_t + I''`` (the UNet's own scaled input,
  its timesteps and its text context: every row, conditional and unconditional, gets the features computed from
  its own prompt), and hands the features to the attention patches through ``transformer_options``;
* an ``attn1_patch`` widens each slot's self-attention inputs to ``K = W_K[z ; w f]``, ``V = W_V[z + λ w f ; w f]``
  (Eq. 7) with the layer's own frozen projections, where ``w`` is the overall strength times the timestep
  weight ``ε_t`` (Eq. 9/10, ``p3s_schedule``);
* an ``attn1`` replacement (``GatedSelfAttention``) at each slot computes the attention over those keys as
  ``Attn(own) + γ_i·(Attn(own ; appended) − Attn(own))`` with ``γ_i`` a trainable per-layer gate that starts
  at 0. A softmax over two key sets is the ρ-mix of the softmaxes over each (ρ the appended keys' share), so the
  difference is ``ρ·(Attn(appended) − Attn(own))``: ``γ = 1`` is Eq. 8, ``γ = 0`` the host's attention over the
  own keys, bit for bit. The pack adds the gate because Eq. 8 alone is not the identity at zero
  initialisation: with ``f = 0`` the ``L`` appended keys ``W_K·0`` have logit 0 and value 0 and damp each head
  by ``S/(S+L)`` (``S = Σ exp(q·k/√d)`` over the own keys). With the gate, zero-initialised projections and
  gates give exactly the unpatched UNet; the gradient still reaches both from there (the gate through the
  difference, the projections through the ``λ w f`` of the own values). Cost: the host's attention kernel
  twice per slot, over the own keys and over own + appended;
* an ``attn2_patch`` adds ``w g`` to the cross-attention input (the cross-attention enhancement of Fig. 3:
  "the hidden states both in self and cross attention layers [are added] to the original model through a zero
  convolution"; the paper gives no equation, so this reads it as a residual on the query side);
* the copy (with the RNGR encoder) is registered with ``set_additional_models``, so ComfyUI loads and offloads
  it with the MODEL.

At strength 0 and outside start/end nothing runs: the layers get their stock inputs, bit for bit. A layer that
another node's replacement held before P3S Apply keeps it: AnyLogo's recycling there reads the widened keys
ungated (plain Eq. 8), SAG/PAG get no features (``_taken_over``).

The same object serves the trainer: it passes the patched clone's ``transformer_options`` to ``apply_model``, so
the copy runs inside the wrapper with gradients and what is trained is what is sampled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention_ops import host_attention
from .finite import require_finite, require_finite_number
from .p3s_copy import InjectionCopy, MapRecorder
from .p3s_rngr import RNGREncoder
from .p3s_schedule import CURVES, DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_K, check_curve, timestep_fraction, \
    timestep_weight

ATTACHMENT = "subject_customization.p3s"
STATUS_KEY = "subject_customization.p3s.features"
RECORD_KEY = "subject_customization.p3s.record"
DEFAULT_LAMBDA = 0.2


@dataclass(frozen=True)
class P3SSettings:
    strength: float = 1.0
    curve: str = "paper"
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    k: float = DEFAULT_K
    lam: float = DEFAULT_LAMBDA          # λ of Eq. 7 (fixed by the trained file)
    sigma_start: float = math.inf        # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    cross_attention: bool = True         # the cross-attention enhancement of Fig. 3

    def __post_init__(self):
        strength = require_finite_number(self.strength, "the P3S strength", hint=">= 0 (1 = the paper)")
        if strength < 0:
            raise ValueError(f"the P3S strength must be >= 0, got {self.strength}")
        require_finite_number(self.lam, "the P3S lambda")
        check_curve(self.curve, self.alpha, self.beta, self.k)
        for name in ("sigma_start", "sigma_end"):
            if math.isnan(float(getattr(self, name))):
                raise ValueError(f"{name} is NaN; expected a sigma (inf for 'from the first step')")


@dataclass
class Injection:
    """The copy's features of one UNet call, read by the attention patches; lives in that call's options."""
    selfs: dict           # slot key -> f [B, L, C]
    crosses: dict         # slot key -> g [B, L, C]
    weight: torch.Tensor  # [B] strength · ε_t per row
    gates: dict           # slot key -> γ_i (0-dim), the gate of the appended keys (see GatedSelfAttention)
    lam: float
    cross_attention: bool

    def __deepcopy__(self, memo):
        return self


@dataclass
class ConsistencyRecord:
    """Cross-attention maps of one training forward (Eq. 13): the copy's and the frozen UNet's, per slot key."""
    slots: tuple
    copy_maps: dict = field(default_factory=dict)
    base_maps: dict = field(default_factory=dict)

    def __post_init__(self):
        self.copy_maps = {key: {} for key in self.slots}
        self.base_maps = {key: {} for key in self.slots}

    def __deepcopy__(self, memo):
        return self


def widen_self_attention(n, context, value, f, weight, lam):
    """Eq. 7 on the attention inputs: context ``[context ; w f]``, value ``[value_z + λ w f ; rest ; w f]`` where
    ``value_z`` are the first ``L`` value tokens (the layer's own ``z``; a patch before ours may have appended
    more) — the block then applies its frozen ``W_K`` / ``W_V``."""
    if f.shape[0] != n.shape[0] or f.shape[1] != n.shape[1]:
        raise RuntimeError(f"P3S: the copy's features {tuple(f.shape)} do not match the layer's hidden states "
                           f"{tuple(n.shape)}")
    wf = f.to(n.dtype) * weight.to(n.dtype).view(-1, 1, 1)
    tokens = n.shape[1]
    value = torch.cat([value[:, :tokens] + lam * wf, value[:, tokens:], wf], dim=1)
    return n, torch.cat([context, wf], dim=1), value


def gated_self_attention(q, k, v, appended: int, gate: torch.Tensor, extra_options) -> torch.Tensor:
    """``Attn(own) + γ·(Attn(own ; appended) − Attn(own))`` over projected ``q`` and widened ``k``/``v`` whose last
    ``appended`` tokens are the copy's. ``Attn(own ; appended)`` is Eq. 8; since a softmax over two key sets is
    the ρ-mix of the softmaxes over each (ρ the appended keys' share), the difference equals
    ``ρ·(Attn(appended) − Attn(own))``. So γ = 1 gives Eq. 8 and γ = 0 the host's attention over the own keys
    bit for bit (``plain + 0·finite``). Both terms run through the host's attention kernel."""
    plain = host_attention(q, k[:, :-appended], v[:, :-appended], extra_options)
    full = host_attention(q, k, v, extra_options)
    return plain + gate.to(plain.dtype) * (full - plain)


class GatedSelfAttention:
    """``patches_replace["attn1"]`` callable of one slot: the gated Eq. 8 when the call carries copy features for
    the slot, the host's attention otherwise. Stateless: the features and gate come with each call."""

    def __init__(self, key: tuple):
        self.key = key

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        status = extra_options.get(STATUS_KEY)
        f = status.selfs.get(self.key) if isinstance(status, Injection) else None
        if f is None:
            return host_attention(q, k, v, extra_options)
        return gated_self_attention(q, k, v, f.shape[1], status.gates[self.key], extra_options)


def attention_consistency_loss(copy_map: torch.Tensor, base_map: torch.Tensor) -> torch.Tensor:
    """Eq. 11–12 per sample, averaged over the batch: ``mean((M_c − M_o)²) / ((ΣM_c + ΣM_o) / 2)``.

    Per sample (rather than over the whole batch at once) so the loss of a sample does not depend on which other
    samples share its micro-batch (the engine's split-independence). Note that a softmax map sums to its number
    of rows, so the divisor is heads·L_q: the literal formula makes L_ac small."""
    if copy_map.shape != base_map.shape:
        raise ValueError(f"attention maps of different shapes: {tuple(copy_map.shape)} vs {tuple(base_map.shape)}")
    dims = tuple(range(1, copy_map.ndim))
    mse = (copy_map.float() - base_map.float()).square().mean(dim=dims)
    avg = (copy_map.float().sum(dim=dims) + base_map.float().sum(dim=dims)) / 2
    return (mse / avg).mean()


def with_map_recording(transformer_options: dict, record: ConsistencyRecord) -> dict:
    """A copy of ``transformer_options`` that records the frozen UNet's cross-attention maps at
    ``record.slots`` (chaining any replacement already there) and asks the copy to record its own."""
    options = dict(transformer_options)
    patches_replace = dict(options.get("patches_replace", {}))
    attn2 = dict(patches_replace.get("attn2", {}))
    for key in record.slots:
        attn2[key] = MapRecorder(record.base_maps[key], attn2.get(key) or attn2.get(key[:2]))
    patches_replace["attn2"] = attn2
    options["patches_replace"] = patches_replace
    options[RECORD_KEY] = record
    return options


class P3SPatch:
    def __init__(self, copy: InjectionCopy, rngr: RNGREncoder, reference_latent: torch.Tensor,
                 clip_states: torch.Tensor, settings: P3SSettings, model_sampling):
        require_finite(reference_latent, "P3S: the reference latent", axes=("latent", "channel", "y", "x"),
                       hint="the VAE encoded the reference to NaN/inf; check the image and the VAE")
        require_finite(clip_states, "P3S: the reference's CLIP states", hint="check the CLIP vision model")
        if reference_latent.ndim != 4 or reference_latent.shape[1] != 4:
            raise ValueError(f"P3S: the reference latent must be [batch, 4, h, w], got {tuple(reference_latent.shape)}")
        self.copy, self.rngr = copy, rngr
        self.reference_latent, self.clip_states = reference_latent, clip_states
        self.settings, self.model_sampling = settings, model_sampling
        self._cache = None

    def __deepcopy__(self, memo):  # one patch per Apply node, shared by the clones made from it
        return self

    # -- installation -------------------------------------------------------------------------------------
    def install(self, model_patcher) -> None:
        import comfy.model_patcher
        import comfy.patcher_extension

        present = model_patcher.get_attachment(ATTACHMENT)
        if present is not None:
            raise ValueError("this MODEL already has P3S applied; P3S applies once per model (a second copy would "
                             "widen every self-attention again). Feed P3S Apply the MODEL from before the first one")
        # in the model options (not ModelPatcher.wrappers, which only sampling merges in), so that a direct
        # apply_model with the clone's transformer_options — the trainer's path — runs the copy too
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     ATTACHMENT, self.diffusion_model_wrapper,
                                                     model_patcher.model_options, is_model_options=True)
        model_patcher.set_model_attn1_patch(self.attn1_patch)
        held = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for slot in self.copy.slots:  # a layer another node replaced before keeps its replacement (module doc)
            if slot.key not in held and slot.key[:2] not in held:
                model_patcher.set_model_attn1_replace(GatedSelfAttention(slot.key), *slot.key)
        model_patcher.set_model_attn2_patch(self.attn2_patch)
        holder = torch.nn.ModuleDict({"copy": self.copy, "rngr": self.rngr})
        model_patcher.set_additional_models(ATTACHMENT, [comfy.model_patcher.ModelPatcher(
            holder, load_device=model_patcher.load_device, offload_device=model_patcher.offload_device)])
        model_patcher.set_attachments(ATTACHMENT, self)

    # -- per UNet call ------------------------------------------------------------------------------------
    def rngr_latent(self, device, dtype) -> torch.Tensor:
        """``I''`` (Eq. 4) on ``device``; cached while no gradient is wanted (sampling)."""
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == (device, dtype):
            return self._cache[1]
        weight = self.rngr.z.weight
        latent = self.rngr(self.reference_latent.to(weight.device, weight.dtype),
                           self.clip_states.to(weight.device, weight.dtype)).to(device, dtype)
        if not torch.is_grad_enabled():
            self._cache = ((device, dtype), latent)
        return latent

    def row_weights(self, timesteps: torch.Tensor, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """strength · ε_t per row, 0 where the row's sigma lies outside [sigma_end, sigma_start].

        ``sigmas`` are the sampler's own (``transformer_options["sigmas"]``), compared exactly with the bounds
        the node converted from start/end percent; without them (the trainer) the timestep gives the sigma."""
        s = self.settings
        eps = timestep_weight(timestep_fraction(self.model_sampling, timesteps), s.curve, s.alpha, s.beta, s.k)
        if sigmas is not None and sigmas.numel() in (1, eps.numel()):
            sigma = sigmas.flatten().to(eps.device).float().expand(eps.numel())
        else:
            sigma = self.model_sampling.sigma(timesteps.float()).to(eps.device)
        active = (sigma >= s.sigma_end) & (sigma <= s.sigma_start)
        return torch.where(active, eps * s.strength, torch.zeros_like(eps))

    def diffusion_model_wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        weight = (self.row_weights(timesteps, transformer_options.get("sigmas")) if self.settings.strength > 0
                  else None)
        if weight is None or not bool((weight > 0).any()):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        copy_dtype = self.copy.conv_in.weight.dtype
        reference = self.rngr_latent(x.device, copy_dtype)
        if reference.shape[-2:] != x.shape[-2:]:  # another size than the reference: the bias is resized to it
            reference = F.interpolate(reference, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if reference.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"P3S: {reference.shape[0]} reference latents for {x.shape[0]} rows")
        record = transformer_options.get(RECORD_KEY)
        taken_over = self._taken_over(transformer_options)
        selfs, crosses = self.copy(x[:, :4].to(copy_dtype) + reference, timesteps, context,
                                   record_maps=record.copy_maps if record is not None else None)
        for key in taken_over:
            selfs.pop(key, None)
        gates = {slot.key: gate for slot, gate in zip(self.copy.slots, self.copy.gates)}
        options = {**transformer_options, STATUS_KEY: Injection(selfs, crosses, weight.to(x.device), gates,
                                                                self.settings.lam, self.settings.cross_attention)}
        return executor(x, timesteps, context, y, control, options, **kwargs)

    _warned: set = set()

    def _taken_over(self, transformer_options) -> list:
        """Slot keys whose self-attention another node replaced (core SAG records square maps there, PAG returns
        V as the output): widened K/V would crash them, so those layers get no copy features in this evaluation.
        AnyLogo's recycling replacement accepts extra keys and is left alone."""
        replace = transformer_options.get("patches_replace", {}).get("attn1", {})
        taken = []
        for slot in self.copy.slots:
            other = replace.get(slot.key) or replace.get(slot.key[:2])
            if other is not None and type(other).__name__ not in ("RecyclingAttention", "GatedSelfAttention"):
                taken.append(slot.key)
                name = getattr(other, "__qualname__", type(other).__name__)
                if (slot.key, name) not in P3SPatch._warned:
                    P3SPatch._warned.add((slot.key, name))
                    logging.warning("P3S: self-attention %s is replaced by %s (another node, e.g. SAG or PAG), "
                                    "which assumes its own keys only; P3S injects nothing there while it is",
                                    slot.name, name)
        return taken

    @staticmethod
    def _features(extra_options, which: str):
        status = extra_options.get(STATUS_KEY)
        block = extra_options.get("block")
        if not isinstance(status, Injection) or block is None:
            return None, None
        key = (block[0], block[1], extra_options.get("block_index", 0))
        return status, getattr(status, which).get(key)

    def attn1_patch(self, n, context, value, extra_options):
        status, f = self._features(extra_options, "selfs")
        if f is None:
            return n, context, value
        return widen_self_attention(n, context, value, f, status.weight, status.lam)

    def attn2_patch(self, n, context, value, extra_options):
        status, g = self._features(extra_options, "crosses")
        if g is None or not status.cross_attention:
            return n, context, value
        return n + g.to(n.dtype) * status.weight.to(n.dtype).view(-1, 1, 1), context, value


__all__ = ["ATTACHMENT", "CURVES", "GatedSelfAttention", "P3SPatch", "P3SSettings", "ConsistencyRecord",
           "attention_consistency_loss", "gated_self_attention", "widen_self_attention", "with_map_recording"]


def build_patch(model_patcher, copy: InjectionCopy, rngr: RNGREncoder, reference_latent: torch.Tensor,
                clip_states: torch.Tensor, settings: P3SSettings) -> P3SPatch:
    """A P3SPatch for this MODEL (its schedule converts the UNet's timesteps to t/T and sigmas)."""
    from .unet_layout import require_sd15_unet

    require_sd15_unet(model_patcher, "P3S")
    return P3SPatch(copy, rngr, reference_latent, clip_states, settings,
                    model_patcher.get_model_object("model_sampling"))
