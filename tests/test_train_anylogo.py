"""The AnyLogo trainer: data preparation, sparse recycling draws, parity with the node path, export, learning.

One short training run (module fixture) on a logo-in-scene set built from bundled material serves the
learning, export and parity tests; the forward-level tests use its loaded model and method.
"""
import json
import math

import pytest
import torch
from safetensors import safe_open

from model_patches.anylogo_weights import check_fits_model, load_anylogo_weights
from model_patches.extra_pass import seeded_noise
from model_patches.image_context import ImageContextPatch, group_tokens
from model_patches.weight_files import WeightFileError, save_weights
from standalone import logo_scenes
from train import anylogo_data as data
from train.anylogo import AnyLogoConfig, AnyLogoMethod, main
from train.anylogo_step import anylogo_forward, encode_latent, inpaint_inputs, keep_decisions
from train.config import ConfigError, build_config, parse_command_line
from train.distributed import DistInfo
from train.engine import Trainer
from train.prepare_manifest import cli
from train.randomness import SampleRandom

STEPS = 16


def _png(path, array):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# ---- data preparation ------------------------------------------------------------------------------------------

def test_prepare_manifest_builds_sources_and_boxes_and_reports_skipped_rows(tmp_path, capsys):
    import numpy as np

    data_dir = tmp_path / "data"
    pairs = logo_scenes.make_pairs(2, scene_size=32, region=16, subjects=range(0, 2))
    logo_scenes.write_pairs(data_dir, pairs, scene_size=32, subject_size=16)
    loose = data_dir / "loose"                        # a row with a box instead of a mask, at the top level
    _png(data_dir / "boxed.png", np.zeros((24, 32, 3)))
    (data_dir / "boxed_box.json").write_text("[4, 2, 20, 18]")
    _png(data_dir / "boxed_subject.png", np.full((10, 14, 3), 200))
    _png(loose / "lonely.png", np.zeros((16, 16, 3)))
    _png(loose / "small.png", np.zeros((16, 16, 3)))
    _png(loose / "small_mask.png", np.full((8, 16), 255))
    _png(loose / "small_subject.png", np.zeros((8, 8, 3)))
    _png(loose / "empty.png", np.zeros((16, 16, 3)))
    _png(loose / "empty_mask.png", np.zeros((16, 16)))
    _png(loose / "empty_subject.png", np.zeros((8, 8, 3)))
    _png(loose / "outside.png", np.zeros((16, 16, 3)))
    (loose / "outside_box.json").write_text("[4, 4, 40, 12]")
    _png(loose / "outside_subject.png", np.zeros((8, 8, 3)))
    _png(loose / "nobox.png", np.zeros((16, 16, 3)))
    (loose / "nobox_box.json").write_text("[4, 4,")
    _png(loose / "nobox_subject.png", np.zeros((8, 8, 3)))
    _png(loose / "noregion.png", np.zeros((16, 16, 3)))
    _png(loose / "noregion_subject.png", np.zeros((8, 8, 3)))
    out = data_dir / "manifest.jsonl"
    assert cli([str(data_dir), "--out", str(out), "--method", "anylogo"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 rows" in printed and "skipped 6" in printed
    for reason in ("lonely.png: no subject file (lonely_subject.png or",
                   "loose/small: mask 'loose/small_mask.png' (mask) is 16x8 but image "
                   "'loose/small.png' (scene) is 16x16",
                   "loose/empty: mask 'empty_mask.png' is empty",
                   "loose/outside: box [4, 4, 40, 12] is empty or outside the 16x16 scene",
                   "nobox.png: nobox_box.json is not valid JSON",
                   "loose/noregion: no region: give a mask file or a box"):
        assert reason in printed, reason
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["boxed"]["box"] == [4, 2, 20, 18] and "source" not in rows["boxed"]
    for pair in pairs:                                  # sources from sub-folders, boxes derived from the masks
        row = rows[f"{pair.source}/{pair.name}"]
        assert row["source"] == pair.source and row["box"] == list(pair.box)
    from train.manifest import read_manifest

    report = read_manifest(out, data.MANIFEST_SCHEMA)
    assert len(report.rows) == 3
    item = data.AnyLogoDataset(report.rows)[[r["id"] for r in report.rows].index("boxed")]
    assert item["mask"].shape == (24, 32) and float(item["mask"].sum()) == 16 * 16  # the box as a region
    assert item["source"] == data.DEFAULT_SOURCE


def test_hint_scenes_show_the_region_subject_a_second_time_outside_the_region():
    import dataclasses

    import numpy as np

    pairs = logo_scenes.make_hint_pairs(12, scene_size=64, region=32, subjects=range(0, 4), seed=5)
    for pair in pairs:
        (x0, y0, x1, y1), (hx, hy, hx1, hy1) = pair.box, pair.hint
        assert hx1 - hx == x1 - x0 == 32 and hy1 - hy == 32 and hx % 8 == hy % 8 == 0 and hx1 <= 64 >= hy1
        assert hx >= x1 or hx1 <= x0 or hy >= y1 or hy1 <= y0          # the copy stays outside the region
        scene, mask, _ = logo_scenes.render(pair, 64, 32)
        pixels = np.asarray(scene, dtype=np.int16)
        assert np.array_equal(pixels[y0:y1, x0:x1], pixels[hy:hy1, hx:hx1])  # the same subject at both places
        assert not np.asarray(mask)[hy:hy1, hx:hx1].any()
        plain = np.asarray(logo_scenes.render(dataclasses.replace(pair, hint=None), 64, 32)[0], dtype=np.int16)
        assert np.abs(plain[hy:hy1, hx:hx1] - pixels[hy:hy1, hx:hx1]).mean() > 5  # without the hint: photo
    with pytest.raises(ValueError, match="cannot both fit, apart, in a 64 px scene"):
        logo_scenes.make_hint_pairs(1, scene_size=64, region=40, subjects=range(0, 2))


def test_zoom_window_contains_the_region_inside_the_scene():
    box, height, width = (30, 10, 50, 26), 60, 90          # region 20 x 16
    for seed in range(60):
        top, left, side = data.zoom_window(box, height, width, torch.Generator().manual_seed(seed), (0.3, 1.0))
        assert 20 <= side <= 60 and min(20 / side, 1.0) >= 0.3 - 1e-9
        assert left <= 30 and left + side >= 50 and top <= 10 and top + side >= 26   # never cuts the region
        assert 0 <= left <= width - side and 0 <= top <= height - side              # stays in the scene
    assert data.zoom_window(box, height, width, None) == (0, 15, 60)  # largest square, centred: left in 0..30
    # a region longer than the scene's short side: the crop covers that axis and is grey outside the scene
    top, left, side = data.zoom_window((0, 5, 80, 15), 20, 90, torch.Generator().manual_seed(0))
    assert side == 80 and -60 <= top <= 0 and 0 <= left <= 10
    scene, mask = torch.rand(3, 20, 90), data.box_mask((0, 5, 80, 15), 20, 90)
    pixels, region = data.zoom_crop(scene, mask, (0, 5, 80, 15), 80, torch.Generator().manual_seed(0))
    outside = torch.ones(80, dtype=torch.bool)
    outside[-top:-top + 20] = False
    assert torch.equal(pixels[:, outside], torch.full((3, 60, 80), 0.5)) and float(region[outside].sum()) == 0
    torch.testing.assert_close(pixels[:, -top:-top + 20], scene[:, :, left:left + 80], atol=1e-5, rtol=0)
    assert float(region[-top + 5:-top + 15].min()) == 1.0 and float(region.sum()) == 800


def test_subject_augmentation_draws_flip_rotation_distortion_and_resolution():
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # no augmentation / a flip only: exact up to float rounding of the pixel-centre grid and the white offset
    none = data.SubjectAugmentation(0.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(data.augment_subject(image, gen(), none), image, atol=1e-5, rtol=0)
    flip = data.SubjectAugmentation(1.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(data.augment_subject(image, gen(), flip), image.flip(-1), atol=1e-5, rtol=0)
    # rotation by the drawn angle (2 u - 1) * max about the centre: a linear ramp I = 0.5 + 0.3 x becomes
    # 0.5 + 0.3 (cos a x + sin a y), exactly under bilinear sampling, where the source lies inside the image
    strong = data.SubjectAugmentation(0.0, 40.0, 0.0, 1.0)
    angle = math.radians((2 * float(torch.rand(4, generator=gen())[1]) - 1) * 40.0)
    coords = torch.linspace(-1 + 1 / 24, 1 - 1 / 24, 24)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    rotated = data.augment_subject((0.5 + 0.3 * x).expand(3, -1, -1), gen(), strong)
    central = x.square() + y.square() < 0.5
    expected = 0.5 + 0.3 * (math.cos(angle) * x + math.sin(angle) * y)
    assert abs(angle) > math.radians(5)
    torch.testing.assert_close(rotated[:, central], expected[central].expand(3, -1), atol=1e-4, rtol=0)
    low = data.augment_subject(image, gen(), data.SubjectAugmentation(0.0, 0.0, 0.0, 0.25))
    variation = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    assert variation(low) < 0.5 * variation(image)                                    # resolution lost
    # optical distortion: the draw k = (2 u - 1) * max; a seed with barrel distortion (k > 0) samples beyond the
    # edges at the corners, which come in white, while the centre stays put
    seed = next(s for s in range(100) if float(torch.rand(4, generator=torch.Generator().manual_seed(s))[2]) > 0.8)
    grey = torch.full((3, 24, 24), 0.2)
    warped = data.augment_subject(grey, torch.Generator().manual_seed(seed), data.SubjectAugmentation(0, 0, 0.3, 1))
    assert torch.allclose(warped[:, 0, 0], torch.ones(3)) and torch.allclose(warped[:, -1, -1], torch.ones(3))
    assert torch.allclose(warped[:, 8:16, 8:16], grey[:, 8:16, 8:16], atol=1e-6)


def test_source_weights_give_each_source_its_share():
    sources = ["logos"] * 6 + ["tryon"] * 2 + ["glyphs"] * 2
    weights = data.source_weights(sources, {"logos": 1.0, "tryon": 2.0})
    share = {s: sum(w for w, t in zip(weights, sources) if t == s) for s in set(sources)}
    assert share == pytest.approx({"logos": 1.0, "tryon": 2.0, "glyphs": 1.0})   # glyphs unnamed: weight 1
    assert data.source_weights(sources, {}) is None


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError) as err:
        build_config(AnyLogoConfig, [("base_checkpoint", "b", "t"), ("manifest", "m", "t"),
                                     ("output_dir", "o", "t"), ("resolution", 60, "t"), ("sparse_threshold", 1.5, "t"),
                                     ("source_weights", ["logos:2"], "t"), ("zoom_fill", [0.8, 0.2], "t")])
    text = str(err.value)
    for message in ("image_encoder is required", "resolution must be a multiple of 8, got 60",
                    "sparse_threshold must be <= 1, got 1.5", "source=weight with a weight >= 0, got 'logos:2'",
                    "zoom_fill must be [low, high]"):
        assert message in text, message


# ---- sparse recycling decisions --------------------------------------------------------------------------------

def test_keep_decisions_follow_eq5_per_layer_per_sample_per_step():
    u = torch.tensor([[0.0, 0.6, 0.61, 1.0], [0.2, 0.2, 0.2, 0.2]])
    dropped = torch.tensor([False, True])
    assert keep_decisions(u, 0.6, dropped).tolist() == [[True, True, False, False], [False] * 4]
    assert not keep_decisions(u, 0.0, torch.tensor([False, False])).any()          # Λ = 0: blocked, even u = 0
    assert keep_decisions(u, 1.0, torch.tensor([False, False])).all()
    draws = [keep_decisions(SampleRandom(0, step, range(100), "cpu").rand(4), 0.6, torch.zeros(100, dtype=bool))
             for step in range(4)]
    kept = torch.stack(draws).float()                                              # [steps, samples, layers]
    assert abs(float(kept.mean()) - 0.6) < 0.05                                    # 1600 draws: sd 0.012
    corr = torch.corrcoef(kept.reshape(-1, 4).T)
    assert float((corr - torch.eye(4)).abs().max()) < 0.12                         # layers drawn independently
    assert not torch.equal(draws[0], draws[1])                                     # redrawn every step


# ---- the trained run -------------------------------------------------------------------------------------------

def _held_out_loss(trainer, batch) -> float:
    return _fixed_draw_losses(trainer, batch)[0]


def _fixed_draw_losses(trainer, batch) -> tuple[float, float]:
    """(loss, region loss) averaged over 6 fixed draws of steps the run never uses."""
    with torch.no_grad():
        out = [trainer.method.training_loss(batch, trainer.ctx, SampleRandom(99, 10_000 + k, range(4), "cpu"))
               for k in range(6)]
    return (float(torch.stack([loss for loss, _ in out]).mean()),
            sum(metrics["region_loss"] for _, metrics in out) / len(out))


def _held_out_batches(trainer, root):
    """Four pairs never trained on (other photos' crops, subjects 4-7), with their true subjects and with the
    subjects rolled by one row; dataset indices of their own so the method's per-row cache keeps them apart."""
    from train.manifest import read_manifest

    folder = root / "held_out"
    logo_scenes.write_pairs(folder, logo_scenes.make_pairs(4, scene_size=32, region=16, subjects=range(4, 8),
                                                           seed=11), scene_size=32, subject_size=64)
    assert cli([str(folder), "--out", str(folder / "manifest.jsonl"), "--method", "anylogo"]) == 0
    items = [data.AnyLogoDataset(read_manifest(folder / "manifest.jsonl", data.MANIFEST_SCHEMA).rows)[i]
             for i in range(4)]
    true = [{**item, "index": 1000 + i} for i, item in enumerate(items)]
    rolled = [{**item, "index": 2000 + i, "subject": items[i - 1]["subject"],
               "subject_mask": items[i - 1]["subject_mask"]} for i, item in enumerate(items)]
    return trainer.method.collate(true), trainer.method.collate(rolled)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, anylogo_config):
    root = tmp_path_factory.mktemp("anylogo_run")
    cfg = anylogo_config(root / "cfg.yaml", steps=STEPS,
                       checkpoint_every=STEPS, validation_every=STEPS, validation_count=1, validation_steps=2,
                       source_weights=["logo=1", "glyphs=1"])
    config, _ = parse_command_line(AnyLogoConfig, ["--config", str(cfg), "--output_dir", str(root / "out")])
    config.method = "anylogo"
    trainer = Trainer(AnyLogoMethod(config), DistInfo())
    trainer.prepare()
    batch = trainer.method.collate([trainer.dataset[i] for i in range(4)])
    held_out, shuffled = _held_out_batches(trainer, root)
    before = {"held_out": _fixed_draw_losses(trainer, held_out), "shuffled": _fixed_draw_losses(trainer, shuffled)}
    trainer.train()
    after = {"held_out": _fixed_draw_losses(trainer, held_out), "shuffled": _fixed_draw_losses(trainer, shuffled)}
    return {"trainer": trainer, "out": root / "out", "before": before, "after": after, "batch": batch}


def test_the_trainer_learns_on_rows_it_never_saw_and_samples_validation_images(trained):
    """Held-out pairs (photos, positions and subjects not trained on): the noise loss falls by > 10 %. Sixteen
    steps teach denoising, not reading the subject: the true subject's region loss is reported next to the
    rolled subjects' and not asserted lower (the AnyLogo miniature of tests/benchmarks/lab measures that)."""
    (b_loss, b_region), (a_loss, a_region) = trained["before"]["held_out"], trained["after"]["held_out"]
    s_region = trained["after"]["shuffled"][1]
    print(f"held-out loss before {b_loss:.4f}, after {a_loss:.4f}; region loss after: true subject "
          f"{a_region:.4f}, rolled subjects {s_region:.4f} (before {b_region:.4f} / "
          f"{trained['before']['shuffled'][1]:.4f})")
    assert a_loss < 0.9 * b_loss, (b_loss, a_loss)
    assert a_region < 0.9 * b_region
    # the subject reaches the prediction: other subjects give another region loss (not necessarily a worse one)
    assert a_region != s_region
    from PIL import Image

    image = Image.open(trained["out"] / "samples" / f"step_{STEPS:08d}" / "row_00.png")
    assert image.size == (96, 32)                                  # scene | subject | insertion
    log = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == STEPS
    assert trained["trainer"].order.weights is not None              # source weights drive the order


def test_keep_rate_of_the_training_draws_is_threshold_times_kept_conditions(trained, monkeypatch):
    """The method's own draws over 500 steps x 4 samples x 4 layers (the UNet replaced by a stub): signatures
    kept at Λ·(1 − condition_dropout) = 0.6 · 0.75 = 0.45, conditions dropped at 0.25. Bounds ~4.5 sd: the
    kept share per sample has variance 0.1125 (dropout drops all four layers together), sd of the mean 0.0075;
    the dropped share sd 0.0097."""
    import train.anylogo_step as step_module  # the loss (train.anylogo_step.anylogo_loss) calls it there

    trainer = trained["trainer"]
    monkeypatch.setattr(step_module, "anylogo_forward", lambda model, layout, x, *a, **k: x)
    kept, dropped = [], []
    with torch.no_grad():
        for step in range(500):
            _, metrics = trainer.method.training_loss(trained["batch"], trainer.ctx,
                                                      SampleRandom(3, step, range(4), "cpu"))
            kept.append(metrics["signatures_kept"])
            dropped.append(metrics["condition_dropped"])
    rate, drop = sum(kept) / len(kept), sum(dropped) / len(dropped)
    print(f"kept {rate:.4f} (expected 0.45), dropped {drop:.4f} (expected 0.25)")
    assert abs(rate - 0.45) < 0.035 and abs(drop - 0.25) < 0.045
    log = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert 0.45 - 0.25 < sum(r["signatures_kept"] for r in log if "loss" in r) / STEPS < 0.45 + 0.25  # 128 draws


def test_the_loss_is_eq6_of_the_same_draws_by_hand(trained):
    """Eq. 6 from a second generator set with the same seeds: condition dropout (zero DINOv2 tokens, no
    signatures), a uniform timestep, scene and subject noise, per-layer keep u <= Λ; x = z0 + σ·ε and
    ε̂ = (x − D(x)) / σ by hand; the loss is the mean of (ε̂ − ε)². The same float32 operations: 1e-6 relative."""
    trainer = trained["trainer"]
    method, ctx, batch = trainer.method, trainer.ctx, trained["batch"]
    model, layout = ctx.base.model, method.layout
    # a seed whose condition dropout fires for some rows but not all (the first draw of each row's generator)
    seed = next(s for s in range(100) if 0 < sum(float(torch.rand((), generator=g)) < 0.25
                                                 for g in SampleRandom(s, 5, range(4), "cpu").generators) < 4)
    draws = lambda: SampleRandom(seed, 5, range(4), "cpu")  # noqa: E731
    with torch.no_grad():
        loss, _ = method.training_loss(batch, ctx, draws())
        gens = draws().generators
        prepared = [method.prepare({k: v[i] for k, v in batch.items()}, ctx, g) for i, g in enumerate(gens)]
        dropped = torch.tensor([bool(torch.rand((), generator=g) < 0.25) for g in gens])
        t = [int(torch.randint(0, 1000, (), generator=g)) for g in gens]
        z0, concat, subject = (torch.stack([p[k] for p in prepared]) for k in range(3))
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens])
        subject_noise = torch.stack([torch.randn(subject.shape[1:], generator=g) for g in gens])
        u = torch.stack([torch.rand(len(layout.slots), generator=g) for g in gens])
        keep = (u <= 0.6) & ~dropped[:, None]
        sigma = model.model_sampling.sigmas[t].float()
        x = z0 + sigma.view(-1, 1, 1, 1) * noise
        tokens = [torch.stack([p[3][g] * (0.0 if d else 1.0) for p, d in zip(prepared, dropped.tolist())])
                  for g in range(len(prepared[0][3]))]
        denoised = anylogo_forward(model, layout, x, sigma, concat, subject, subject_noise,
                                   ImageContextPatch(method.projection, tokens, layout.group_of), keep)
        by_hand = float((((x - denoised.float()) / sigma.view(-1, 1, 1, 1) - noise) ** 2).mean())
    assert 0 < int(keep.sum()) < keep.numel() and 0 < int(dropped.sum()) < 4
    print(f"loss {float(loss):.6f}, by hand {by_hand:.6f}; dropped {dropped.tolist()}, kept {keep.sum()}/16")
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)


