"""The CustomContrast trainer: multi-view manifest checks, the subject-grouped sample stream, Eq. 9's composition,
and parity of the trainer's forward with the CustomContrast Apply path loaded from the export (cond and uncond).

Data: three procedural subjects (a coloured square on a plain background), two or three 64 px views each with
masks. Models: the tiny SD1.5 with its text encoder cut to 2 blocks (``shallow_text_encoder``, on the trainer's and
the node's CLIP alike: S+ runs the text encoder once per cross-attention layer and sample), the tiny CLIP vision
saved as a file with its config, a small MFI encoder. One in-process run of 2 steps feeds the model-level tests.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from standalone.tiny_models import shallow_text_encoder
from train import customcontrast_data as data
from train.config import parse_command_line
from train.distributed import DistInfo
from train.engine import Trainer
from train.manifest import ManifestError, read_manifest

sys.path.append(str(Path(__file__).resolve().parent))
from customcontrast_tiny import CAPTIONS, ShallowTextMethod, _png, write_config, write_files, write_views  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("cc_data"))


# ---- data -------------------------------------------------------------------------------------------------------

def test_prepare_manifest_groups_views_by_subject_folder(files):
    rows = [json.loads(line) for line in (files / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["subject"] for r in rows) == ["s0", "s0", "s1", "s1", "s2", "s2"]
    assert all(r["mask"].endswith("_mask.png") and r["caption"] == CAPTIONS[int(r["image"][-5]) % 2] for r in rows)


def test_manifest_errors_name_the_lines(tmp_path):
    folder = write_views(tmp_path, views=(2, 1))
    _png(folder / "s0" / "small_mask.png", np.full((32, 64), 255))
    _png(folder / "s0" / "empty_mask.png", np.zeros((64, 64)))
    rows = [{"subject": "s0", "image": "s0/v0.png", "mask": "s0/v0_mask.png"},
            {"subject": "s0", "image": "s0/v1.png", "mask": "s0/v1_mask.png"},
            {"subject": "s1", "image": "s1/v0.png", "mask": "s1/v0_mask.png"},          # the only view of s1
            {"subject": "s0", "image": "s0/v1.png", "mask": "s0/small_mask.png"},
            {"subject": "s0", "image": "s0/v1.png", "mask": "s0/empty_mask.png"},
            {"subject": "s0", "image": "s0/v1.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as error:
        read_manifest(manifest, data.MANIFEST_SCHEMA)
    text = str(error.value)
    for expected in ("line 3: subject 's1' has 1 view (line 3); CustomContrast needs at least 2 views",
                     "line 4: mask 's0/small_mask.png' (mask) is 64x32 but image 's0/v1.png' (image) is 64x64",
                     "line 5: mask 'empty_mask.png' is empty", "line 6: missing field 'mask'"):
        assert expected in text, (expected, text)
    report = read_manifest(manifest, data.MANIFEST_SCHEMA, on_bad_row="skip")
    assert [r["_line"] for r in report.rows] == [1, 2]


# ---- the sample stream ------------------------------------------------------------------------------------------

def _stream(views_of_subjects, views=2, seed=0):
    subjects = [s for s, n in enumerate(views_of_subjects) for _ in range(n)]
    return subjects, data.SubjectViewStream(subjects, views, seed)


@pytest.mark.parametrize("views", [2, 3])
def test_every_global_batch_holds_views_of_each_drawn_subject(views):
    subjects, stream = _stream([2, 5, 3, 4, 3, 6, 3], views=views)
    batch = 2 * views
    stream.check_split(batch, views)
    positions = range(0, 40 * batch)
    indices = [stream.index_at(p) for p in positions]
    for start in range(0, len(indices), batch):          # each global batch (and each micro-step of `views`)
        for m in range(start, start + batch, views):
            group = indices[m:m + views]
            assert len({subjects[i] for i in group}) == 1     # one subject per group of `views` positions
            assert len(set(group)) == min(views, subjects.count(subjects[group[0]]))  # distinct views
    # deterministic: a fresh stream (a resumed run, another process) reads the same order from any position
    again = _stream([2, 5, 3, 4, 3, 6, 3], views=views)[1]
    assert [again.index_at(p) for p in reversed(positions)] == indices[::-1]
    # covers the data: within ceil(max views / views) epochs every row was drawn
    epochs = -(-6 // views)
    assert set(indices[:epochs * stream.epoch_length]) == set(range(len(subjects)))
    # another seed, another order
    assert [_stream([2, 5, 3, 4, 3, 6, 3], views=views, seed=1)[1].index_at(p) for p in positions] != indices


def test_a_split_that_cuts_a_subject_group_is_refused():
    _, stream = _stream([2, 2, 2])
    with pytest.raises(ValueError, match="multiples of views_per_subject"):
        stream.check_split(4, 1)    # micro-batch 1 on 1 process would put the two views in different batches
    stream.check_split(4, 2)


# ---- a short run -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dirs, files):
    from train.customcontrast import CustomContrastConfig

    root = tmp_path_factory.mktemp("cc_run")
    cfg = write_config(root / "cfg.yaml", model_dirs, files)
    config, _ = parse_command_line(CustomContrastConfig, ["--config", str(cfg), "--output_dir", str(root / "out")])
    config.method = "customcontrast"
    trainer = Trainer(ShallowTextMethod.make()(config), DistInfo())
    trainer.prepare()
    trainer.train()
    return {"trainer": trainer, "out": root / "out"}


def test_the_loss_is_ldm_plus_weighted_contrastive_and_location_terms(trained):
    """Eq. 9 against its parts computed here from the same forward: eps-MSE, Eq. 4 and Eq. 7 on the encoder's
    outputs, L_loc on the recorded map (float32, same operations; rtol 1e-6)."""
    from model_patches.customcontrast_losses import appearance_factors, cscl_loss, location_loss, macl_loss
    from train.customcontrast_step import customcontrast_forward, customcontrast_loss
    from train.diffusion import noised

    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    model = ctx.base.model
    batch = method.collate([trainer.dataset[i] for i in range(4)])
    inputs = method.step_inputs(batch, ctx)
    assert len({tuple(p.key_positions(0)) for p in inputs.prompts}) == 2  # two placeholder positions in the batch
    sigma = model.model_sampling.sigmas[[100, 400, 700, 900]].float()
    noise = torch.randn(inputs.z0.shape, generator=torch.Generator().manual_seed(3))
    total, parts = customcontrast_loss(method.patch, method.patched, inputs, sigma, noise, method.weights)
    x = noised(model, inputs.z0, noise, sigma)
    out, state = customcontrast_forward(method.patch, method.patched, x, sigma, inputs)
    ldm = ((x - out) / sigma.view(-1, 1, 1, 1) - noise).square().mean()
    o = state.outputs
    l_c = cscl_loss(o.visual_cls, o.text_cls)
    l_m = macl_loss(o.s_plus, appearance_factors(inputs.appearance, 0.25), inputs.subjects, 0.07)
    l_loc = location_loss(state.recorder.aggregated(0, size=(8, 8)), inputs.masks)
    want = ldm + 1e-2 * (l_c + l_m) + 1e-3 * l_loc
    for name, value in (("ldm", ldm), ("cscl", l_c), ("macl", l_m), ("loc", l_loc)):
        torch.testing.assert_close(parts[name], value.detach(), rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-6, atol=0)
    assert float(l_c.detach()) > 0 and float(l_loc.detach()) != 0  # the terms are there, not zero by construction
    assert method.weights.contrastive == 1e-2 and method.weights.location == 1e-3
    assert method.weights.min_similarity == 0.25 and method.weights.cscl_negatives == "all"
    # the trainer's cscl_negatives option reaches the loss: CSCL over other subjects, the rest unchanged
    import dataclasses

    other = dataclasses.replace(method.weights, cscl_negatives="other_subjects")
    _, parts_other = customcontrast_loss(method.patch, method.patched, inputs, sigma, noise, other)
    torch.testing.assert_close(parts_other["cscl"], cscl_loss(o.visual_cls, o.text_cls, inputs.subjects).detach(),
                               rtol=1e-6, atol=0)
    assert float((parts_other["cscl"] - parts["cscl"]).abs()) > 1e-4  # two views per subject: the term differs
    torch.testing.assert_close(parts_other["macl"], parts["macl"], rtol=0, atol=0)


def test_export_metadata_and_what_trains(trained):
    from model_patches.customcontrast_weights import load_customcontrast_weights

    trainer = trained["trainer"]
    weights = load_customcontrast_weights(trained["out"] / "customcontrast.safetensors")
    meta = weights.metadata
    assert meta["method"] == "customcontrast" and meta["trained_steps"] == "2"
    assert meta["base_hash"] == f"sha256:{trainer.ctx.base.sha256}"
    assert weights.image_layers == [2, 4, 6]  # thirds of the tiny 6-layer CLIP vision
    assert all(n.startswith(("encoder.", "visual.")) for n in trainer.names)
    moved = max(float(p.detach().abs().max()) for n, p in weights.visual_attention.named_parameters())
    assert moved > 1e-4, "K_v/V_v start at zero and must have trained"


def test_the_trainer_forward_equals_the_apply_path_loaded_from_the_export(trained, comfy):
    """Same view, latent and sigma: the trainer's prediction equals what CustomContrast Apply (weights through
    the Loader from the export, subject through CLIP Hierarchical Encode with its mask) predicts for a CFG batch
    [uncond ; cond] in one UNet call (float32 on both sides; atol 1e-5 of the output's scale)."""
    import folder_paths

    from train.customcontrast_step import customcontrast_forward

    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    folder_paths.add_model_folder_path("customcontrast", str(trained["out"]), is_default=True)
    weights = comfy.NODE_CLASS_MAPPINGS["SC_CustomContrastLoader"]().load("customcontrast.safetensors")[0]
    model, clip = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    shallow_text_encoder(clip)
    item = trainer.dataset[0]
    encode = comfy.NODE_CLASS_MAPPINGS["SC_CLIPHierarchicalEncode"]()
    embeds = encode.encode(method.clip_vision, item["image"].movedim(0, -1)[None], "2,4,6", "center_crop", 0.0,
                           0xFFFFFF, True, False, item["mask"][None])[0]
    patched = comfy.NODE_CLASS_MAPPINGS["SC_CustomContrastApply"]().apply(
        model, clip, weights, embeds, item["caption"], "sks", 1.0, 0.0, 1.0)[0]
    inputs = method.step_inputs(method.collate([item]), ctx)
    negative = method.texts("")[None]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)).expand(2, -1, -1, -1)
    sigma = ctx.base.model.model_sampling.sigmas[[600, 600]].float()
    context = torch.cat([negative, inputs.context])
    # the Apply node's work happens in an APPLY_MODEL wrapper, which ComfyUI hands to the model call at sampling
    options = {**patched.model_options["transformer_options"], "wrappers": patched.wrappers,
               "cond_or_uncond": [1, 0]}
    with torch.no_grad():
        node = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        inputs.context = context
        ours, _ = customcontrast_forward(method.patch, method.patched, x, sigma, inputs, cond_or_uncond=(1, 0))
        plain = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options={})
    scale = float(node.abs().max())
    torch.testing.assert_close(ours, node, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(node[0], plain[0], atol=1e-6 * scale, rtol=0)  # uncond row: untouched (batched kernel)
    assert float((node[1] - plain[1]).abs().max()) > 1e-4 * scale        # cond row: CustomContrast acts



def test_per_row_placeholder_positions_equal_each_row_computed_alone():
    """A training batch mixes captions, so the shared location functions take one list of placeholder keys per
    row: each row's map and masked attention equal that row computed alone with its own keys (float32, the same
    operations per row; rtol 1e-6). Rows of different lengths are padded with zero-probability columns."""
    from model_patches import customcontrast_location as location

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 6, generator=g)
    per_row = location.key_positions(6, 3, [[1], [0, 2]])
    assert per_row == [[1, 4], [0, 2, 3, 5]]
    probabilities = location.placeholder_probabilities(q, k, 2, per_row)
    text = torch.randn(2, 6, 8, generator=g)
    masked = location.mask_placeholder(text, probabilities, v, per_row, keep, 2)
    for r, indices in enumerate(per_row):
        alone = location.placeholder_probabilities(q[r:r + 1], k[r:r + 1], 2, indices)
        torch.testing.assert_close(location.placeholder_map(probabilities[r:r + 1]), location.placeholder_map(alone),
                                   rtol=1e-6, atol=0)
        want = location.mask_placeholder(text[r:r + 1], alone, v[r:r + 1], indices, keep[r:r + 1], 2)
        torch.testing.assert_close(masked[r:r + 1], want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(probabilities[0, ..., :2], probabilities[1, ..., :2])  # the rows' keys really differ


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(trained):
    """With every UNet block checkpointed, the attention (and its location maps) runs again in backward; the
    shared recorder, closed once Ā is read, ignores the replay, so loss and gradients equal the plain run's
    (float32, the same operations recomputed; rtol 1e-5 for the recomputation's summation order)."""
    from train.customcontrast_step import customcontrast_loss
    from train.grad_checkpoint import enable_gradient_checkpointing

    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    inputs = method.step_inputs(method.collate([trainer.dataset[i] for i in range(4)]), ctx)
    sigma = ctx.base.model.model_sampling.sigmas[[100, 400, 700, 900]].float()
    noise = torch.randn(inputs.z0.shape, generator=torch.Generator().manual_seed(5))
    params = [p for p in trainer.params]

    def run():
        total, _ = customcontrast_loss(method.patch, method.patched, inputs, sigma, noise, method.weights)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return total.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    plain_loss, plain = run()
    handle = enable_gradient_checkpointing(ctx.base.unet)
    assert handle.modules  # every ResBlock and transformer block now recomputes in backward
    try:
        loss, grads = run()
    finally:
        handle.remove()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    for g, want in zip(grads, plain):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6 * float(want.abs().max() + 1e-12))
    assert any(float(g.abs().max()) > 0 for g in plain)


