"""CustomContrast Loader + Apply on the tiny SD1.5, sampled with the stock KSampler (CFG on)."""
import pytest
import torch

from standalone import tiny_models
from standalone.tiny_models import shallow_text_encoder

PROMPT = "a photo of sks on a table"


class Kit:
    def __init__(self, comfy, folder, clip_vision):
        self.nodes = comfy
        self.model, self.clip, self.vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        shallow_text_encoder(self.clip)
        tiny_models.build_customcontrast_weights(folder / "cc.safetensors", self.model)
        tiny_models.build_customcontrast_weights(folder / "cc_zero.safetensors", self.model, zero_visual=True)
        loader = comfy.NODE_CLASS_MAPPINGS["SC_CustomContrastLoader"]()
        self.weights = loader.load("cc.safetensors")[0]
        self.zero_weights = loader.load("cc_zero.safetensors")[0]
        subject = torch.full((1, 48, 48, 3), 0.9)
        subject[:, 12:36, 12:36] = torch.tensor([0.8, 0.2, 0.1])
        encode = comfy.NODE_CLASS_MAPPINGS["SC_CLIPHierarchicalEncode"]()
        self.embeds = encode.encode(clip_vision, subject, "1,2,3", "center_crop", 0.0, 0xFFFFFF, True, False)[0]

    def apply(self, model=None, weights=None, **kwargs):
        args = dict(prompt=PROMPT, placeholder="sks", gamma=1.0, start_percent=0.0, end_percent=1.0)
        args.update(kwargs)
        node = self.nodes.NODE_CLASS_MAPPINGS["SC_CustomContrastApply"]()
        return node.apply(model or self.model, self.clip, weights or self.weights, self.embeds, **args)[0]

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
