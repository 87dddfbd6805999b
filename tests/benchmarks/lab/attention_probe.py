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
* ``content_entropy``: the same over all keys, divided by log(L + L_sub) (1 = attention ignores content);
* ``match_share``: the share of a region query's subject mass on the subject key at the same place in the
  subject as the query is in the region (what a copy needs), against ``match_uniform`` = 1 / L_sub.

``SideBySideProbe`` measures the same for *stock* self-attention on the side-by-side input (the subject known
beside the scene in one latent): the subject's cells there are the "subject keys".
"""
from __future__ import annotations

import math

import torch

from model_patches.recycling import STATUS_KEY, Generation


def attention_statistics(q: torch.Tensor, k: torch.Tensor, k_sub: torch.Tensor, heads: int,
                         region: torch.Tensor, corresponding: torch.Tensor | None = None) -> dict:
    """The probe's measures for one call: ``q`` [B, L, C], the other keys ``k`` [B, Lk, C], the subject keys
    ``k_sub`` [B, Ls, C], ``region`` [B, L] bool (each row needs at least one region and one outside query).
    ``corresponding`` [B, L] long: the subject key at the same place in the subject as each query is in the
    region (-1: none); with it, ``match_share`` is the share of the region queries' subject mass on that key
    (a copying layer: near 1; uniform: ``match_uniform`` = 1 / Ls). Returns floats, means over rows and heads."""
    b, length, inner = q.shape
    keys, ls = k.shape[1], k_sub.shape[1]
    d = inner // heads

    def split(t):
        return t.reshape(t.shape[0], -1, heads, d).transpose(1, 2).float()

    logits = split(q) @ torch.cat([split(k), split(k_sub)], dim=2).transpose(-1, -2) / math.sqrt(d)
    probs = logits.softmax(dim=-1)                                     # [B, H, L, Lk + Ls]
    sub = probs[..., keys:]
    share = sub.sum(dim=-1)                                            # [B, H, L]
    within = sub / share.unsqueeze(-1).clamp_min(1e-30)
    sub_entropy = -(within * within.clamp_min(1e-30).log()).sum(dim=-1) / math.log(ls)
    all_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1) / math.log(keys + ls)
    inside = region.view(b, 1, length).expand_as(share).float()

    def mean_over(values, weight):
        return float((values * weight).sum() / weight.sum().clamp_min(1))

    stats = {"region_share": mean_over(share, inside), "outside_share": mean_over(share, 1 - inside),
             "key_ratio": ls / (keys + ls), "subject_entropy": mean_over(sub_entropy, inside),
             "content_entropy": mean_over(all_entropy, inside)}
    if corresponding is not None:
        index = corresponding.clamp_min(0).view(b, 1, length, 1).expand(b, heads, length, 1)
        match = within.gather(-1, index).squeeze(-1)
        valid = (corresponding >= 0).view(b, 1, length).expand_as(match).float() * inside
        stats.update(match_share=mean_over(match, valid), match_uniform=1.0 / ls)
    return stats


def pooled_cells(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 1, h, w] latent mask -> [B, gh * gw] bool on a ``grid`` token grid (a cell is in when at least half
    of the latent cells it covers are)."""
    return (torch.nn.functional.adaptive_avg_pool2d(mask.float(), grid) >= 0.5).flatten(1)


def corresponding_keys(region: torch.Tensor, grid: tuple[int, int], subject_grid: tuple[int, int]) -> torch.Tensor:
    """[B, gh * gw] region cells -> [B, gh * gw] long: for a query at (r, c) in the region, the row-major index
    of the subject key at the same offset from the subject's top-left as (r, c) from the region's; -1 outside."""
    gh, gw = grid
    hs, ws = subject_grid
    cells = region.view(-1, gh, gw)
    rows = torch.arange(gh).view(1, gh, 1).expand_as(cells)
    cols = torch.arange(gw).view(1, 1, gw).expand_as(cells)
    big = gh + gw
    top = torch.where(cells, rows, big).flatten(1).amin(dim=1).view(-1, 1, 1)
    left = torch.where(cells, cols, big).flatten(1).amin(dim=1).view(-1, 1, 1)
    dr, dc = rows - top, cols - left
    inside = cells & (dr < hs) & (dc < ws)
    return torch.where(inside, dr * ws + dc, -1).flatten(1)


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
            side, sub_side = int(round(math.sqrt(q.shape[1]))), int(round(math.sqrt(k_sub.shape[1])))
            corresponding = corresponding_keys(region.cpu(), (side, side), (sub_side, sub_side)).to(q.device)
            self.stats.add(self.slot.name, attention_statistics(q, k, k_sub, extra_options["n_heads"], region,
                                                                corresponding))
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


class SideBySideProbe:
    """A read-only probe of *stock* self-attention on a side-by-side input ([scene | subject column] in one
    latent): every layer's attn1, through ``patches_replace``, measures how its region queries attend to the
    keys of the subject's cells in the column (the copy's source), then computes ComfyUI's own attention.
    ``region_mask`` [B, 1, h, W], ``source_mask`` [1, 1, h, W] (the subject's cells: the same for every row)."""

    def __init__(self, stats: SelectivityStats, region_mask: torch.Tensor, source_mask: torch.Tensor):
        self.stats, self.region_mask, self.source_mask = stats, region_mask, source_mask

    def grid(self, tokens: int) -> tuple[int, int]:
        h, w = self.region_mask.shape[-2:]
        factor = int(round(math.sqrt(h * w / tokens)))
        if (h // factor) * (w // factor) != tokens:
            raise ValueError(f"{tokens} tokens are not a downsampled {h}x{w} grid")
        return h // factor, w // factor

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        grid = self.grid(q.shape[1])
        region = pooled_cells(self.region_mask, grid).to(q.device)
        source = pooled_cells(self.source_mask, grid)[0].to(q.device)
        rows = source.view(grid).any(dim=1).sum()
        subject_grid = (int(rows), int(source.sum()) // max(int(rows), 1))
        corresponding = corresponding_keys(region.cpu(), grid, subject_grid).to(q.device)
        name = f"{extra_options['block'][0]}{extra_options['block'][1]}.{extra_options.get('block_index', 0)}"
        self.stats.add(name, attention_statistics(q, k[:, ~source], k[:, source], extra_options["n_heads"],
                                                  region, corresponding))
        return optimized_attention(q, k, v, extra_options["n_heads"])