def test_export_round_trips_and_fits_the_inpainting_model_only(trained, comfy, model_dirs, tmp_path):
    trainer = trained["trainer"]
    path = trained["out"] / "anylogo.safetensors"
    weights = load_anylogo_weights(path)
    params = dict(trainer.ctx.base.model.named_parameters())
    assert {f"diffusion_model.{k}" for k in weights.unet} == trainer.method.unet_names
    assert all(".attn1." in k or ".attn2." in k for k in weights.unet)       # train_layers=attention
    for key, value in weights.unet.items():
        assert torch.equal(value, params[f"diffusion_model.{key}"].detach()), key
    assert torch.equal(weights.projection.proj.weight, trainer.method.projection.proj.weight.detach())
    assert weights.projection.proj.in_features == 64                          # the tiny DINOv2's width
    meta = weights.metadata
    assert meta["method"] == "anylogo" and meta["format_version"] == "1"
    assert meta["base_architecture"] == "sd15-inpainting" and meta["unet_in_channels"] == "9"
    assert meta["image_encoder"] == "dinov2" and weights.image_layers == [2, 4, 6, 8]
    assert weights.image_resolution == 224 and meta["recycling_positions"] == "decoder"
    assert float(meta["sparse_threshold"]) == 0.6 and meta["trained_steps"] == str(STEPS)
    assert meta["base_hash"].startswith("sha256:") and json.loads(meta["config"])["steps"] == STEPS
    load = comfy.CheckpointLoaderSimple().load_checkpoint
    check_fits_model(weights, load("tiny_sd15_inpainting.safetensors")[0])
    with pytest.raises(WeightFileError, match="for sd15-inpainting models, but this MODEL is sd15"):
        check_fits_model(weights, load("tiny_sd15.safetensors")[0])
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = save_weights(tmp_path / "newer.safetensors", tensors, {**meta, "format_version": "2"})
    with pytest.raises(WeightFileError, match="format version 2; this pack reads versions 1..1"):
        load_anylogo_weights(newer)
    other = save_weights(tmp_path / "sdxl.safetensors", tensors, {**meta, "base_architecture": "sdxl"})
    with pytest.raises(WeightFileError, match="trained for 'sdxl'"):
        load_anylogo_weights(other)


