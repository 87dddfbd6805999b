"""EqDiff's Frequency-aware Decoupled Textual Embedding (seed 001 Eq. 5): two learned tokens, one per band.

Per training sample one candidate is drawn: the low-pass image with S*_LF (p_l = 0.1), the high-pass image with
S*_HF (p_h = 0.1), or the original with S*_ori = S*_LF + S*_HF (p_o = 0.8). At inference S*_ori is the token.

The token enters the text the way ComfyUI's own textual-inversion embeddings do: ComfyUI's tokenizer output is a
list of (token, weight) pairs, and ``SDClipModel.process_tokens`` splices any tensor found in place of a token id
into the embedding sequence. So the trainer encodes "a photo of sks cat" with the vector in place of ``sks``'s id
(found by id, wherever the word falls), which is exactly what the stock CLIPTextEncode computes for
"a photo of embedding:<name> cat" with the exported file — and the gradient reaches the vector through it.
"""
from __future__ import annotations

import contextlib

import torch

LOW, HIGH, ORIGINAL = 0, 1, 2
BAND_NAMES = ("low", "high", "original")
DEFAULT_PROBABILITIES = (0.1, 0.1, 0.8)   # p_l, p_h, p_o


class PlaceholderError(ValueError):
    """The placeholder is not one token, or a prompt does not contain it."""


def draw_band(generator: torch.Generator, probabilities=DEFAULT_PROBABILITIES) -> int:
    """One candidate of Eq. 5's R_{p_l,p_h,p_o}: LOW, HIGH or ORIGINAL, from one uniform draw."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    if p.numel() != 3 or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"band probabilities must be three non-negative numbers summing to 1, got {probabilities}")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return int((u >= torch.cumsum(p, 0)[:2]).sum())


def band_token(embeddings: torch.Tensor, band: int) -> torch.Tensor:
    """``embeddings`` [2, 768] = (S*_LF, S*_HF); the token of one band, or their sum for the original."""
    return embeddings[0] + embeddings[1] if band == ORIGINAL else embeddings[band]


def placeholder_id(clip, word: str) -> int:
    """The SD1 tokenizer's id of ``word``, which must be a single token (e.g. "sks" → 48136)."""
    tokenizer = clip.tokenizer.clip_l
    ids = tokenizer.tokenizer(word)["input_ids"][1:-1]  # without the start/end tokens
    if len(ids) != 1:
        raise PlaceholderError(f"the placeholder {word!r} is {len(ids)} tokens in CLIP's tokenizer; choose a rare "
                               "word that is one token (e.g. 'sks')")
    return int(ids[0])


def init_vector(clip, word: str) -> torch.Tensor:
    """The token embedding of a one-token ``word`` (the official initialiser of both bands)."""
    token = placeholder_id(clip, word)
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    return table[token].detach().float().cpu().clone()


def tokens_with_vector(clip, prompt: str, word: str, vector: torch.Tensor | None):
    """ComfyUI's token pairs of ``prompt`` with every occurrence of ``word``'s id replaced by ``vector``."""
    token = placeholder_id(clip, word)
    tokens = clip.tokenize(prompt)
    found = 0
    out = {}
    for key, sections in tokens.items():
        new_sections = []
        for section in sections:
            row = []
            for pair in section:
                if isinstance(pair[0], int) and pair[0] == token and vector is not None and key == "l":
                    row.append((vector, *pair[1:]))
                    found += 1
                else:
                    found += int(isinstance(pair[0], int) and pair[0] == token and key == "l")
                    row.append(pair)
            new_sections.append(row)
        out[key] = new_sections
    if not found:
        raise PlaceholderError(f"the prompt {prompt!r} does not contain the placeholder {word!r}; write it where "
                               f"the subject goes, e.g. 'a photo of {word} cat'")
    return out


@contextlib.contextmanager
def backpropagatable(clip):
    """Let a gradient flow through ComfyUI's CLIP text model, values unchanged.

    Its layers add the residual in place (``x += attn(norm(x))``) after a LayerNorm saved ``x`` for backward,
    so autograd refuses the graph. A forward pre-hook that hands every LayerNorm a copy of its input keeps the
    saved tensor apart from the one updated in place; the hooks live only for one encode."""
    model = clip.cond_stage_model
    handles = [m.register_forward_pre_hook(lambda module, args: tuple(a.clone() for a in args))
               for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def encode_with_vector(clip, prompt: str, word: str, vector: torch.Tensor) -> torch.Tensor:
    """[1, 77·k, 768] conditioning of ``prompt`` with ``vector`` at the placeholder; differentiable in it."""
    tokens = tokens_with_vector(clip, prompt, word, vector)
    if not (torch.is_grad_enabled() and vector.requires_grad):
        return clip.encode_from_tokens(tokens)
    with backpropagatable(clip):
        return clip.encode_from_tokens(tokens)


def embedding_files(embeddings: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The three stock textual-inversion files: "" (S*_ori), "_low", "_high" → {"clip_l": [1, 768]}."""
    e = embeddings.detach().float().cpu()
    return {"": {"clip_l": (e[0] + e[1])[None].contiguous()}, "_low": {"clip_l": e[0][None].contiguous()},
            "_high": {"clip_l": e[1][None].contiguous()}}


def placeholder_positions(clip, prompt: str, word: str) -> list[int]:
    """Indices (in the encoded sequence) where the placeholder's id stands: where its vector goes."""
    token = placeholder_id(clip, word)
    positions, offset = [], 0
    for section in clip.tokenize(prompt)["l"]:
        positions += [offset + i for i, pair in enumerate(section) if isinstance(pair[0], int) and pair[0] == token]
        offset += len(section)
    if not positions:
        raise PlaceholderError(f"the prompt {prompt!r} does not contain the placeholder {word!r}")
    return positions
