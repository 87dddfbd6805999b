"""CustomContrast's mechanisms on the tiny SD1.5: per-layer S+ contexts, Eq. 3, identity at γ=0 / zero K_v,V_v."""
import math

import pytest
import torch

from model_patches.customcontrast import (CallState, CustomContrastPatch, DecoupledAttention, VisualAttention,
                                          VisualKV)
from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
from model_patches.customcontrast_text import PlaceholderError, PlaceholderPrompt
from model_patches.unet_layout import transformer_slots
from standalone.tiny_models import shallow_text_encoder

WORDS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "cup", "lamp", "shoe", "road", "sun", "fish", "hat",
         "bed", "door"]
PROMPT = "a photo of sks on a table"


@pytest.fixture(scope="module")
def sd(comfy):
    model, clip, _ = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
    return model, shallow_text_encoder(clip)


def tiny_patch(model, clip, *, gamma=1.0, zero_kv=True, prompt=PROMPT, seed=0):
    torch.manual_seed(seed)
    slots = transformer_slots(model)
    encoder = MFIEncoder(EncoderConfig(feature_dim=48, layers=len(slots), dim=32, visual_tokens=3, depth=2,
                                       heads=4, fourier_bands=8))
    visual = VisualAttention(slots)
    if not zero_kv:
        for p in visual.parameters():
            torch.nn.init.normal_(p, std=0.05)
    features = torch.randn(1, 10, 48)
    return CustomContrastPatch(encoder, visual, slots, PlaceholderPrompt.of(clip, prompt, "sks"), features, gamma)


def word_embedding(clip, word):
    inner = clip.cond_stage_model.clip_l
    token = clip.tokenizer.clip_l.tokenizer(word)["input_ids"][1]
    return inner.transformer.get_input_embeddings()(torch.tensor([[token]]), out_dtype=torch.float32)[0, 0]


def run_unet(model, options, context, *, flags=(1, 0), seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(flags), 4, 8, 8, generator=g)
    sigma = torch.full((len(flags),), 2.0)
    options = {**options, "cond_or_uncond": list(flags), "sigmas": sigma}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


def text(comfy, clip, prompt):
    return comfy.CLIPTextEncode().encode(clip, prompt)[0][0][0]


def test_each_layer_gets_its_own_s_plus_at_the_placeholder(comfy, sd):
    """S+[a] = the embedding of word a: layer a's conditional context must be the stock encoding of the prompt
    with word a written where the placeholder is. Same tokens for two layers, or the token at another position,
    fails the comparison."""
    model, clip = sd
    patch = tiny_patch(model, clip)
    slots = patch.slots
    s_plus = torch.stack([word_embedding(clip, w) for w in WORDS[:len(slots)]])[None]
    contexts = patch.prompt.encode(s_plus)
    state = CallState(contexts, torch.zeros(1, 3, 768), 1.0)
    seen = {}
    hooks = []
    unet = model.model.diffusion_model
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach().clone())))
    negative = text(comfy, clip, "")
    try:
        run_unet(model, patch.transformer_options_for({}, state), torch.cat([negative, negative]))
    finally:
        for h in hooks:
            h.remove()
    names = sorted(seen)  # one attn2.to_k per slot; map by forward order of slots via module order
    ordered = [n for n, _ in unet.named_modules() if n.endswith("attn2.to_k")]
    assert len(ordered) == len(slots) and set(names) == set(ordered)
    for a, name in enumerate(ordered):
        want = text(comfy, clip, PROMPT.replace("sks", WORDS[a]))
        got = seen[name]
        torch.testing.assert_close(got[1], want[0], rtol=1e-5, atol=1e-5)  # cond row: layer a's own word
        torch.testing.assert_close(got[0], negative[0], rtol=0, atol=0)     # uncond row: the negative prompt
        for b in range(len(slots)):
            if b != a:
                assert (got[1] - seen[ordered[b]][1]).abs().max() > 1e-2