def _node_path_predictions(comfy, trained, scene, mask, subject, embeds, seed, cfg):
    """The shipped workflow's path at its first sampling step: AnyLogo Loader + Apply, InpaintModelConditioning,
    KSampler (1 step). Returns (model input, sigma, cond prediction, uncond prediction or None)."""
    import folder_paths

    folder_paths.add_model_folder_path("anylogo", str(trained["out"]))
    loader = comfy.NODE_CLASS_MAPPINGS["SC_AnyLogoLoader"]
    assert "anylogo.safetensors" in loader.INPUT_TYPES()["required"]["weights_name"][0]
    (weights,) = loader().load("anylogo.safetensors")
    model, _, vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15_inpainting.safetensors")[:3]
    (patched,) = comfy.NODE_CLASS_MAPPINGS["SC_AnyLogoApply"]().apply(
        model, vae, subject, "decoder", 1.0, 1.0, 0.0, 1.0, seed, 64, anylogo=weights, subject_embeds=embeds)
    seen = {}

    def record(args):
        if not seen:
            seen.update(x=args["input"].clone(), sigma=args["sigma"].clone(), cond=args["cond_denoised"].clone(),
                        uncond=None if cfg == 1.0 else args["uncond_denoised"].clone())
        return args["denoised"]

    patched = patched.clone()
    patched.set_model_sampler_post_cfg_function(record)
    empty = [[torch.zeros(1, 1, 768), {}]]
    positive, negative, latent = comfy.InpaintModelConditioning().encode(empty, empty, scene, vae, mask, True)
    comfy.common_ksampler(patched, 3, 1, cfg, "euler", "normal", positive, negative, latent)
    return seen


