"""EqDiff nodes in ComfyUI: loader → apply → sampling → report; isolation, interruption, coexistence."""
from __future__ import annotations

import pytest
import torch

from standalone.tiny_eqdiff import build_eqdiff_weights


class Kit:
    def __init__(self, nodes, folder):
        import folder_paths

        self.nodes = nodes
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        folder_paths.add_model_folder_path("eqdiff", str(folder), is_default=True)
        build_eqdiff_weights(folder / "tiny_subject.safetensors", self.model)
        self.reference = torch.rand(1, 80, 64, 3, generator=torch.Generator().manual_seed(0))
        # encoded once: the full CLIP-L text encoder takes seconds per prompt on a CPU
        self.positive = nodes.CLIPTextEncode().encode(self.clip, "a watercolor painting of sks cat")[0]
        self.negative = nodes.CLIPTextEncode().encode(self.clip, "")[0]

    def node(self, name):
        return self.nodes.NODE_CLASS_MAPPINGS[name]()

    def weights(self):
        return self.node("SC_EqDiffLoader").load("tiny_subject.safetensors")

    def apply(self, model=None, **kwargs):
        args = dict(strength=1.0, start_percent=0.0, end_percent=1.0, reference_mode="clean", seed=0,
                    reference_size=64)
        args.update(kwargs)
        return self.node("SC_EqDiffApply").apply(self.model if model is None else model, self.vae,
                                                 self.weights()[0], self.reference, **args)[0]

    def sample(self, model, seed=1, steps=3, callback=None):
        pos, neg = self.positive, self.negative
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        if callback is None:
            return self.nodes.common_ksampler(model, seed, steps, 7.5, "euler", "normal", pos, neg,
                                              latent)[0]["samples"]
        import comfy.sample

        noise = comfy.sample.prepare_noise(latent["samples"], seed)
        return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", pos, neg, latent["samples"],
                                   callback=callback, disable_pbar=True, seed=seed)


@pytest.fixture(scope="module")
def kit(comfy, tmp_path_factory):
    return Kit(comfy, tmp_path_factory.mktemp("eqdiff_models"))


def test_loader_reports_the_companion_files(kit):
    weights, info = kit.weights()
    from model_patches.eqdiff_rra import rra_slots

    assert weights.layers == [slot.name for slot in rra_slots(kit.model)]
    assert weights.layers[0] == "middle0.0" and all(name.startswith("output") for name in weights.layers[1:])
    assert "embedding: tiny_subject" in info and "lora: tiny_subject_kv.safetensors" in info


def test_apply_changes_sampling_and_leaves_the_input_model_alone(kit):
    base = kit.sample(kit.model)
    patched = kit.apply()
    out = kit.sample(patched)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4
    assert torch.equal(kit.sample(kit.model), base)
    assert torch.equal(kit.sample(patched), out)  # repeatable: nothing carried over between samplings


def test_each_step_runs_one_reference_pass_on_the_reference_latent(kit):
    from model_patches.eqdiff_rra import STATUS_KEY
    from model_patches.unet_layout import diffusion_model_of

    calls = []

    def hook(module, args, kw):
        status = kw.get("transformer_options", {}).get(STATUS_KEY)
        calls.append((type(status).__name__, args[0].shape[0]))

    handle = diffusion_model_of(kit.model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        kit.sample(kit.apply(), steps=3)
    finally:
        handle.remove()
    # per step: one batch-1 reference pass (Capture), then cond + uncond in one batch (Read)
    assert calls == [("Capture", 1), ("Read", 2)] * 3


def test_reference_modes_and_window_differ_and_stay_finite(kit):
    outs = {mode: kit.sample(kit.apply(reference_mode=mode), steps=2) for mode in ("clean", "noised", "training")}
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert not torch.equal(outs["clean"], outs["noised"]) and not torch.equal(outs["noised"], outs["training"])
    late = kit.sample(kit.apply(start_percent=0.5), steps=2)
    assert not torch.equal(late, outs["clean"])


def test_report_and_heatmap_describe_the_last_sampling(kit):
    patched = kit.apply(record=True)
    samples = {"samples": kit.sample(patched)}
    report, heatmap = kit.node("SC_EqDiffReferenceReport").report(patched, samples, 40, 24)
    assert "output3.0" in report and "middle0.0" in report
    assert heatmap.shape == (2, 24, 40, 3) and torch.isfinite(heatmap).all()
    recorder = patched.get_attachment("subject_customization.eqdiff").recorder
    assert all(len(v) == 3 for v in recorder.per_layer.values())  # three steps, reset per sampling
    kit.sample(patched)
    assert all(len(v) == 3 for v in recorder.per_layer.values())


def test_an_interrupted_sampling_leaves_nothing_behind(kit):
    patched = kit.apply()
    clean = kit.sample(patched)

    def stop(step, *args):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kit.sample(patched, callback=stop)
    patch = patched.get_attachment("subject_customization.eqdiff")
    assert patch._banks == []
    assert torch.equal(kit.sample(patched), clean)


def test_coexists_with_anylogo_applied_after_and_refuses_before(kit, anylogo_kit):
    both = anylogo_kit.apply(model=kit.apply())
    out = kit.sample(both)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, kit.sample(kit.apply()))  # AnyLogo's recycling runs too
    with pytest.raises(ValueError, match="apply EqDiff before AnyLogo"):
        kit.apply(model=anylogo_kit.apply(model=kit.model))


def test_coexists_with_an_ipadapter_style_attn2_patch(kit):
    """An attn2 patch (IPAdapter's slot) on the same model keeps running under EqDiff."""
    seen = []

    def attn2_patch(n, context, value, extra_options):
        seen.append(extra_options["block"])
        return n, context, value

    model = kit.model.clone()
    model.set_model_attn2_patch(attn2_patch)
    out = kit.sample(kit.apply(model=model))
    assert torch.isfinite(out).all() and seen
