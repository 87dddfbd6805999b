"""CustomContrast's training losses (seed 003 Eq. 4, 7, 8), over the global batch.

Contrastive terms only mean something over many subjects, so under DDP each rank gathers the features of every
rank (``gather_global``, an all-gather that passes gradients back to the rank that produced them) and computes
the loss of the whole global batch; with gradients averaged across ranks afterwards, 2 processes train what 1
process with the same global batch trains (each rank's loss is the same number; the gather's backward sums the
W identical gradients of a rank's own rows, and averaging divides by W again).

* **CSCL (Eq. 4):** ``a_ij = cos(v_i^cls, t_j^cls)``;
  ``L_c = -Σ_i log(e^{a_ii} / Σ_{j≠i} e^{a_ji}) - Σ_i log(e^{a_ii} / Σ_{j≠i} e^{a_ij})``, the denominators over
  j ≠ i as the paper writes them, summed over the batch. With several views of a subject in the batch (the
  trainer always has them, for MACL), Eq. 4 counts a subject's other views among the negatives and so pushes
  them apart — against MACL's intra-consistency. ``subject_ids`` (an option, off by default) leaves those
  views out of the denominators: j ranges over the other *subjects* only.
* **MACL (Eq. 7):** for every positive pair (i, j) — two views of the same subject, i ≠ j —
  ``L_m^{ij} = -Σ_a log(e^{α_ij cos^a_ij / τ} / Σ_{k≠i} e^{α_ik cos^a_ik / τ})`` with ``cos^a_ij`` the cosine
  of the S+ tokens of layer a and ``α_ij = 1 / r_ij``, ``r_ij`` the cosine of the CLIP image embeddings of the
  segmented subjects. ``L_m`` is the mean over positive pairs. ``r`` is clamped at ``min_similarity`` (0.25,
  so α <= 4): Eq. 7 has no clamp, but a non-positive similarity would flip or blow up the factor, and a small one
  swamps the softmax — at τ = 0.07 a clamp of 0.05 lets one negative's logit reach 20/τ ≈ 286 against a
  positive's ≈ 14, so early in training (all S+ alike) one dissimilar pair is the whole loss. CLIP ViT-L image
  embeddings of object crops rarely have cosines below 0.3 (CLIP's embeddings share a common direction), so in
  the paper's setting the clamp does not act and Eq. 7 holds exactly; it bounds degenerate inputs only.
* **L_loc (Eq. 8):** the form of the cited source (FastComposer, Xiao et al. 2023),
  ``mean(Ā ⊙ (1 - M)) - mean(Ā ⊙ M)``: attention is pushed out of the background and into the subject's mask.
  Eq. 8 as printed, ``mean((1-M) ⊙ (1-Ā)) - mean(M ⊙ Ā)``, is minimised by attention 1 everywhere (both terms
  reward attention outside the mask too), which would locate nothing; we read it as a typo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward (an all-to-all) scrambled the rows
    of a non-contiguous gradient (measured here on torch 2.14: MACL's S+ gradients came back permuted). An
    all-reduce of the whole gradient is a little more traffic and right on every backend."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_global(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order ([W*B, ...], every rank the same number of rows), differentiable; the
    tensor itself outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherRows.apply(tensor)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, N] cosines of rows of a [N, D] with rows of b [N, D]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _log_softmax_excluding_diagonal(logits: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """log(e^{x_ij} / Σ_{k≠i} e^{x_ik}) for every (i, j) of [..., N, N], the denominators without the row's
    own entry (or without every entry ``excluded`` [N, N] marks, the diagonal among them)."""
    if excluded is None:
        excluded = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits - torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=-1, keepdim=True)


def cscl_loss(visual_cls: torch.Tensor, text_cls: torch.Tensor,
              subject_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 on CLS tokens [N, D] (N >= 2). With ``subject_ids`` [N], j ≠ i becomes "j of another subject"."""
    if visual_cls.shape[0] < 2:
        raise ValueError("CSCL needs at least two samples in the (global) batch")
    a = cosine_matrix(visual_cls, text_cls)
    excluded = None
    if subject_ids is not None:
        excluded = subject_ids.view(-1, 1) == subject_ids.view(1, -1)   # the diagonal and the same subject's views
        if bool(excluded.all(dim=-1).any()):
            raise ValueError("CSCL over other subjects needs at least two subjects in the (global) batch")
    rows = _log_softmax_excluding_diagonal(a, excluded).diagonal()      # Σ_{j≠i} e^{a_ij}
    cols = _log_softmax_excluding_diagonal(a.T, excluded).diagonal()    # Σ_{j≠i} e^{a_ji}
    return -(rows.sum() + cols.sum())


def appearance_factors(subject_embeds: torch.Tensor, min_similarity: float = 0.25) -> torch.Tensor:
    """α = 1 / r, r = cos of the segmented subjects' CLIP image embeddings [N, D] → [N, N]."""
    return 1.0 / cosine_matrix(subject_embeds, subject_embeds).clamp(min=min_similarity)


def positive_pairs(subject_ids: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: (i, j) are two different views of the same subject."""
    same = subject_ids.view(-1, 1) == subject_ids.view(1, -1)
    return same & ~torch.eye(len(subject_ids), dtype=torch.bool, device=subject_ids.device)


def macl_loss(s_plus: torch.Tensor, alpha: torch.Tensor, subject_ids: torch.Tensor,
              temperature: float = 0.07) -> torch.Tensor:
    """Eq. 7 on S+ [N, l, D], factors α [N, N], integer subject ids [N]: mean over positive pairs of the sum
    over layers."""
    pairs = positive_pairs(subject_ids)
    if not bool(pairs.any()):
        raise ValueError("MACL needs two views of at least one subject in the (global) batch")
    s = F.normalize(s_plus.float(), dim=-1)
    cos = torch.einsum("ild,jld->lij", s, s)                   # [l, N, N]
    log_p = _log_softmax_excluding_diagonal(alpha.float().unsqueeze(0) * cos / temperature)
    per_pair = -log_p.sum(dim=0)                               # Σ_a over layers → [N, N]
    return per_pair[pairs].mean()


def location_loss(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_loc on an aggregated attention map Ā [N, h, w] (values in 0..1) and the subject mask M [N, h, w]."""
    if attention.shape != mask.shape:
        raise ValueError(f"attention map {tuple(attention.shape)} and mask {tuple(mask.shape)} differ in shape")
    a, m = attention.float(), mask.float()
    return (a * (1 - m)).mean() - (a * m).mean()
