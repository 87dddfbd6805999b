"""The finetune method end to end, in-process: it learns, its export carries the metadata, and the stock
LoraLoaderModelOnly applies the export so that the patched UNet holds exactly the trained weights."""
import json
import stat

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from train.base_model import file_sha256
from train.config import parse_command_line
from train.distributed import DistInfo
from train.engine import Trainer
from train.finetune import FinetuneConfig, FinetuneMethod, diff_key, main
from train.randomness import SampleRandom

STEPS = 24


def _held_out_loss(trainer, batch) -> float:
    """Mean loss over fixed draws (steps the run never uses), so before/after differ only by the weights."""
    with torch.no_grad():
        losses = [trainer.method.training_loss(batch, trainer.ctx, SampleRandom(99, 10_000 + k, range(4), "cpu"))[0]
                  for k in range(6)]
    return float(torch.stack(losses).mean())


def _held_out_batch(trainer, root):
    """Four images the run never trains on: the manifest's kind (a red or blue square on the gradient, same two
    captions, so no new text encoding) at positions of another seed; dataset indices of their own (the latent
    cache is keyed by index)."""
    import numpy as np

    from train.finetune import ImageCaptionDataset

    rng = np.random.default_rng(123)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    rows = []
    for i, colour in enumerate(("blue", "red", "red", "blue")):
        image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1)
        y, x = rng.integers(8, 40, size=2)
        image[y:y + 20, x:x + 20] = {"red": (230, 20, 20), "blue": (30, 40, 220)}[colour]
        Image.fromarray(image.astype(np.uint8)).save(root / f"held_out_{i}.png")
        rows.append({"image": str(root / f"held_out_{i}.png"), "caption": f"a {colour} square"})
    items = [{**ImageCaptionDataset(rows, 64)[i], "index": 100 + i} for i in range(4)]
    return trainer.method.collate(items)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, finetune_config):
    root = tmp_path_factory.mktemp("finetune")
    cfg = finetune_config(root / "cfg.yaml", steps=STEPS, learning_rate=1e-3, caption_dropout=0.0,
                          checkpoint_every=STEPS, export_every=12, validation_every=STEPS,
                          validation_prompts=["a red square"], validation_steps=2, max_grad_norm=1.0)
    config, _ = parse_command_line(FinetuneConfig, ["--config", str(cfg), "--output_dir", str(root / "out")])
    config.method = "finetune"
    trainer = Trainer(FinetuneMethod(config), DistInfo())
    trainer.prepare()
    batch = _held_out_batch(trainer, root)
    before = _held_out_loss(trainer, batch)
    trainer.train()
    after = _held_out_loss(trainer, batch)
    trained_values = {n: p.detach().clone() for n, p in zip(trainer.names, trainer.params)}
    yield {"out": root / "out", "before": before, "after": after, "trained": trained_values,
           "config": config, "initial": trainer.method.initial, "trainer": trainer}
    del trainer


def test_finetune_reduces_the_denoising_loss_on_images_it_never_saw(trained):
    print(f"held-out loss before {trained['before']:.4f}, after {trained['after']:.4f}")
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])


def test_export_metadata_keys_and_intervals(trained, model_dirs):
    out = trained["out"]
    path = out / "finetune.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    base = model_dirs["checkpoints"] / "tiny_sd15.safetensors"
    assert meta["method"] == "finetune" and meta["format_version"] == "1"
    assert meta["base_architecture"] == "sd15" and meta["base_name"] == "tiny_sd15.safetensors"
    assert meta["base_hash"] == f"sha256:{file_sha256(base)}"
    assert meta["trained_steps"] == str(STEPS) and meta["train_layers"] == "attention"
    assert json.loads(meta["config"]) == trained["config"].to_dict()
    assert keys == {diff_key(n) for n in trained["trained"]}
    assert any(k.endswith(".attn1.to_q.diff") for k in keys) and any(k.endswith(".diff_b") for k in keys)
    assert all(".attn1." in k or ".attn2." in k for k in keys)
    assert stat.S_IMODE(path.stat().st_mode) & 0o044, "the export must be readable by other users"
    with safe_open(str(out / "exports" / "finetune_step_00000012.safetensors"), framework="pt") as f:
        assert f.metadata()["trained_steps"] == "12"
    image = Image.open(out / "samples" / f"step_{STEPS:08d}" / "prompt_00.png")
    assert image.size == (64, 64) and image.mode == "RGB"


