"""AnyLogo next to other model patches and the stock inpainting nodes: it works, or stops with a clear message."""
import pytest
import torch

from standalone import tiny_models


@pytest.fixture
def kit(anylogo_kit):
    return anylogo_kit


def _one_pass_per_step(kit, model):
    seen, out = kit.subject_passes(model)
    assert len(seen) == kit.steps and len({s for s, _ in seen}) == kit.steps  # one subject pass per step
    return out


def test_coexists_with_self_attention_guidance(kit):
    """SAG still acts (differs from AnyLogo alone) and recycling still acts alongside it (differs from SAG alone),
    in either order, with one subject pass per step (SAG's own extra pass does not start another)."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    sag = lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0)[0]  # noqa: E731
    plain, sag_alone = kit.sample(kit.apply()), kit.sample(sag(kit.model))
    for model in (kit.apply(model=sag(kit.model)), sag(kit.apply()),
                  kit.apply(model=sag(kit.model), include_middle=True)):  # last: SAG's layer chained inside ours
        both = _one_pass_per_step(kit, model)
        assert not torch.equal(both, plain) and not torch.equal(both, sag_alone)
    with pytest.raises(RuntimeError, match="Apply AnyLogo last"):
        kit.sample(sag(kit.apply(include_middle=True)))


def test_coexists_with_perturbed_attention_guidance(kit):
    """PAG replaces ('middle', 0) only inside its extra evaluation: there it takes the layer over, in any order.
    Both act (the result differs from each alone), and PAG's extra conditional evaluation reuses the step's
    subject pass instead of running another."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    pag = lambda m: PerturbedAttentionGuidance.execute(m, 3.0)[0]  # noqa: E731
    pag_alone = kit.sample(pag(kit.model))
    for middle in (True, False):
        plain = kit.sample(kit.apply(include_middle=middle))
        after = _one_pass_per_step(kit, pag(kit.apply(include_middle=middle)))
        before = _one_pass_per_step(kit, kit.apply(model=pag(kit.model), include_middle=middle))
        assert torch.equal(before, after)
        assert not torch.equal(after, plain) and not torch.equal(after, pag_alone)


def test_chains_with_a_lora_loaded_by_the_stock_node(kit, tmp_path):
    import comfy.lora
    import comfy.utils
    import folder_paths
    from model_patches.weight_files import save_weights

    key = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"
    weight = comfy.utils.get_attr(kit.model.model, key)
    save_weights(tmp_path / "delta.safetensors", {key.replace(".weight", ".diff"): torch.randn(weight.shape) * 0.1},
                 {"method": "test"})
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    lora = kit.nodes.LoraLoaderModelOnly().load_lora_model_only(kit.model, "delta.safetensors", 1.0)[0]
    with_lora = kit.sample(kit.apply(model=lora))
    assert not torch.equal(with_lora, kit.sample(kit.apply()))
    assert torch.equal(kit.sample(kit.apply(model=kit.nodes.LoraLoaderModelOnly().load_lora_model_only(
        kit.model, "delta.safetensors", 0.0)[0])), kit.sample(kit.apply()))


def test_controlnet_reaches_the_generation_pass(kit, tiny_cache_dir):
    import comfy.controlnet

    control_net = comfy.controlnet.load_controlnet(str(tiny_models.build_controlnet(
        tiny_cache_dir / "controlnet" / "tiny_controlnet.safetensors")))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def control(strength):
        return lambda pos, neg: kit.nodes.ControlNetApplyAdvanced().apply_controlnet(
            pos, neg, control_net, hint, strength, 0.0, 1.0, vae=kit.vae)[:2]

    model = kit.apply()
    plain = kit.sample(model)
    assert not torch.equal(kit.sample(model, control=control(1.0)), plain)
    assert torch.equal(kit.sample(model, control=control(0.0)), plain)


def test_an_ipadapter_style_attn2_replacement_keeps_running_in_both_passes(kit):
    calls = []

    def added_image_attention(q, k, v, extra_options):  # what IPAdapter's Attn2Replace does: text + extra
        import comfy.ldm.modules.attention as attention

        calls.append(tuple(extra_options["cond_or_uncond"]))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) + 0.01

    patched = kit.model.clone()
    patched.set_model_attn2_replace(added_image_attention, "output", 2)
    kit.sample(kit.apply(model=patched))
    assert (0,) in calls and (1, 0) in calls  # the subject pass (cond only) and the CFG batch both ran it


def test_stock_inpaint_latent_nodes_keep_the_scene(kit, comfy):
    scene = torch.full((1, 64, 64, 3), 0.6)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    pos, neg = kit.text("a logo"), kit.text("")

    def run(model, latent):
        return comfy.common_ksampler(model, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    # VAEEncodeForInpaint on the 9-channel UNet
    latent = comfy.VAEEncodeForInpaint().encode(kit.vae, scene, mask, 0)[0]
    kit.assert_scene_outside(run(kit.apply(), latent), latent["samples"], run(kit.model, latent))
    # SetLatentNoiseMask on a plain 4-channel SD1.5 UNet
    plain_model, plain_clip, plain_vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
    latent = comfy.SetLatentNoiseMask().set_mask({"samples": plain_vae.encode(scene)}, mask)[0]
    recycled = kit.apply(model=plain_model)
    kit.assert_scene_outside(run(recycled, latent), latent["samples"], run(plain_model, latent))
