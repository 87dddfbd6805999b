"""CustomContrast Loader + Apply on the tiny SD1.5, sampled with the stock KSampler (CFG on)."""
import pytest
import torch

from standalone import tiny_models
from standalone.tiny_models import shallow_text_encoder

PROMPT = "a photo of sks on a table"
TWO = "a photo of sks and ohwx on a table"


def subject_image(colour):
    subject = torch.full((1, 48, 48, 3), 0.9)
    subject[:, 12:36, 12:36] = torch.tensor(colour)
    return subject


class Kit:
    def __init__(self, comfy, folder, clip_vision):
        self.nodes = comfy
        self.model, self.clip, self.vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        shallow_text_encoder(self.clip)
        tiny_models.build_customcontrast_weights(folder / "cc.safetensors", self.model)
        tiny_models.build_customcontrast_weights(folder / "cc_zero.safetensors", self.model, zero_visual=True)
        loader = comfy.NODE_CLASS_MAPPINGS["SC_CustomContrastLoader"]()
        tiny_models.build_customcontrast_weights(folder / "cc_other.safetensors", self.model, seed=1)
        self.weights = loader.load("cc.safetensors")[0]
        self.zero_weights = loader.load("cc_zero.safetensors")[0]
        self.other_weights = loader.load("cc_other.safetensors")[0]   # a second subject's own weights
        encode = comfy.NODE_CLASS_MAPPINGS["SC_CLIPHierarchicalEncode"]()
        self.embeds, self.other_embeds = (
            encode.encode(clip_vision, subject_image(colour), "1,2,3", "center_crop", 0.0, 0xFFFFFF, True, False)[0]
            for colour in ((0.8, 0.2, 0.1), (0.1, 0.3, 0.9)))

    def apply(self, model=None, weights=None, embeds=None, **kwargs):
        args = dict(prompt=PROMPT, placeholder="sks", gamma=1.0, start_percent=0.0, end_percent=1.0)
        args.update(kwargs)
        node = self.nodes.NODE_CLASS_MAPPINGS["SC_CustomContrastApply"]()
        return node.apply(model or self.model, self.clip, weights or self.weights, embeds or self.embeds,
                          **args)[0]

    def apply_two(self, first=None, **second):
        """Subject 1 (sks, red square) then subject 2 (ohwx, blue square, its own weights) on the same MODEL."""
        model = self.apply(**(first or {}))
        args = dict(weights=self.other_weights, embeds=self.other_embeds, prompt=TWO, placeholder="ohwx")
        args.update(second)
        return model, self.apply(model=model, **args)

    def sample(self, model, positive=PROMPT, steps=1, control=None):
        pos = self.nodes.CLIPTextEncode().encode(self.clip, positive)[0]
        neg = self.nodes.CLIPTextEncode().encode(self.clip, "blurry")[0]
        if control is not None:
            pos, neg = control(pos, neg)
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return self.nodes.common_ksampler(model, 1, steps, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


@pytest.fixture(scope="module")
def kit(comfy, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("customcontrast")
    folder_paths.add_model_folder_path("customcontrast", str(folder), is_default=True)
    return Kit(comfy, folder, tiny_models.tiny_clip_vision(seed=0))


def test_apply_acts_leaves_the_input_alone_and_zero_visual_weights_equal_gamma_zero(kit):
    plain = kit.sample(kit.model)
    patched = kit.apply()
    out = kit.sample(patched)
    assert not torch.equal(out, plain) and torch.isfinite(out).all()
    assert torch.equal(kit.sample(kit.model), plain)              # the input MODEL is unchanged
    assert torch.equal(kit.sample(patched), out)                  # nothing carried over between runs
    # zero-initialised K_v/V_v and gamma = 0 both remove the visual term exactly, through the sampling path
    gamma_zero = kit.sample(kit.apply(gamma=0.0))
    assert torch.equal(kit.sample(kit.apply(weights=kit.zero_weights)), gamma_zero)
    assert not torch.equal(gamma_zero, out) and not torch.equal(gamma_zero, plain)  # S+ acts without the visual term
    # outside start/end nothing acts
    assert torch.equal(kit.sample(kit.apply(start_percent=1.0, end_percent=1.0)), plain)


def test_one_text_encoder_batch_per_step_for_the_conditional_rows_only(kit):
    """CFG batches cond and uncond in one model call: the text encoder runs once per step, on l rows (one per
    cross-attention layer), at the step's timestep."""
    from model_patches.unet_layout import transformer_slots

    batches = []
    text_model = kit.clip.cond_stage_model.clip_l.transformer
    handle = text_model.register_forward_pre_hook(
        lambda m, args, kw: batches.append(kw["embeds"].shape[0]), with_kwargs=True)
    seen_steps = []
    encoder = kit.weights.encoder
    original = encoder.forward_step
    encoder.forward_step = lambda image, timestep: (seen_steps.append(float(timestep.flatten()[0])),
                                                    original(image, timestep))[1]
    try:
        kit.sample(kit.apply(), steps=2)
    finally:
        handle.remove()
        del encoder.forward_step
    # two single-row calls are CLIPTextEncode's positive and negative prompts
    assert batches == [1, 1] + [len(transformer_slots(kit.model))] * 2
    assert len(seen_steps) == 2 and seen_steps[0] > seen_steps[1]


def test_an_ipadapter_style_attn2_replacement_is_chained_in_either_order(kit):
    calls = []

    def added_image_attention(q, k, v, extra_options):  # what IPAdapter's Attn2Replace does: text + extra
        import comfy.ldm.modules.attention as attention

        calls.append(tuple(extra_options["cond_or_uncond"]))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.01

    def with_ipadapter(model):
        patched = model.clone()
        patched.set_model_attn2_replace(added_image_attention, "output", 2)
        return patched

    alone = kit.sample(kit.apply())
    before = kit.sample(kit.apply(model=with_ipadapter(kit.model)))
    after = kit.sample(with_ipadapter(kit.apply()))
    assert torch.equal(before, after) and not torch.equal(before, alone)
    assert calls and all(c == (1, 0) for c in calls)
    assert not torch.equal(kit.sample(with_ipadapter(kit.model)), before)  # CustomContrast still acts


def test_lora_and_controlnet_reach_the_patched_model(kit, tiny_cache_dir, tmp_path):
    import comfy.controlnet
    import comfy.utils
    import folder_paths
    from model_patches.weight_files import save_weights

    key = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_q.weight"
    weight = comfy.utils.get_attr(kit.model.model, key)
    save_weights(tmp_path / "delta.safetensors", {key.replace(".weight", ".diff"): torch.randn(weight.shape) * 0.1},
                 {"method": "test"})
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    lora = kit.nodes.LoraLoaderModelOnly().load_lora_model_only
    base = kit.sample(kit.apply())
    assert not torch.equal(kit.sample(kit.apply(model=lora(kit.model, "delta.safetensors", 1.0)[0])), base)
    assert torch.equal(kit.sample(kit.apply(model=lora(kit.model, "delta.safetensors", 0.0)[0])), base)

    control_net = comfy.controlnet.load_controlnet(str(tiny_models.build_controlnet(
        tiny_cache_dir / "controlnet" / "tiny_controlnet.safetensors")))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def control(strength):
        return lambda pos, neg: kit.nodes.ControlNetApplyAdvanced().apply_controlnet(
            pos, neg, control_net, hint, strength, 0.0, 1.0, vae=kit.vae)[:2]

    assert not torch.equal(kit.sample(kit.apply(), control=control(1.0)), base)
    assert torch.equal(kit.sample(kit.apply(), control=control(0.0)), base)


def test_location_mask_of_each_step_is_the_map_of_the_step_before(kit):
    """Recorded trace of a 3-step run with location on: the first call runs unmasked (and equals location off
    exactly), call k uses the mask made from call k-1's aggregated map — not its own map, not none — and the
    masks change the result."""
    from model_patches.customcontrast import ATTACHMENT
    from model_patches.customcontrast_location import location_mask

    off, on = kit.apply(), kit.apply(location=True)
    assert torch.equal(kit.sample(on, steps=1), kit.sample(off, steps=1))  # step 1: recording only, no mask
    trace = on.get_attachment(ATTACHMENT).trace()
    trace.history = []
    located = kit.sample(on, steps=3)
    assert len(trace.history) == 3
    used0, made0 = trace.history[0]
    assert used0 == {} and set(made0) == {0}
    for k in (1, 2):
        used, made = trace.history[k]
        previous = location_mask(trace.history[k - 1][1][0])
        assert torch.equal(used[0], previous)                            # the map of step t+1 ...
        assert not torch.allclose(used[0], location_mask(made[0]), atol=1e-3)   # ... not step t's own
        assert used[0].min() == 0 and used[0].max() == 1                 # a real mask, not ones
    assert not torch.equal(located, kit.sample(off, steps=3))
    trace.history = None
    assert torch.equal(kit.sample(on, steps=3), located)                 # nothing carried over between runs


def word_embeddings(clip, words):
    inner = clip.cond_stage_model.clip_l
    ids = [clip.tokenizer.clip_l.tokenizer(w)["input_ids"][1] for w in words]
    return inner.transformer.get_input_embeddings()(torch.tensor([ids]), out_dtype=torch.float32)  # [1, l, 768]


def test_two_subjects_each_placeholder_gets_its_own_subjects_tokens(kit):
    """Applied twice, the MODEL carries two subjects. Where each S+ goes: with known word embeddings as S+, layer
    a's context equals the stock encoding of the prompt with subject 1's word a at 'sks' and subject 2's at 'ohwx'
    (swapping the two fails). Which S+ is whose: the group's contexts are the two encoders' S+ at their own
    placeholders, not the swapped assignment; each subject's visual term uses its own tokens and K_v/V_v."""
    from model_patches.customcontrast import ATTACHMENT

    first, both = kit.apply_two()
    group = both.get_attachment(ATTACHMENT)
    assert group.words == ["sks", "ohwx"] and len(group.subjects) == 2
    assert len(first.get_attachment(ATTACHMENT).subjects) == 1           # the first Apply's MODEL keeps one
    layers = len(group.subjects[0].slots)
    a_words = ["cat", "dog", "car", "tree", "house", "bird", "boat", "cup", "lamp"][:layers]
    b_words = ["hat", "bed", "door", "fish", "sun", "road", "shoe", "lamp", "cup"][:layers]
    with torch.no_grad():
        contexts = group.prompt.encode({0: word_embeddings(kit.clip, a_words), 1: word_embeddings(kit.clip, b_words)})
        for a in range(layers):
            want = kit.nodes.CLIPTextEncode().encode(kit.clip, TWO.replace("sks", a_words[a]).replace(
                "ohwx", b_words[a]))[0][0][0]
            swapped = kit.nodes.CLIPTextEncode().encode(kit.clip, TWO.replace("sks", b_words[a]).replace(
                "ohwx", a_words[a]))[0][0][0]
            torch.testing.assert_close(contexts[0, a], want[0], rtol=1e-5, atol=1e-5)  # float32 encoder, batched
            assert (contexts[0, a] - swapped[0]).abs().max() > 1e-2

        t = torch.tensor([500.0])
        state = group.state_for(t)
        own = [s.encoder.forward_step(s.image_state(), t) for s in group.subjects]
        assert not torch.allclose(own[0].s_plus, own[1].s_plus)
        torch.testing.assert_close(state.contexts, group.prompt.encode({0: own[0].s_plus, 1: own[1].s_plus}),
                                   rtol=0, atol=0)
        swapped = group.prompt.encode({0: own[1].s_plus, 1: own[0].s_plus})
        assert (state.contexts - swapped).abs().max() > 1e-3
    calls = state.calls()
    assert [c.index for c in calls] == [0, 1]
    assert torch.equal(calls[0].visual, own[0].visual) and torch.equal(calls[1].visual, own[1].visual)
    assert calls[0].visual_attention is kit.weights.visual_attention
    assert calls[1].visual_attention is kit.other_weights.visual_attention
    assert calls[0].placeholder != calls[1].placeholder == group.prompt.key_positions(1)


def test_two_subjects_sample_and_leave_every_input_model_alone(kit):
    plain, one = kit.sample(kit.model), kit.sample(kit.apply())
    first, both = kit.apply_two()
    two = kit.sample(both)
    assert torch.isfinite(two).all() and not torch.equal(two, one) and not torch.equal(two, plain)
    assert torch.equal(kit.sample(first), one) and torch.equal(kit.sample(kit.model), plain)
    assert torch.equal(kit.sample(both), two)
    # the second subject's gamma and range are its own: outside its range it only keeps its word in the prompt
    _, late = kit.apply_two(start_percent=1.0, end_percent=1.0)
    with_word = kit.sample(kit.apply(prompt=TWO))
    assert torch.equal(kit.sample(late), with_word)


def test_applying_once_equals_the_single_subject_path_the_trainer_runs(kit):
    """One subject through the installed wrapper (host WrapperExecutor) = CustomContrastPatch.state_for +
    transformer_options_for on the UNet directly, exactly."""
    import comfy.patcher_extension as extension

    from model_patches.customcontrast import ATTACHMENT

    for location in (False, True):
        group = kit.apply(location=location).get_attachment(ATTACHMENT)
        patch = group.subjects[0]
        base = kit.model.model
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 8, 8, generator=g)
        sigma = torch.full((2,), 3.0)
        negative = kit.nodes.CLIPTextEncode().encode(kit.clip, "blurry")[0][0][0]
        context = torch.cat([negative, negative])
        options = {"cond_or_uncond": [1, 0], "sigmas": sigma}
        with torch.no_grad():
            wrapped = extension.WrapperExecutor.new_class_executor(base._apply_model, base, [
                group.apply_model_wrapper]).execute(x, sigma, None, context, None, options)
            state = patch.state_for(base.model_sampling.timestep(sigma[:1]))
            direct = base._apply_model(x, sigma, None, context, None, patch.transformer_options_for(options, state))
        assert torch.equal(wrapped, direct)


def test_two_subjects_location_masks_stay_separate(kit):
    """Recorded trace, both subjects with location on and their own first-step masks (left / right half): the
    first call uses each user mask for its own subject; every later call gives subject s the mask of subject s's
    map of the call before, and the two subjects' maps and masks differ."""
    from model_patches.customcontrast import ATTACHMENT
    from model_patches.customcontrast_location import location_mask

    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[..., :4], right[..., 4:] = 1.0, 1.0
    _, both = kit.apply_two({"location": True, "location_mask": left, "prompt": TWO}, location=True,
                            location_mask=right)
    trace = both.get_attachment(ATTACHMENT).trace()
    trace.history = []
    located = kit.sample(both, steps=3)
    assert len(trace.history) == 3
    used0, made0 = trace.history[0]
    assert set(used0) == {0, 1} and torch.equal(used0[0], left) and torch.equal(used0[1], right)
    assert set(made0) == {0, 1} and not torch.allclose(made0[0], made0[1], atol=1e-4)
    for k in (1, 2):
        used, _ = trace.history[k]
        for s in (0, 1):
            assert torch.equal(used[s], location_mask(trace.history[k - 1][1][s]))
        assert not torch.allclose(used[0], used[1], atol=1e-3)
    trace.history = None
    # the user masks act at the first step; without them the first step runs free
    _, free = kit.apply_two({"location": True, "prompt": TWO}, location=True)
    assert not torch.equal(kit.sample(both, steps=1), kit.sample(free, steps=1))
    assert torch.equal(kit.sample(both, steps=3), located)


def test_a_location_mask_of_ones_is_the_unmasked_first_step(kit):
    free = kit.sample(kit.apply(location=True))
    ones = kit.sample(kit.apply(location=True, location_mask=torch.ones(1, 16, 16)))
    torch.testing.assert_close(ones, free, rtol=1e-5, atol=1e-5)  # the placeholder correction is 0·A·v
    half = torch.ones(1, 16, 16)
    half[..., 8:] = 0.0
    assert not torch.allclose(kit.sample(kit.apply(location=True, location_mask=half)), free, atol=1e-4)
