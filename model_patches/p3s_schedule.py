"""P3S timestep weight (Eq. 9/10): how strongly the copy's features f enter the frozen UNet at step t.

``ε_t`` multiplies f (Eq. 9). ``t`` is the step's discrete timestep (999 … 0 for SD1.5) and ``T`` the number of
training timesteps (1000), so ``t/T`` runs from ~1 at the first sampling step to 0 at the last. Curves:

* ``paper`` — Eq. 10, ``ε_t = 1 − α (t/T)^k + β`` (α 0.5, β 0.2, k 2): 0.7 at the start of sampling, 1.2 at its
  end. The paper's reason: the layout forms early, and a strong injection early copies the reference's layout
  and background; a weak one there keeps the prompt's layout while the later, stronger one keeps the identity.
* ``fixed`` — ``ε_t = 1`` at every step ("Ours W/ fixed weight", Table I/II).
* ``increasing`` / ``decreasing`` — the two naive quadratic curves of Table III, named by what the weight does
  while sampling proceeds: ``(1 − t/T)^k`` (0 → 1) and ``(t/T)^k`` (1 → 0). α and β do not apply to them.
"""
from __future__ import annotations

import math

import torch

CURVES = ("paper", "fixed", "increasing", "decreasing")
DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_K = 0.5, 0.2, 2.0


def check_curve(curve: str, alpha: float, beta: float, k: float) -> None:
    if curve not in CURVES:
        raise ValueError(f"the P3S weight curve must be one of {list(CURVES)}, got {curve!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("k", k)):
        # NaN compares false with every bound: refuse it here so it cannot silently become a NaN weight
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"the P3S weight curve's {name} is {value!r}; expected a finite number")
    if k <= 0:
        raise ValueError(f"the P3S weight curve's exponent k must be > 0, got {k}")


def timestep_weight(t_over_T: torch.Tensor, curve: str = "paper", alpha: float = DEFAULT_ALPHA,
                    beta: float = DEFAULT_BETA, k: float = DEFAULT_K) -> torch.Tensor:
    """ε_t for each row's ``t/T`` (a tensor in [0, 1]), per ``curve``."""
    check_curve(curve, alpha, beta, k)
    u = t_over_T.float().clamp(0.0, 1.0)
    if curve == "paper":
        return 1.0 - alpha * u.pow(k) + beta
    if curve == "fixed":
        return torch.ones_like(u)
    if curve == "increasing":
        return (1.0 - u).pow(k)
    return u.pow(k)


def timestep_fraction(model_sampling, timesteps: torch.Tensor) -> torch.Tensor:
    """``t/T`` of the UNet's timestep input (what ComfyUI hands the diffusion model: ``model_sampling.timestep``
    of the sigma), with T the number of training timesteps of the schedule."""
    total = len(model_sampling.sigmas)
    return timesteps.float() / float(total)