def test_the_trainer_forward_equals_the_node_path(trained, comfy):
    """Same scene, region, subject, DINOv2 embeds, sigma and noises: the trainer's generation-status prediction
    equals what the AnyLogo-Apply-patched model (loaded from the export) predicts in sampling: the conditional
    row with complete recycling, and (CFG 2) the unconditional row, which the trainer's condition dropout trains
    (zero DINOv2 features, no signature: Eq. 7)."""
    from image_ops.subject_preprocess import prepare_subject

    method, ctx = trained["trainer"].method, trained["trainer"].ctx
    item = trained["trainer"].dataset[0]
    scene, mask = data.zoom_crop(item["scene"], item["mask"], item["box"], 32, None)
    scene_image, subject_image = scene.movedim(0, -1)[None], item["subject"].movedim(0, -1)[None]
    embeds = comfy.NODE_CLASS_MAPPINGS["SC_DINOv2HierarchicalEncode"]().encode(
        method.encoder, subject_image, "224", "quarters", "pad", 0.0, 0xFFFFFF, True, False,
        background=scene_image)[0]
    image_context = ImageContextPatch(method.projection, group_tokens(embeds.groups, embeds.background),
                                      method.layout.group_of)
    _, concat = inpaint_inputs(ctx.base.vae, ctx.base.model, scene, mask)
    subject = encode_latent(ctx.base.vae, ctx.base.model, prepare_subject(item["subject"][None], size=64)[0][0])
    for cfg in (1.0, 2.0):
        seen = _node_path_predictions(comfy, trained, scene_image, mask[None], subject_image, embeds, 5, cfg)
        sigma = seen["sigma"]
        noise = seeded_noise((1,) + subject.shape, 5, float(sigma), "cpu")
        rows = 1 if cfg == 1.0 else 2
        zero_tokens = [torch.cat([t, torch.zeros_like(t)]) for t in group_tokens(embeds.groups, embeds.background)]
        context = image_context if rows == 1 else ImageContextPatch(method.projection, zero_tokens,
                                                                     method.layout.group_of)
        keep = None if rows == 1 else torch.tensor([[True] * 4, [False] * 4])
        with torch.no_grad():
            out = anylogo_forward(ctx.base.model, method.layout, seen["x"].expand(rows, -1, -1, -1),
                                  sigma.expand(rows), concat[None].expand(rows, -1, -1, -1),
                                  subject[None].expand(rows, -1, -1, -1), noise.expand(rows, -1, -1, -1),
                                  context, keep)
        scale = float(seen["cond"].abs().max())
        print(f"cfg {cfg}: max |trainer - node| cond {float((out[:1] - seen['cond']).abs().max()):.3g}"
              + ("" if rows == 1 else f", uncond {float((out[1:] - seen['uncond']).abs().max()):.3g}")
              + f" (prediction scale {scale:.3g})")
        # identical operations on identical values; only a batch of 2 vs the sampler's chunking may reorder sums
        torch.testing.assert_close(out[:1], seen["cond"], atol=1e-5 * scale, rtol=1e-5)
        if rows == 2:
            torch.testing.assert_close(out[1:], seen["uncond"], atol=1e-5 * scale, rtol=1e-5)
            assert float((seen["cond"] - seen["uncond"]).abs().max()) > 1e-3 * scale


