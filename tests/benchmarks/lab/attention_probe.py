"""Is the generation pass's attention onto the recycled subject keys *selective*? A read-only probe.

The attention report's ASA (the share of attention mass on the subject tokens) cannot tell a query that finds
the one matching subject key from a query that spreads its mass evenly: both can put 20 % on the subject. The
probe wraps each recycled layer's ``RecyclingAttention`` (the pack's, unchanged: the wrapper only reads the
projected queries, the layer's own keys and the banked subject keys, then calls it) and measures per layer:

* ``region_share`` / ``outside_share``: mass on the subject keys from queries inside / outside the region
  (a model that fetches the subject for the region puts more there than elsewhere);
* ``key_ratio``: the subject keys' share of all keys, L_sub / (L + L_sub): what a uniform attention gives;
* ``subject_entropy``: entropy of the region queries' attention *within* the subject keys, divided by
  log L_sub (1 = uniform over the subject, 0 = all on one key; a copying layer is low);
* ``content_entropy``: the same over all keys, divided by log(L + L_sub) (1 = attention ignores content).
"""
from __future__ import annotations

import math

import torch

from model_patches.recycling import STATUS_KEY, Generation


def attention_statistics(q: torch.Tensor, k: torch.Tensor, k_sub: torch.Tensor, heads: int,
                         region: torch.Tensor) -> dict:
    """The probe's measures for one call: ``q``, ``k`` [B, L, C], ``k_sub`` [B, Ls, C], ``region`` [B, L] bool
    (each row needs at least one region and one outside query). Returns floats, means over rows and heads."""
    b, length, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(t.shape[0], -1, heads, d).transpose(1, 2).float()

    logits = split(q) @ torch.cat([split(k), split(k_sub)], dim=2).transpose(-1, -2) / math.sqrt(d)
    probs = logits.softmax(dim=-1)                                     # [B, H, L, L + Ls]
    sub = probs[..., length:]
    share = sub.sum(dim=-1)                                            # [B, H, L]
    within = sub / share.unsqueeze(-1).clamp_min(1e-30)
    ls = k_sub.shape[1]
    sub_entropy = -(within * within.clamp_min(1e-30).log()).sum(dim=-1) / math.log(ls)
    all_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1) / math.log(length + ls)
    inside = region.view(b, 1, length).expand_as(share).float()

    def mean_over(values, weight):
        return float((values * weight).sum() / weight.sum().clamp_min(1))

    return {"region_share": mean_over(share, inside), "outside_share": mean_over(share, 1 - inside),
            "key_ratio": ls / (length + ls), "subject_entropy": mean_over(sub_entropy, inside),
            "content_entropy": mean_over(all_entropy, inside)}


def region_tokens(region_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, 1, h, w] latent region mask -> [B, tokens] bool at a square token grid of ``tokens`` cells (a cell is
    in the region when at least half of the latent cells it covers are)."""
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise ValueError(f"the probe expects square token grids, got {tokens} tokens")
    pooled = torch.nn.functional.adaptive_avg_pool2d(region_mask.float(), (side, side))
    return (pooled >= 0.5).flatten(1)


class SelectivityStats:
    """Running means of ``attention_statistics`` per recycled layer name."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, name: str, stats: dict) -> None:
        acc = self.sums.setdefault(name, dict.fromkeys(stats, 0.0))
        for key, value in stats.items():
            acc[key] += value
        self.counts[name] = self.counts.get(name, 0) + 1

    def per_layer(self) -> dict:
        return {name: {k: v / self.counts[name] for k, v in acc.items()} for name, acc in self.sums.items()}

    def overall(self) -> dict:
        layers = list(self.per_layer().values())
        return {k: sum(layer[k] for layer in layers) / len(layers) for k in layers[0]} if layers else {}


class _Probe:
    def __init__(self, inner, slot, stats: SelectivityStats, region_mask: torch.Tensor):
        self.inner, self.slot, self.stats, self.region_mask = inner, slot, stats, region_mask

    def __call__(self, q, k, v, extra_options):
        status = extra_options.get(STATUS_KEY)
        if isinstance(status, Generation) and self.slot.key in status.bank:
            k_sub = status.bank.keys[self.slot.key].to(k)
            if k_sub.shape[0] == 1:
                k_sub = k_sub.expand(q.shape[0], -1, -1)
            region = region_tokens(self.region_mask.to(q.device), q.shape[1])
            self.stats.add(self.slot.name, attention_statistics(q, k, k_sub, extra_options["n_heads"], region))
        return self.inner(q, k, v, extra_options)


class ProbedLayout:
    """A ``RecyclingLayout`` whose recycled layers are wrapped by the probe (everything else is the layout's)."""

    def __init__(self, layout, stats: SelectivityStats, region_mask: torch.Tensor):
        self._layout, self.stats, self.region_mask = layout, stats, region_mask

    def __getattr__(self, name):
        return getattr(self._layout, name)

    def transformer_options(self, image_context, recycling: bool) -> dict:
        options = self._layout.transformer_options(image_context, recycling)
        replace = options.get("patches_replace", {}).get("attn1", {})
        by_key = {slot.key: slot for slot in self._layout.slots}
        for key, inner in list(replace.items()):
            replace[key] = _Probe(inner, by_key[key], self.stats, self.region_mask)
        return options
