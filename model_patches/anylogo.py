"""AnyLogo at sampling time: the subject pass each step, then generation reading its signatures.

``AnyLogoPatch`` is installed on a clone of the MODEL. Each model evaluation (``calc_cond_batch``), it noises
the subject latent to the current sigma (seeded), runs the same UNet on it in extraction status, and then runs
the real evaluation in generation status, where only the positive prompt's rows read the bank (Eq. 7). The
bank lives only for that evaluation; nothing survives a step, an exception or an interrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import extra_pass
from .finite import require_finite, require_finite_number
from .image_context import POSITIVE_COND_KEY, ImageContextPatch
from .recycling import (STATUS_KEY, AttentionRecorder, Extraction, Generation, SignatureBank, StopExtraction,
                        install_recycling, replacements_at_call_time,
                        with_attn1_replacements)
from .unet_layout import DECODER, ENCODER, MIDDLE, TransformerSlot, select_slots

POSITIONS = {"decoder": (DECODER,), "encoder": (ENCODER,), "encoder+decoder": (ENCODER, DECODER)}
SUBJECT_CONCAT = ("known", "unknown")  # what a 9-channel UNet's subject pass sees; see extra_pass.inpaint_concat
ATTACHMENT = "subject_customization.anylogo"


@dataclass(frozen=True)
class RecyclingSettings:
    positions: str = "decoder"
    include_middle: bool = False
    threshold: float = 1.0          # Λ: 1 = complete transmission, 0 = blocked flow
    strength: float = 1.0           # multiplies the subject keys' unnormalised attention
    sigma_start: float = math.inf   # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    seed: int = 0
    subject_concat: str = "known"
    record_attention: bool = False

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {sorted(POSITIONS)}, got {self.positions!r}")
        # NaN compares false with every bound: without the finiteness checks a NaN strength would pass and
        # silently disable recycling (active() tests strength > 0), a NaN sigma bound would switch it off
        threshold = require_finite_number(self.threshold, "the recycling threshold",
                                          hint="Λ in [0, 1] (1 = every layer transmits)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the recycling threshold must be in [0, 1], got {self.threshold}")
        strength = require_finite_number(self.strength, "the recycling strength", hint=">= 0 (1 = Eq. 4)")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        for name in ("sigma_start", "sigma_end"):
            if math.isnan(float(getattr(self, name))):
                raise ValueError(f"{name} is NaN; expected a sigma (inf for 'from the first step')")
        if self.subject_concat not in SUBJECT_CONCAT:
            raise ValueError(f"subject_concat must be one of {SUBJECT_CONCAT}, got {self.subject_concat!r}")

    @property
    def blocks(self) -> tuple[str, ...]:
        return POSITIONS[self.positions] + ((MIDDLE,) if self.include_middle else ())


def keep_bias(threshold: float, strength: float, seed: int, sigma: float, slot_index: int, rows: int, device):
    """Per-row additive bias on the subject keys of one layer: log(strength) where the layer's signature is
    kept (a uniform draw u <= Λ, Eq. 5; deterministic per seed, step, layer and row), -inf where dropped."""
    log_s = -math.inf if strength <= 0 else math.log(strength)
    if threshold >= 1.0:
        return torch.full((rows,), log_s, device=device)
    generator = torch.Generator().manual_seed(extra_pass.step_seed(seed, sigma, ("keep", int(slot_index))))
    keep = torch.rand(rows, generator=generator) <= threshold
    return torch.where(keep, torch.tensor(log_s), torch.tensor(-math.inf)).to(device)


@dataclass
class _Run:
    """Per predict_noise call: which conds are the positive prompt, and the bank of this sigma."""
    positive: object
    bank: SignatureBank | None = None
    sigma: float | None = None


@dataclass
class AnyLogoPatch:
    settings: RecyclingSettings
    slots: list[TransformerSlot]
    subject: torch.Tensor                  # [1, 4, h, w] subject latent in model space (process_latent_in)
    in_channels: int = 4
    image_context: ImageContextPatch | None = None
    recorder: AttentionRecorder | None = None
    _runs: list = field(default_factory=list)

    def __deepcopy__(self, memo):  # one patch object per Apply node, shared by the clones made from it
        return self

    # -- installation -------------------------------------------------------------------------------------
    def install(self, model_patcher) -> None:
        # Two patches cannot share one model: each calc_cond_batch wrapper puts its own Generation status in
        # transformer_options, so the inner one hides the outer one's bank and the first application's layers
        # would silently fall back to plain attention (and a second weight file or image context would
        # override the first). Refuse it here, where every caller (node, other packs, trainers) passes.
        present = model_patcher.get_attachment(ATTACHMENT)
        if present is not None:
            raise ValueError(
                f"this MODEL already has AnyLogo applied ({present.describe()}); AnyLogo applies once per model. "
                "A second application would replace the first one's subject pass, so its layers would silently "
                "stop recycling. To recycle in encoder and decoder layers, use one AnyLogo Apply with positions "
                "'encoder+decoder' (include_middle adds the middle block), fed with the MODEL from before the "
                "first AnyLogo Apply")
        install_recycling(model_patcher, self.slots)
        if self.image_context is not None:
            model_patcher.set_model_attn2_patch(self.image_context)
        model_patcher.add_wrapper_with_key("predict_noise", ATTACHMENT, self.predict_noise_wrapper)
        model_patcher.add_wrapper_with_key("calc_cond_batch", ATTACHMENT, self.calc_cond_batch_wrapper)
        if self.recorder is not None:
            model_patcher.add_wrapper_with_key("outer_sample", ATTACHMENT, self.outer_sample_wrapper)
        model_patcher.set_attachments(ATTACHMENT, self)

    def describe(self) -> str:
        s = self.settings
        return f"positions {s.positions}" + (" + middle" if s.include_middle else "") + f", {len(self.slots)} layers"

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.recorder.reset()  # a report describes the latest sampling only
        return executor(*args, **kwargs)

    # -- per step -----------------------------------------------------------------------------------------
    def active(self, sigma: float) -> bool:
        s = self.settings
        return s.threshold > 0 and s.strength > 0 and s.sigma_end <= sigma <= s.sigma_start

    def predict_noise_wrapper(self, executor, x, timestep, model_options, seed):
        guider = getattr(executor, "class_obj", None)
        positive = getattr(guider, "conds", {}).get("positive") if guider is not None else None
        self._runs.append(_Run(positive))
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            run = self._runs.pop()
            if run.bank is not None:
                run.bank.clear()

    def _positive_index(self, conds) -> int | None:
        if self._runs and self._runs[-1].positive is not None:
            return next((i for i, c in enumerate(conds) if c is self._runs[-1].positive), None)
        return 0 if conds and conds[0] is not None else None  # outside a guider: ComfyUI's [cond, uncond]

    def calc_cond_batch_wrapper(self, executor, model, conds, x_in, timestep, model_options):
        positive = self._positive_index(conds)
        sigma = float(timestep.flatten()[0])
        options = dict(model_options)
        transformer_options = {**options.get("transformer_options", {}), POSITIVE_COND_KEY: positive}
        options["transformer_options"] = transformer_options
        if positive is None or not self.active(sigma):
            return executor(model, conds, x_in, timestep, options)
        lost, takeovers = replacements_at_call_time(model_options, self.slots)
        if lost:
            raise RuntimeError("AnyLogo: another node replaced self-attention after AnyLogo was applied, on "
                               + ", ".join(lost) + ". Apply AnyLogo last (after SAG, attention couple, …) so "
                               "both run.")
        if takeovers:
            options = with_attn1_replacements(options, takeovers)
            transformer_options = options["transformer_options"]
        run = self._runs[-1] if self._runs else _Run(None)
        try:
            if run.bank is None or run.sigma != sigma:
                run.bank, run.sigma = self.extract(model, conds[positive], timestep, model_options), sigma
            transformer_options[STATUS_KEY] = Generation(run.bank, positive, self._key_bias(sigma), self.recorder)
            return executor(model, conds, x_in, timestep, options)
        finally:
            if not self._runs:
                run.bank.clear()

    def _key_bias(self, sigma: float):
        s = self.settings
        if s.threshold >= 1.0 and s.strength == 1.0:
            return None
        index = {slot.key: i for i, slot in enumerate(self.slots)}
        return lambda key, rows, device: keep_bias(s.threshold, s.strength, s.seed, sigma, index[key], rows,
                                                   device)

    def extract(self, base_model, positive_conds, timestep, model_options) -> SignatureBank:
        """The subject pass at this sigma, filling and returning a fresh bank."""
        device = timestep.device
        sigma = timestep.flatten()[:1]
        subject = self.subject.to(device)
        noise = extra_pass.seeded_noise(subject.shape, self.settings.seed, float(sigma), device)
        context = positive_conds[0]["model_conds"]["c_crossattn"].process_cond(batch_size=1, device=device).cond
        return extract_signatures(base_model, subject, noise, sigma, context, self.slots,
                                  model_options.get("transformer_options", {}), in_channels=self.in_channels,
                                  subject_known=self.settings.subject_concat == "known")


def extract_signatures(base_model, subject: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       context: torch.Tensor, slots: list[TransformerSlot], transformer_options: dict, *,
                       in_channels: int, subject_known: bool = True) -> SignatureBank:
    """The extraction status: subject latents ([B_s,4,h,w], model space) noised to ``sigma`` with ``noise``,
    through the UNet carrying ``transformer_options``' patches; returns the bank of the ``slots``' keys/values
    (one row per subject). Shared by sampling (one subject) and training (one subject per sample)."""
    x = extra_pass.noised(base_model, subject, sigma, noise)
    concat = extra_pass.inpaint_concat(subject, subject_known, base_model) if in_channels == 9 else None
    bank = SignatureBank()
    status = Extraction(bank, tuple(slot.key for slot in slots))
    options = {**transformer_options, STATUS_KEY: status, POSITIVE_COND_KEY: 0}
    extra_pass.run_reference_pass(base_model, x, sigma, context=context, concat=concat, transformer_options=options,
                                  stop=StopExtraction)
    missing = [slot.name for slot in slots if slot.key not in bank]
    if missing:
        raise RuntimeError(f"AnyLogo: the subject pass did not reach layers {missing}")
    return bank


def build_patch(model_patcher, subject_latent: torch.Tensor, settings: RecyclingSettings,
                image_context: ImageContextPatch | None = None) -> AnyLogoPatch:
    from .unet_layout import diffusion_model_of

    if not isinstance(subject_latent, torch.Tensor) or subject_latent.ndim != 4 or subject_latent.shape[:2] != (1, 4):
        shape = tuple(subject_latent.shape) if isinstance(subject_latent, torch.Tensor) else type(subject_latent)
        raise ValueError(f"AnyLogo: the subject latent must be one 4-channel latent [1, 4, h, w], got {shape}")
    require_finite(subject_latent, "AnyLogo: the subject latent", axes=("latent", "channel", "y", "x"),
                   hint="the VAE encoded the subject to NaN/inf; check the subject image and the VAE (an fp16 VAE "
                        "can overflow: try it in fp32)")
    unet = diffusion_model_of(model_patcher)
    in_channels = unet.input_blocks[0][0].in_channels
    slots = select_slots(model_patcher, settings.blocks)
    recorder = AttentionRecorder() if settings.record_attention else None
    return AnyLogoPatch(settings, slots, subject_latent, in_channels, image_context, recorder)