def test_stock_lora_loader_applies_the_export_exactly(trained, comfy, model_dirs):
    import folder_paths
    from comfy import model_management

    nodes = comfy  # the fixture is ComfyUI's nodes module
    folder_paths.add_model_folder_path("loras", str(trained["out"]))
    (model,) = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:1]
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "finetune.safetensors", 1.0)
    assert set(patched.patches) == set(trained["trained"]), "every exported delta must map onto a UNet weight"
    model_management.load_models_gpu([patched], force_full_load=True)
    try:
        weights = dict(patched.model.named_parameters())
        for name, value in trained["trained"].items():
            # base (fp16 file read as fp32) + fp32 delta = trained value up to one rounding of the addition
            assert torch.allclose(weights[name], value, rtol=0, atol=2e-7), name
            assert not torch.equal(weights[name], trained["initial"][name]), f"{name} did not train"
        untouched = "diffusion_model.input_blocks.0.0.weight"    # not an attention weight: left as loaded
        with safe_open(str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), framework="pt") as f:
            assert torch.equal(weights[untouched], f.get_tensor(f"model.{untouched}").float())
    finally:
        model_management.unload_all_models()


def _manifest_with_a_bad_row(tmp_path, finetune_manifest):
    lines = finetune_manifest.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(finetune_manifest.parent / row["image"])
    rows.insert(1, {"id": "lost", "image": "missing.png", "caption": "gone"})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_stop_before_loading_or_are_skipped_and_reported(tmp_path, finetune_config, finetune_manifest,
                                                                   capsys):
    manifest = _manifest_with_a_bad_row(tmp_path, finetune_manifest)
    cfg = finetune_config(tmp_path / "cfg.yaml", manifest=str(manifest), steps=1)
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert "line 2 (id 'lost'): image file 'missing.png' (image) does not exist" in err and "on_bad_row=skip" in err

    config, _ = parse_command_line(FinetuneConfig, ["--config", str(cfg), "--output_dir", str(tmp_path / "skip"),
                                                    "--on_bad_row", "skip"])
    trainer = Trainer(FinetuneMethod(config), DistInfo())
    trainer.prepare()
    assert len(trainer.dataset) == 4
    report = json.loads((tmp_path / "skip" / "manifest_report.json").read_text())
    assert report["usable_rows"] == 4 and [b["line"] for b in report["bad_rows"]] == [2]


def test_the_loss_is_the_epsilon_mse_of_the_same_draws_by_hand(trained):
    """ε-MSE by hand from a second generator set with the same seeds: dropout, a uniform timestep, noise; the
    model noised as z0 + σ·ε (EPS) and ε̂ = (x − D(x)) / σ. Equal to ~1e-6 relative: the same float32 operations,
    only a mean reduced in another order."""
    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    method.config.caption_dropout = 0.5  # both captions and the empty one take part
    try:
        batch = method.collate([trainer.dataset[i] for i in range(4)])
        draws = lambda: SampleRandom(5, 77, range(4), "cpu")  # noqa: E731
        with torch.no_grad():
            loss, _ = method.training_loss(batch, ctx, draws())
            rng = draws()
            dropped = [bool(torch.rand((), generator=g) < 0.5) for g in rng.generators]
            t = [int(torch.randint(0, 1000, (), generator=g)) for g in rng.generators]
            noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in rng.generators])
            model = ctx.base.model
            z0 = torch.stack([method.latents(i, p) for i, p in zip(batch["index"], batch["pixels"])])
            sigma = model.model_sampling.sigmas[t].float()
            x = z0 + sigma.view(-1, 1, 1, 1) * noise
            context = torch.stack([method.texts("" if d else c) for d, c in zip(dropped, batch["caption"])])
            eps = (x - model.apply_model(x, sigma, c_crossattn=context).float()) / sigma.view(-1, 1, 1, 1)
            by_hand = float(((eps - noise) ** 2).mean())
    finally:
        method.config.caption_dropout = 0.0
    assert 0 < sum(dropped) < 4
    print(f"loss {float(loss):.6f}, by hand {by_hand:.6f}")
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)