def test_the_paper_settings_are_the_defaults_and_the_shipped_config(trained):
    """λ1 1e-2, λ2 1e-3, lr 3e-5 by default and in train/configs/customcontrast_sd15.yaml (which also asks for
    bf16 autocast and gradient checkpointing on GPU); the UNet, the text encoder and CLIP vision are frozen."""
    import yaml

    from train.customcontrast import CustomContrastConfig

    defaults = CustomContrastConfig()
    assert (defaults.contrastive_weight, defaults.location_weight, defaults.learning_rate) == (1e-2, 1e-3, 3e-5)
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "train" / "configs" /
                              "customcontrast_sd15.yaml").read_text())
    assert (shipped["contrastive_weight"], shipped["location_weight"], shipped["learning_rate"]) == (1e-2, 1e-3, 3e-5)
    assert shipped["mixed_precision"] == "bf16" and shipped["gradient_checkpointing"] is True
    assert shipped["steps"] == 200000 and shipped["encoder_depth"] == 4
    trainer = trained["trainer"]
    base = trainer.ctx.base
    trained_ids = {id(p) for p in trainer.params}
    for module in (base.unet, base.clip.cond_stage_model, trainer.method.clip_vision.model):
        assert not any(p.requires_grad or id(p) in trained_ids for p in module.parameters())
