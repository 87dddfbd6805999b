"""The P3S trainer on the tiny SD1.5: negatives removal from a click on the look-alike, L = L_LDM + γ·L_ac,
export, and parity of the trainer's forward with the P3S Apply path loaded from the export (cond and uncond).

The photo holds two red twins on teal (apart: a fill from the surroundings of a twin that touches the
kept one would carry its colour in, see image_ops/negatives_removal.py); the CLIP vision model is the built-feature one of
tests/test_points_node.py (its patch features make the twins alike and the background unlike), saved as a file
with its config as a user's CLIP vision would be. One module-scoped run of 3 steps feeds the tests."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from standalone import tiny_models
from train.config import parse_command_line
from train.distributed import DistInfo
from train.engine import Trainer
from train.p3s import P3SConfig, P3SMethod, main

STEPS = 3


def _points_test_module():
    spec = importlib.util.spec_from_file_location("p3s_points_support", Path(__file__).parent / "test_points_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PTS = _points_test_module()


def build_p3s_files(folder: Path) -> dict:
    """The twins photo, its one-row manifest (a click on the left twin, one on the right) and the CLIP file."""
    clip = PTS.feature_clip()
    weights, config = folder / "feature_clip.safetensors", folder / "feature_clip.json"
    from model_patches.weight_files import save_weights

    save_weights(weights, {k: v.contiguous() for k, v in clip.get_sd().items()}, {"tiny_model": "feature_clip"})
    config.write_text(json.dumps(tiny_models.TINY_CLIP_VISION_CONFIG))
    photo = PTS.scene([PTS.LEFT, PTS.RIGHT_APART])[0]
    Image.fromarray((photo.numpy() * 255).round().astype(np.uint8)).save(folder / "twins.png")
    row = {"image": "twins.png", "positive_points": "%d,%d" % PTS.centre(PTS.LEFT),
           "negative_points": "%d,%d" % PTS.centre(PTS.RIGHT_APART)}
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    return {"folder": folder, "clip": weights, "clip_config": config, "manifest": folder / "manifest.jsonl"}


@pytest.fixture(scope="module")
def p3s_files(tmp_path_factory):
    return build_p3s_files(tmp_path_factory.mktemp("p3s_data"))


def write_config(path, model_dirs, files, **overrides):
    import yaml

    values = {"base_checkpoint": str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"),
              "manifest": str(files["manifest"]), "clip_vision": str(files["clip"]),
              "clip_vision_config": str(files["clip_config"]), "class_word": "toy", "resolution": 64,
              "learning_rate": 1e-3, "export_dtype": "fp32", "progress": False, "epochs": 0, "steps": STEPS,
              "condition_dropout": 0.5, **overrides}
    Path(path).write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dirs, p3s_files):
    root = tmp_path_factory.mktemp("p3s_run")
    cfg = write_config(root / "cfg.yaml", model_dirs, p3s_files)
    config, _ = parse_command_line(P3SConfig, ["--config", str(cfg), "--output_dir", str(root / "out")])
    config.method = "p3s"
    trainer = Trainer(P3SMethod(config), DistInfo())
    trainer.prepare()
    trainer.train()
    return {"trainer": trainer, "out": root / "out"}


def test_the_look_alike_is_removed_from_the_reference(trained):
    """The negative click's own point mask covers the right twin; OpenCV fills it: no red is left there, the
    clicked twin is untouched."""
    method = trained["trainer"].method
    side = 64  # the 336-px photo, centre-cropped (it is square) and resized to the training resolution
    pixels = method.reference_pixels
    scale = side / PTS.SIDE
    def region(box):
        c0, r0, c1, r1 = (round(v * PTS.PATCH_PX * scale) for v in box)
        return pixels[:, r0 + 2:r1 - 2, c0 + 2:c1 - 2]
    red = lambda p: float(((p[0] > 0.6) & (p[1] < 0.4)).float().mean())  # noqa: E731
    assert red(region(PTS.LEFT)) > 0.95
    assert red(region(PTS.RIGHT_APART)) < 0.05
    assert method.provenance["negatives_removal"] == "opencv-telea" and method.provenance["mask_sha256"]


def test_the_loss_is_ldm_plus_gamma_lac_and_the_copy_trains(trained):
    lines = [json.loads(x) for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == STEPS
    for x in steps:
        assert x["loss"] == pytest.approx(x["ldm"] + 0.1 * x["l_ac"], rel=1e-5)
        assert x["l_ac"] > 0
    method = trained["trainer"].method
    assert any(float(p.detach().abs().sum()) > 0 for p in method.copy.self_proj.parameters())
    assert bool((method.copy.gates.detach() != 0).all())  # every zero-initialised gate moved
    assert float(method.rngr.to_v.weight.detach().abs().sum()) > 0  # the zero-initialised W_V got its first gradient


def test_export_metadata_and_loader(trained, comfy):
    from model_patches.p3s_weights import load_p3s_weights

    weights = load_p3s_weights(trained["out"] / "p3s.safetensors")
    meta = weights.metadata
    assert meta["method"] == "p3s" and meta["base_architecture"] == "sd15" and meta["prompt"] == "a photo of sks toy"
    assert json.loads(meta["negative_points"]) == [list(map(float, PTS.centre(PTS.RIGHT_APART)))]
    assert meta["weight_curve"] == "paper" and len(meta["mask_sha256"]) == 64
    assert weights.reference_latent.shape == (1, 4, 8, 8) and weights.clip_states.shape[-1] == 64


def _rows(model, prompts, clip):
    return torch.cat([clip.encode_from_tokens(clip.tokenize(p))[0] for p in prompts])


def test_the_trainer_forward_equals_the_p3s_apply_path(trained, comfy, tmp_path):
    """Same latent, sigma, prompts: the trainer's prediction (its patched base, its copy) equals what P3S Apply
    (weights through P3S Loader from the export, on the checkpoint loaded by the stock loader) predicts for a
    CFG batch [uncond ; cond] in one UNet call."""
    import folder_paths

    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    folder_paths.add_model_folder_path("p3s", str(trained["out"]), is_default=True)
    weights, prompt = comfy.NODE_CLASS_MAPPINGS["SC_P3SLoader"]().load("p3s.safetensors")
    model, clip = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
    patched = comfy.NODE_CLASS_MAPPINGS["SC_P3SApply"]().apply(model, weights, 1.0, "fixed", 0.5, 0.2, 2.0, 0.0,
                                                                1.0)[0]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=gen).expand(2, -1, -1, -1)
    sigma = ctx.base.model.model_sampling.sigmas[[600, 600]].float()
    context = torch.cat([method.texts(""), method.texts(prompt)]).view(2, 77, -1)
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
    with torch.no_grad():
        node = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        ours = torch.cat([method.forward(x[i:i + 1], sigma[i:i + 1], context[i:i + 1], ctx)[0] for i in range(2)])
        plain = patched.model.apply_model(x, sigma, c_crossattn=context, transformer_options={})
    scale = float(node.abs().max())
    torch.testing.assert_close(ours, node, atol=1e-5 * scale, rtol=1e-5)
    assert float((node - plain).abs().max()) > 1e-4 * scale  # the injection acts in both rows
    assert float((node[0] - node[1]).abs().max()) > 1e-4 * scale


def test_weights_for_another_architecture_are_refused(trained, comfy):
    from model_patches.p3s_weights import load_p3s_weights

    weights = load_p3s_weights(trained["out"] / "p3s.safetensors")
    inpainting = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15_inpainting.safetensors")[0]
    # the node raises the pack's own WeightFileError (ComfyUI imported the pack as another module): a ValueError
    with pytest.raises(ValueError, match="is for sd15 models, but this MODEL is sd15-inpainting"):
        comfy.NODE_CLASS_MAPPINGS["SC_P3SApply"]().apply(inpainting, weights, 1.0, "paper", 0.5, 0.2, 2.0, 0.0, 1.0)


@pytest.mark.parametrize("change, message", [
    (dict(class_word=""), "class_word is required"),
    (dict(clip_vision=""), "clip_vision is required"),
])
def test_bad_configs_stop_with_a_message(tmp_path, model_dirs, p3s_files, capsys, change, message):
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, p3s_files, **change)
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_two_rows_or_a_point_outside_are_refused(tmp_path, model_dirs, p3s_files, capsys):
    rows = [{"image": str(p3s_files["folder"] / "twins.png"), "positive_points": "10,10"}] * 2
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, p3s_files, manifest=str(tmp_path / "two.jsonl"))
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    assert "expected 1" in capsys.readouterr().err


def test_the_shipped_example_config_parses_with_the_paper_settings():
    path = Path(__file__).resolve().parents[1] / "train" / "configs" / "p3s_sd15.yaml"
    config, _ = parse_command_line(P3SConfig, ["--config", str(path)])
    assert config.method == "p3s" and config.epochs == 60 and config.learning_rate == 1e-5
    assert config.condition_dropout == 0.1 and config.consistency_weight == 0.1 and config.lam == 0.2
    assert config.prompt == "a photo of sks dog"


def test_a_point_outside_the_photo_is_refused_with_the_manifest_line(tmp_path, model_dirs, p3s_files, capsys):
    row = {"image": str(p3s_files["folder"] / "twins.png"), "positive_points": "400,10"}
    (tmp_path / "outside.jsonl").write_text(json.dumps(row) + "\n")
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, p3s_files, manifest=str(tmp_path / "outside.jsonl"))
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "manifest line 1:" in err and "positive point 1 (x=400, y=10) is outside image 1" in err