def test_rows_are_independent_and_a_dropped_row_is_the_blocked_unconditional_forward(trained):
    method, ctx = trained["trainer"].method, trained["trainer"].ctx
    model, layout = ctx.base.model, method.layout
    prepared = [method.prepare({k: v[i] for k, v in trained["batch"].items()}, ctx, None) for i in range(2)]
    z0, concat, subject = (torch.stack([p[k] for p in prepared]) for k in range(3))
    tokens = [torch.stack([first, torch.zeros_like(first)]) for first in prepared[0][3]]  # row 1: dropped
    gen = torch.Generator().manual_seed(0)
    sigma = model.model_sampling.sigmas[torch.tensor([300, 600])].float()
    noise, subject_noise = torch.randn(z0.shape, generator=gen), torch.randn(subject.shape, generator=gen)
    x = model.model_sampling.noise_scaling(sigma, noise, z0)
    keep = torch.tensor([[True, False, True, True], [False] * 4])
    with torch.no_grad():
        both = anylogo_forward(model, layout, x, sigma, concat, subject, subject_noise,
                               ImageContextPatch(method.projection, tokens, layout.group_of), keep)
        singles = [anylogo_forward(model, layout, x[i:i + 1], sigma[i:i + 1], concat[i:i + 1], subject[i:i + 1],
                                   subject_noise[i:i + 1],
                                   ImageContextPatch(method.projection, [t[i:i + 1] for t in tokens],
                                                     layout.group_of), keep[i:i + 1]) for i in range(2)]
        blocked = model.apply_model(x[1:], sigma[1:], c_concat=concat[1:], c_crossattn=torch.zeros(1, 1, 768),
                                    transformer_options={"patches": {"attn2_patch": [
                                        ImageContextPatch(method.projection, [t[1:] for t in tokens],
                                                          layout.group_of)]}})
        all_kept = anylogo_forward(model, layout, x[:1], sigma[:1], concat[:1], subject[:1], subject_noise[:1],
                                   ImageContextPatch(method.projection, [t[:1] for t in tokens], layout.group_of))
    scale = float(both.abs().max())
    for i in range(2):   # batch 2 vs 1 on the CPU: the same operations, summed in another order at most
        torch.testing.assert_close(both[i:i + 1], singles[i], atol=1e-4 * scale, rtol=1e-4)
    assert torch.equal(singles[1], blocked)                      # no extraction, stock self-attention, null tokens
    # dropping one layer's signature changes the prediction (same shapes: equal computations would be bitwise
    # equal, so anything above float rounding is the layer's contribution)
    assert float((singles[0] - all_kept).abs().max()) > 1e-5 * scale


