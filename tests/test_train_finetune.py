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
    batch = trainer.method.collate([trainer.dataset[i] for i in range(4)])
    before = _held_out_loss(trainer, batch)
    trainer.train()
    after = _held_out_loss(trainer, batch)
    trained_values = {n: p.detach().clone() for n, p in zip(trainer.names, trainer.params)}
    yield {"out": root / "out", "before": before, "after": after, "trained": trained_values,
           "config": config, "initial": trainer.method.initial}
    del trainer


def test_finetune_reduces_the_denoising_loss(trained):
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