def test_identity_at_gamma_zero_and_at_zero_init(comfy, sd):
    """With S+ = the placeholder's own embedding every layer's context is the prompt's; then γ=0 (random
    K_v/V_v) and zero-initialised K_v/V_v (γ=1) give exactly the unpatched UNet output on that context, and
    non-zero K_v/V_v do not.

    The unpatched reference runs on the S+ path's own context: the l-row text-encoder batch and the stock 1-row
    encode of the same tokens agree to float rounding only (the BLAS kernel depends on the batch size and the
    CPU: measured up to 2e-6 here), which is checked apart, so the exact comparison is about the patch."""
    model, clip = sd
    cond, negative = text(comfy, clip, PROMPT), text(comfy, clip, "")
    for gamma, zero in ((0.0, False), (1.0, True), (1.0, False)):
        patch = tiny_patch(model, clip, gamma=gamma, zero_kv=zero)
        s_plus = word_embedding(clip, "sks").expand(1, len(patch.slots), -1)
        contexts = patch.prompt.encode(s_plus)
        torch.testing.assert_close(contexts[0], cond[0].expand_as(contexts[0]), rtol=1e-5, atol=1e-5)
        assert all(torch.equal(contexts[0, a], contexts[0, 0]) for a in range(len(patch.slots)))
        plain = run_unet(model, {}, torch.cat([negative, contexts[:, 0]]))
        state = CallState(contexts, torch.randn(1, 3, 768), gamma)
        out = run_unet(model, patch.transformer_options_for({}, state), torch.cat([negative, cond]))
        assert torch.equal(out, plain) == (gamma == 0.0 or zero)


def test_eq3_explicit_on_small_tensors_and_chained_occupant():
    """Attn(Q,K_t,V_t) + γ·Attn(Q,K_v,V_v) on the conditional rows only, against an explicit softmax; with a
    previous attn2 replacement of the layer its output is the text term."""
    from model_patches.unet_layout import TransformerSlot

    torch.manual_seed(0)
    heads, d, channels = 2, 4, 8
    slot = TransformerSlot("output", 3, 0, 0, channels, heads)
    kv = VisualKV(6, channels)
    for p in kv.parameters():
        torch.nn.init.normal_(p)
    q, k, v = torch.randn(2, 5, channels), torch.randn(2, 3, channels), torch.randn(2, 3, channels)
    tokens = torch.randn(1, 4, 6)
    gamma = 0.7
    extra = {"n_heads": heads, "cond_or_uncond": [1, 0],
             "subject_customization.customcontrast": CallState(None, tokens, gamma)}

    def attn(q, k, v):
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], channels)

    out = DecoupledAttention(slot, kv)(q, k, v, extra)
    k_v, v_v = tokens @ kv.to_k.weight.T, tokens @ kv.to_v.weight.T
    torch.testing.assert_close(out[0], attn(q, k, v)[0], rtol=1e-5, atol=1e-6)  # uncond: text only
    torch.testing.assert_close(out[1], (attn(q, k, v) + gamma * attn(q, k_v.expand(2, -1, -1),
                                                                     v_v.expand(2, -1, -1)))[1],
                               rtol=1e-5, atol=1e-6)
    previous = lambda q, k, v, extra_options: torch.full_like(q, 3.0)  # noqa: E731
    chained = DecoupledAttention(slot, kv, previous)(q, k, v, extra)
    torch.testing.assert_close(chained[0], torch.full_like(q[0], 3.0))
    torch.testing.assert_close(chained[1] - 3.0, out[1] - attn(q, k, v)[1], rtol=1e-5, atol=1e-6)


