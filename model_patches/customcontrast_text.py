"""S+ through ComfyUI's own CLIP text encoder (seed 003 §3.3): one caption, one text context per UNet layer.

Layer ``a``'s S+ token replaces the placeholder word's embedding in the caption and the caption goes through the
text encoder; that layer's cross-attention uses the result. The placeholder is found by token id in ComfyUI's
own tokenization (prompt weights, long prompts and clip-skip as CLIPTextEncode handles them), and the l layers
(× sections of a long prompt × subjects) run as one batch of the encoder. The tokenization and, for weighted
prompts, the empty-prompt encoding are what does not change between steps: ``PlaceholderPrompt`` holds them.

The token is handed to the encoder the way textual-inversion embeddings are (a tensor in the token list), so
the encoder's own embedding-splicing code places it and gradients reach it in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PlaceholderError(ValueError):
    """The prompt does not hold the placeholder word, or the word is not one token."""


def _text_model(clip):
    """The CLIP-L text model (``SDClipModel``) behind a ComfyUI CLIP object for SD1.5."""
    outer = clip.cond_stage_model
    name = getattr(outer, "clip", None)
    inner = getattr(outer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "process_tokens"):
        raise PlaceholderError(f"CustomContrast needs an SD1.5 CLIP (CLIP-L text encoder), got "
                               f"{type(outer).__name__}")
    return inner


def placeholder_token(clip, word: str) -> int:
    """The single token id of ``word`` in the CLIP tokenizer; a clear error for words of several tokens."""
    word = word.strip()
    if not word or any(ch.isspace() for ch in word):
        raise PlaceholderError(f"the placeholder must be one word, got {word!r}")
    tokenizer = clip.tokenizer.clip_l.tokenizer
    ids = tokenizer(word)["input_ids"][1:-1]
    if len(ids) != 1:
        raise PlaceholderError(f"the placeholder {word!r} is {len(ids)} tokens for the CLIP tokenizer; use a word "
                               "that is one token (e.g. 'sks', 'dog', 'toy')")
    return int(ids[0])


@dataclass
class PlaceholderPrompt:
    """A tokenized caption and where its placeholder words sit; encodes it with per-layer tokens.

    One placeholder per subject: ``tokens[k]`` is subject k's word, ``occurrences[k]`` its (section, index)
    positions. ``token`` / ``positions`` are the first subject's."""
    clip: object
    sections: list                     # [[(token, weight), ...] x 77] per section, ComfyUI's tokenization
    tokens: list                       # the placeholders' ids, one per subject
    occurrences: list                  # per subject: (section, index) of every occurrence
    _empty: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, clip, prompt: str, word: str) -> "PlaceholderPrompt":
        return cls.of_words(clip, prompt, [word])

    @classmethod
    def of_words(cls, clip, prompt: str, words) -> "PlaceholderPrompt":
        """The prompt with one placeholder word per subject; every word must be one token, the words distinct,
        and each in the prompt."""
        _text_model(clip)  # refuse another CLIP family here, not in the middle of sampling
        tokens = [placeholder_token(clip, w) for w in words]
        for k, t in enumerate(tokens):
            if t in tokens[:k]:
                raise PlaceholderError(f"two subjects use the placeholder {words[k].strip()!r}; give each subject its "
                                       "own word (e.g. 'sks' and 'ohwx') so each token has one place")
        sections = clip.tokenize(prompt)["l"]
        occurrences = []
        for word, token in zip(words, tokens):
            found = [(s, i) for s, section in enumerate(sections) for i, (t, _) in enumerate(section)
                     if isinstance(t, int) and t == token]
            if not found:
                others = "" if len(words) == 1 else (" (every subject's placeholder must be in it: " +
                                                     ", ".join(repr(w.strip()) for w in words) + ")")
                raise PlaceholderError(f"the prompt does not contain the placeholder word {word.strip()!r}{others}; "
                                       f"write it where the subject goes, e.g. 'a photo of {word.strip()} on the "
                                       f"beach' (prompt: {prompt[:80]!r})")
            occurrences.append(found)
        return cls(clip, sections, tokens, occurrences)

    @property
    def token(self) -> int:
        return self.tokens[0]

    @property
    def positions(self) -> list:
        return self.occurrences[0]

    def key_positions(self, subject: int = 0) -> list[int]:
        """Subject ``subject``'s placeholder indices in the encoded context (77 tokens per section)."""
        return [77 * s + i for s, i in self.occurrences[subject]]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for section in self.sections for _, w in section)

    @property
    def length(self) -> int:
        return 77 * len(self.sections)

    def _rows(self, s_plus: dict) -> list:
        """Token rows for the encoder: for each image b, layer a, section s, the section with S+_k[b, a] of every
        subject k given in place of its placeholder's occurrences (a subject not given keeps its word)."""
        first = next(iter(s_plus.values()))
        rows = []
        for b in range(first.shape[0]):
            for a in range(first.shape[1]):
                for s, section in enumerate(self.sections):
                    row = [t for t, _ in section]
                    for k, tokens in s_plus.items():
                        for ps, i in self.occurrences[k]:
                            if ps == s:
                                row[i] = tokens[b, a]
                    rows.append(row)
        return rows

    def encode(self, s_plus) -> torch.Tensor:
        """``s_plus`` [B, l, 768] (the first subject's), or {subject: [B, l, 768]} for several, → contexts
        [B, l, 77*sections, 768], in one text-encoder call.

        Prompt weights apply as ComfyUI applies them (each token interpolated from the empty prompt's
        encoding), so the unpatched and the S+ contexts differ only through the placeholders."""
        if isinstance(s_plus, torch.Tensor):
            s_plus = {0: s_plus}
        shapes = {tuple(t.shape[:2]) for t in s_plus.values()}
        if len(shapes) != 1:
            raise ValueError(f"the subjects' S+ tokens differ in [images, layers]: {sorted(shapes)}")
        model = _text_model(self.clip)
        self.clip.cond_stage_model.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            self.clip.cond_stage_model.set_clip_options({"layer": self.clip.layer_idx})
        device = model.transformer.get_input_embeddings().weight.device
        b, layers = shapes.pop()
        rows = self._rows({k: t.to(device) for k, t in s_plus.items()})
        weighted = self.weighted
        if weighted and self._empty is None:
            rows.append(model.gen_empty_tokens(model.special_tokens, 77) if hasattr(model, "gen_empty_tokens")
                        else _empty_tokens(model))
        out = model(rows)[0]
        if weighted:
            if self._empty is None:
                self._empty, out = out[-1:].detach(), out[:-1]
            weights = torch.tensor([[w for _, w in section] for section in self.sections], dtype=out.dtype,
                                   device=out.device).repeat(b * layers, 1).unsqueeze(-1)
            empty = self._empty.to(out)
            out = (out - empty) * weights + empty
        return out.reshape(b, layers, len(self.sections) * 77, out.shape[-1])


def _empty_tokens(model):
    from comfy.sd1_clip import gen_empty_tokens

    return gen_empty_tokens(model.special_tokens, 77)
