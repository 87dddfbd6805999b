"""P3S Loader + Apply in sampling: strength 0 is the plain model, the original MODEL is untouched, the copy is
loaded with the MODEL, and P3S chains with a LoRA, a ControlNet and AnyLogo on the same model (or says why not).

The weights are a random-weight P3S file for the tiny SD1.5 with non-zero projections (a "trained" copy), so
the injection visibly acts."""
from pathlib import Path

import pytest
import torch

from standalone import tiny_models


class P3SKit:
    steps = 3

    def __init__(self, nodes, folder):
        import folder_paths

        from model_patches.p3s_copy import InjectionCopy, layout_signature
        from model_patches.p3s_rngr import RNGREncoder
        from model_patches.p3s_weights import export_tensors, save_p3s_weights
        from model_patches.unet_layout import ARCHITECTURES

        self.nodes = nodes
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        copy = InjectionCopy(self.model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for proj in (*copy.self_proj, *copy.cross_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.05)
            copy.gates.copy_(0.5 + torch.rand(copy.gates.shape, generator=gen))
        tensors = export_tensors(copy, RNGREncoder(clip_width=64), torch.randn(1, 4, 8, 8, generator=gen),
                                 torch.randn(1, 257, 64, generator=gen), dtype=torch.float16)
        save_p3s_weights(folder / "subject.safetensors", tensors, {
            "base_architecture": ARCHITECTURES[4], "copy_layout": layout_signature(self.model), "lambda": 0.2,
            "resolution": 64, "clip_size": 224, "prompt": "a photo of sks toy"})
        folder_paths.add_model_folder_path("p3s", str(folder), is_default=True)
        self.weights, self.prompt = nodes.NODE_CLASS_MAPPINGS["SC_P3SLoader"]().load("subject.safetensors")

    def apply(self, model=None, **kwargs):
        args = dict(strength=1.0, weight_curve="paper", alpha=0.5, beta=0.2, k=2.0, start_percent=0.0,
                    end_percent=1.0)
        args.update(kwargs)
        node = self.nodes.NODE_CLASS_MAPPINGS["SC_P3SApply"]()
        return node.apply(self.model if model is None else model, self.weights, **args)[0]

    def sample(self, model, control=None, seed=1):
        pos = self.nodes.CLIPTextEncode().encode(self.clip, self.prompt)[0]
        neg = self.nodes.CLIPTextEncode().encode(self.clip, "")[0]
        if control is not None:
            pos, neg = control(pos, neg)
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return self.nodes.common_ksampler(model, seed, self.steps, 5.0, "euler", "normal", pos, neg,
                                          latent)[0]["samples"]


@pytest.fixture(scope="module")
def kit(comfy, tmp_path_factory):
    kit = P3SKit(comfy, tmp_path_factory.mktemp("p3s_models"))
    kit.applied = kit.apply()
    kit.injected = kit.sample(kit.applied)
    return kit


def test_loader_returns_the_weights_and_the_training_prompt(kit):
    assert kit.prompt == "a photo of sks toy"
    assert kit.weights.lam == 0.2 and kit.weights.reference_latent.shape == (1, 4, 8, 8)


def test_strength_0_is_the_plain_model_and_the_injection_acts(kit):
    plain = kit.sample(kit.model)
    assert torch.equal(kit.sample(kit.apply(strength=0.0)), plain)
    assert not torch.allclose(kit.injected, plain, atol=1e-4)
    late = kit.sample(kit.apply(start_percent=0.5))       # active in the second half only: in between
    assert not torch.equal(late, plain) and not torch.equal(late, kit.injected)


def test_the_original_model_is_untouched_and_the_copy_loads_with_the_model(kit):
    before = kit.sample(kit.model)
    patched = kit.applied
    assert torch.equal(kit.sample(kit.model), before)
    assert kit.model.get_attachment("subject_customization.p3s") is None
    extra = patched.get_additional_models_with_key("subject_customization.p3s")
    # what sampling loads next to the MODEL (comfy.sampler_helpers prepares the nested additional models)
    assert len(extra) == 1 and extra[0] in patched.get_nested_additional_models()
    assert extra[0].model["copy"] is patched.get_attachment("subject_customization.p3s").copy


def test_chains_with_a_lora_loaded_by_the_stock_node(kit, tmp_path):
    import comfy.utils
    import folder_paths
    from model_patches.weight_files import save_weights

    key = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight"
    weight = comfy.utils.get_attr(kit.model.model, key)
    save_weights(tmp_path / "p3s_delta.safetensors",
                 {key.replace(".weight", ".diff"): torch.randn(weight.shape) * 0.1}, {"method": "test"})
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    lora = lambda m, s: kit.nodes.LoraLoaderModelOnly().load_lora_model_only(m, "p3s_delta.safetensors", s)[0]  # noqa
    before, after = kit.sample(kit.apply(model=lora(kit.model, 1.0))), kit.sample(lora(kit.applied, 1.0))
    assert not torch.equal(before, kit.injected)
    torch.testing.assert_close(before, after)  # the LoRA patches the frozen UNet whichever comes first


def test_controlnet_residuals_still_reach_the_unet(kit, tiny_cache_dir):
    import comfy.controlnet

    control_net = comfy.controlnet.load_controlnet(str(tiny_models.build_controlnet(
        tiny_cache_dir / "controlnet" / "tiny_controlnet.safetensors")))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def control(strength):
        return lambda pos, neg: kit.nodes.ControlNetApplyAdvanced().apply_controlnet(
            pos, neg, control_net, hint, strength, 0.0, 1.0, vae=kit.vae)[:2]

    assert not torch.equal(kit.sample(kit.applied, control=control(1.0)), kit.injected)
    assert torch.equal(kit.sample(kit.applied, control=control(0.0)), kit.injected)


def test_chains_with_anylogo_on_the_same_model(kit):
    """AnyLogo's recycling replacement receives the self-attention K/V P3S widened and appends the subject's:
    both act, in either order. The order matters on the layers both patch: AnyLogo applied first keeps its
    replacement there and reads P3S's keys ungated (plain Eq. 8) in every row; applied after P3S it wraps P3S's
    gated attention, which then runs in the rows AnyLogo does not read (README, Coexistence)."""
    subject = torch.ones(1, 40, 72, 3)
    subject[:, 10:30, 20:50] = torch.tensor([0.1, 0.2, 0.8])

    def anylogo(model):
        node = kit.nodes.NODE_CLASS_MAPPINGS["SC_AnyLogoApply"]()
        return node.apply(model, kit.vae, subject, "decoder", 1.0, 1.0, 0.0, 1.0, 0, 64)[0]

    anylogo_only = kit.sample(anylogo(kit.model))
    first, second = kit.sample(anylogo(kit.applied)), kit.sample(kit.apply(model=anylogo(kit.model)))
    for both in (first, second):
        assert not torch.equal(both, kit.injected) and not torch.equal(both, anylogo_only)


def test_a_format_1_file_loads_with_every_gate_at_1(kit, tmp_path):
    """Files from before the gate (format 1, no copy.gates) were trained with the plain Eq. 8: they load with
    every gate at 1, which is that attention exactly."""
    import folder_paths
    from model_patches.weight_files import load_weights, save_weights

    tensors, metadata = load_weights(Path(folder_paths.get_full_path("p3s", "subject.safetensors")), method="p3s",
                                     supported_version=2)
    del tensors["copy.gates"]
    save_weights(tmp_path / "old_subject.safetensors", tensors, {**metadata, "format_version": "1"})
    folder_paths.add_model_folder_path("p3s", str(tmp_path))
    weights = kit.nodes.NODE_CLASS_MAPPINGS["SC_P3SLoader"]().load("old_subject.safetensors")[0]
    patched = kit.nodes.NODE_CLASS_MAPPINGS["SC_P3SApply"]().apply(kit.model, weights, 1.0, "paper", 0.5, 0.2, 2.0,
                                                                   0.0, 1.0)[0]
    copy = patched.get_attachment("subject_customization.p3s").copy
    assert torch.equal(copy.gates, torch.ones_like(copy.gates))
    assert not torch.equal(kit.sample(patched), kit.injected)  # the new file's gates are not 1


def test_sag_and_pag_layers_are_left_to_them(kit):
    """Core SAG records square self-attention maps in the middle block and PAG returns V there: with widened K/V
    both would crash. P3S leaves a layer another node replaced to it (a warning says so) and injects everywhere
    else: sampling runs and differs from each alone."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    sag = lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0)[0]  # noqa: E731
    pag = lambda m: PerturbedAttentionGuidance.execute(m, 3.0)[0]  # noqa: E731
    for other in (sag, pag):
        both = kit.sample(other(kit.applied))
        assert not torch.equal(both, kit.injected) and not torch.equal(both, kit.sample(other(kit.model)))