def test_gradients_reach_the_subject_through_the_extraction_pass_unless_detached(trained):
    method, ctx = trained["trainer"].method, trained["trainer"].ctx
    model, layout = ctx.base.model, method.layout
    z0, concat, subject, tokens = method.prepare({k: v[0] for k, v in trained["batch"].items()}, ctx, None)[:4]
    sigma = model.model_sampling.sigmas[torch.tensor([400])].float()
    gen = torch.Generator().manual_seed(1)
    x = model.model_sampling.noise_scaling(sigma, torch.randn((1,) + z0.shape, generator=gen), z0[None])
    grads = {}
    for detach in (False, True):
        leaf = subject[None].clone().requires_grad_(True)
        out = anylogo_forward(model, layout, x, sigma, concat[None], leaf, torch.randn(leaf.shape, generator=gen),
                              ImageContextPatch(method.projection, [t[None] for t in tokens], layout.group_of),
                              detach_signatures=detach)
        out.square().mean().backward()
        grads[detach] = leaf.grad
    assert grads[False] is not None and float(grads[False].abs().max()) > 0
    assert grads[True] is None


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(trained):
    from train.grad_checkpoint import enable_gradient_checkpointing

    trainer = trained["trainer"]
    params, batch = trainer.params, {k: v[:2] for k, v in trained["batch"].items()}

    def loss_and_grads():
        for p in params:
            p.grad = None
        loss, _ = trainer.method.training_loss(batch, trainer.ctx, SampleRandom(7, 3, range(2), "cpu"))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    try:
        loss, grads = loss_and_grads()
        handle = enable_gradient_checkpointing(trainer.ctx.base.unet)
        try:
            loss_c, grads_c = loss_and_grads()
        finally:
            handle.remove()
    finally:
        for p in params:
            p.grad = None
    assert torch.equal(loss, loss_c)
    for g, g_c in zip(grads, grads_c):          # recomputation replays the same CPU kernels: exact
        assert torch.equal(g, g_c)


def test_a_four_channel_base_is_refused(tmp_path, model_dirs, anylogo_config, capsys):
    cfg = anylogo_config(tmp_path / "cfg.yaml", steps=1,
                         base_checkpoint=str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"))
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    assert "starts from an SD1.5-inpainting (9-channel) UNet; tiny_sd15.safetensors is sd15" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "image encoder not found"),
    (b"not a safetensors file", "could not load image encoder encoder.safetensors (expected a DINOv2 .safetensors"),
])
def test_a_missing_or_corrupt_image_encoder_is_refused_with_a_message(tmp_path, anylogo_config, capsys, content,
                                                                      message):
    encoder = tmp_path / "encoder.safetensors"
    if content is not None:
        encoder.write_bytes(content)
    cfg = anylogo_config(tmp_path / "cfg.yaml", steps=1)
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out"), "--image_encoder", str(encoder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