def test_placeholder_errors(sd):
    _, clip = sd
    with pytest.raises(PlaceholderError, match="does not contain the placeholder word 'sks'"):
        PlaceholderPrompt.of(clip, "a photo of a dog", "sks")
    with pytest.raises(PlaceholderError, match="one word"):
        PlaceholderPrompt.of(clip, "a photo of a dog", "two words")
    with pytest.raises(PlaceholderError, match="tokens for the CLIP tokenizer"):
        PlaceholderPrompt.of(clip, "a photo of xqzvyk", "xqzvyk")
    prompt = PlaceholderPrompt.of(clip, "sks and (sks:1.3) with a hat", "sks")
    assert len(prompt.positions) == 2 and prompt.weighted


def test_weighted_prompt_matches_the_stock_weighting(comfy, sd):
    """A weighted prompt with S+ = the placeholder's own embedding encodes exactly as CLIPTextEncode does."""
    model, clip = sd
    prompt = PlaceholderPrompt.of(clip, "a (photo:1.2) of sks, (blurry:0.8)", "sks")
    s_plus = word_embedding(clip, "sks").expand(1, 2, -1)
    got = prompt.encode(s_plus)
    want = text(comfy, clip, "a (photo:1.2) of sks, (blurry:0.8)")
    torch.testing.assert_close(got[0, 0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 1], want[0], rtol=1e-5, atol=1e-5)


def test_context_patch_pairs_rows_and_lengths_like_comfyui():
    """Conditional rows get their layer's context, unconditional rows keep theirs; contexts of 77·k tokens are
    repeated to a common length as ComfyUI's CONDCrossAttn.concat does; layers not in the patch are untouched."""
    from model_patches.customcontrast import ContextPatch
    from model_patches.unet_layout import TransformerSlot

    slots = [TransformerSlot("input", 1, 0, 0, 8, 2), TransformerSlot("output", 3, 0, 0, 8, 2)]
    ours = torch.randn(1, 2, 154, 768)          # a two-section prompt, 2 layers
    negative = torch.randn(2, 77, 768)          # an uncond row, then a cond row
    state = CallState(ours, torch.zeros(1, 1, 768), 1.0)
    n = torch.randn(2, 4, 8)
    extra = {"subject_customization.customcontrast": state, "cond_or_uncond": [1, 0], "block": ("output", 3),
             "block_index": 0}
    n_out, context, value = ContextPatch(slots)(n, negative, negative, extra)
    assert n_out is n or torch.equal(n_out, n)
    assert context is value and context.shape == (2, 154, 768)
    assert torch.equal(context[0], negative[0].repeat(2, 1))
    assert torch.equal(context[1], ours[0, 1])
    untouched = ContextPatch(slots)(n, negative, negative, {**extra, "block": ("middle", 0)})
    assert torch.equal(untouched[1], negative)
    only_uncond = ContextPatch(slots)(n[:1], negative[:1], negative[:1], {**extra, "cond_or_uncond": [1]})
    assert torch.equal(only_uncond[1], negative[:1])


def test_weight_file_round_trip_keeps_every_tensor_and_the_layout(sd, tmp_path):
    from model_patches.customcontrast_weights import (check_fits_model, load_customcontrast_weights,
                                                      save_customcontrast_weights)
    from model_patches.weight_files import read_metadata

    model, clip = sd
    patch = tiny_patch(model, clip, zero_kv=False)
    path = save_customcontrast_weights(tmp_path / "cc.safetensors", patch.encoder, patch.visual_attention,
                                       patch.slots, image_layers=[1, 2, 3], training_config={"lr": 3e-5})
    loaded = load_customcontrast_weights(path)
    assert check_fits_model(loaded, model) == patch.slots
    assert loaded.encoder.config == patch.encoder.config and loaded.image_layers == [1, 2, 3]
    for mine, theirs in ((patch.encoder, loaded.encoder), (patch.visual_attention, loaded.visual_attention)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_metadata(path)
    assert meta["method"] == "customcontrast" and meta["base_architecture"] == "sd15"
    with torch.no_grad():
        t = torch.tensor([400.0])
        torch.testing.assert_close(loaded.encoder(patch.image_features, t).s_plus,
                                   patch.encoder.eval()(patch.image_features, t).s_plus, rtol=0, atol=0)
