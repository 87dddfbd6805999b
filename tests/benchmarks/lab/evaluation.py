"""The lab's measures, independent of any method: region error with the true vs other subjects, identification
against chance, and statistics over training seeds with paired comparisons on the same held-out pairs."""
from __future__ import annotations

import math
import statistics

import torch


def region_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error inside the region, one value per row: [B, C, h, w] x2 and a mask [B, 1, h, w]."""
    squared = (prediction.float() - target.float()).square() * mask
    return squared.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * prediction.shape[1]).clamp_min(1)


def identification(errors: torch.Tensor, true_index: int = 0) -> dict:
    """``errors`` [pairs, candidates]: each pair's region error with each candidate subject as the condition.
    Per pair: the true candidate's error, the mean of the others', and whether the true one is lowest (tied
    candidates share the credit: a model that ignores the subject scores chance exactly)."""
    true = errors[:, true_index]
    others = torch.cat([errors[:, :true_index], errors[:, true_index + 1:]], dim=1)
    lowest = errors <= errors.min(dim=1, keepdim=True).values * (1 + 1e-6)  # identical rows differ in last bits
    hits = lowest[:, true_index].float() / lowest.sum(dim=1).float()
    return {"true": true, "other": others.mean(dim=1), "hit": hits, "chance": 1.0 / errors.shape[1]}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-pair comparison of two models on the same held-out pairs (and the same noises): mean of a - b, its
    standard error, and the share of pairs where a is lower."""
    diff = (a - b).double()
    n = diff.numel()
    se = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean_diff": float(diff.mean()), "se": se, "a_lower": float((diff < 0).double().mean()), "n": n}


def format_pm(mean: float, spread: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"