def test_timesteps_are_drawn_uniformly(trained):
    """20,000 per-sample draws over the 1000 training timesteps: chi-square (999 degrees of freedom, mean 999,
    sd 44.7) below mean + 5 sd, and both ends of the schedule drawn."""
    from train.diffusion import draw_sigmas

    model = trained["trainer"].ctx.base.model
    sigma = draw_sigmas(model, SampleRandom(0, 0, range(20_000), "cpu"))
    t = torch.searchsorted(model.model_sampling.sigmas.float(), sigma)
    assert torch.equal(model.model_sampling.sigmas.float()[t], sigma)
    counts = torch.bincount(t, minlength=1000).double()
    chi2 = float(((counts - 20.0) ** 2 / 20.0).sum())
    print(f"chi-square {chi2:.1f} (999 dof)")
    assert chi2 < 999 + 5 * 44.7 and counts[0] > 0 and counts[999] > 0


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory, finetune_config):
    """Two steps of global batch 2 in one process: micro-batch 1 x 2 accumulated vs one micro-batch of 2.
    Gradient clipping off: clipping rescales the gradient, which would hide a wrong accumulation scale."""
    root = tmp_path_factory.mktemp("accumulation")
    states = {}
    for micro in (1, 2):
        cfg = finetune_config(root / f"cfg{micro}.yaml", steps=2, checkpoint_every=2, caption_dropout=0.5,
                              max_grad_norm=0.0, micro_batch_size=micro)
        config, _ = parse_command_line(FinetuneConfig, ["--config", str(cfg), "--output_dir", str(root / f"m{micro}")])
        config.method = "finetune"
        trainer = Trainer(FinetuneMethod(config), DistInfo())
        trainer.prepare()
        assert trainer.order.accumulation == 2 // micro
        trainer.train()
        states[micro] = ({n: p.detach().clone() for n, p in zip(trainer.names, trainer.params)},
                         [{k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in trainer.params])
        del trainer
    return states


def test_gradient_accumulation_equals_the_full_micro_batch(accumulation_runs):
    """AdamW's first and second moments (linear / quadratic in the averaged gradients) agree: a missing division
    by the accumulation count would double the first moment (the weights barely show it: Adam is nearly scale
    invariant). Tolerance: the two runs differ in float summation order only (a batch-2 matmul vs two batch-1
    passes): first moment within 1e-5 of its largest entry (1e-8 absolute at the least)."""
    (w1, s1), (w2, s2) = accumulation_runs[1], accumulation_runs[2]
    m1 = torch.cat([s["exp_avg"].flatten() for s in s1])
    m2 = torch.cat([s["exp_avg"].flatten() for s in s2])
    v1 = torch.cat([s["exp_avg_sq"].flatten() for s in s1])
    v2 = torch.cat([s["exp_avg_sq"].flatten() for s in s2])
    scale = float(m2.abs().max())
    print(f"first moment: max |diff| {float((m1 - m2).abs().max()):.3g} of scale {scale:.3g}; second moment: "
          f"max |diff| {float((v1 - v2).abs().max()):.3g} of {float(v2.max()):.3g}")
    assert scale > 0
    assert float((m1 - m2).abs().max()) <= max(1e-8, 1e-5 * scale)
    assert float((v1 - v2).abs().max()) <= 1e-4 * float(v2.max())
    assert float(m1.dot(m2) / (m1.norm() * m2.norm())) > 1 - 1e-9
    moved = max(float((w1[n] - w2[n]).abs().max()) for n in w1)
    assert moved <= 5e-5  # the weights (see test_train_ddp for why AdamW's update is compared loosely)
