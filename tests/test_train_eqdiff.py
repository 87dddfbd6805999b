"""The EqDiff trainer: a short run on the tiny model, its five stock-loadable exports, and parity of its forward
with the node path loaded from those exports."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from train.config import parse_command_line
from train.distributed import DistInfo
from train.eqdiff import EqDiffConfig, EqDiffMethod, main
from train.engine import Trainer

STEPS = 2


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    """Three 64 px photos of a red disc on different backgrounds, with masks; and their manifest."""
    import numpy as np
    from PIL import Image

    from train.prepare_manifest import cli

    folder = tmp_path_factory.mktemp("eqdiff_subject")
    yy, xx = np.mgrid[:64, :64]
    for i, (cy, cx, bg) in enumerate(((30, 30, 40), (24, 38, 200), (36, 26, 120))):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 14 ** 2
        image = np.full((64, 64, 3), bg, np.uint8)
        image[disc] = (220, 30, 30)
        Image.fromarray(image).save(folder / f"disc_{i}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(folder / f"disc_{i}_mask.png")
    assert cli([str(folder), "--out", str(folder / "manifest.jsonl"), "--method", "eqdiff"]) == 0
    return folder


def write_config(path, model_dirs, manifest, **overrides):
    import yaml

    values = {"base_checkpoint": str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), "manifest": str(manifest),
              "class_word": "cat", "resolution": 64, "batch_size": 2, "steps": STEPS, "num_class_images": 2,
              "prior_steps": 2, "learning_rate": 1e-3, "band_probabilities": [0.3, 0.3, 0.4], "progress": False, "export_name": "disc", **overrides}
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dirs, subject_folder, comfy):
    root = tmp_path_factory.mktemp("eqdiff_run")
    cfg = write_config(root / "cfg.yaml", model_dirs, subject_folder / "manifest.jsonl")
    config, _ = parse_command_line(EqDiffConfig, ["--config", str(cfg), "--output_dir", str(root / "out")])
    config.method = "eqdiff"
    trainer = Trainer(EqDiffMethod(config), DistInfo())
    started = time.perf_counter()
    trainer.prepare()
    prepared = time.perf_counter()
    trainer.train()
    print(f"eqdiff tiny run: prepare (incl. 2 class images) {prepared - started:.1f} s, {STEPS} steps + export "
          f"{time.perf_counter() - prepared:.1f} s")
    return {"trainer": trainer, "out": root / "out"}


def test_the_run_writes_five_stock_loadable_files_with_metadata(trained):
    import json

    import safetensors

    out = trained["out"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")}
    assert {"disc.safetensors", "embeddings/disc.safetensors", "embeddings/disc_low.safetensors",
            "embeddings/disc_high.safetensors", "loras/disc_kv.safetensors"} <= files
    with safetensors.safe_open(str(out / "disc.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["method"] == "eqdiff" and meta["base_architecture"] == "sd15" and meta["base_hash"].startswith("sha256:")
    assert meta["embedding"] == "disc" and meta["lora"] == "disc_kv.safetensors" and meta["class_word"] == "cat"
    assert len(json.loads(meta["reference_image_hashes"])) == 3 and meta["trained_steps"] == str(STEPS)
    assert len(keys) == 4 * len(json.loads(meta["layers"]))
    import safetensors.torch

    emb = {s: safetensors.torch.load_file(str(out / "embeddings" / f"disc{s}.safetensors"))["clip_l"]
           for s in ("", "_low", "_high")}
    assert all(e.shape == (1, 768) for e in emb.values())
    assert torch.equal(emb[""], emb["_low"] + emb["_high"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    assert len(losses) == STEPS and all(m["reference_attention_loss"] >= 0 and m["cross_attention_loss"] >= 0
                                        for m in losses)


def test_everything_that_should_train_moved(trained):
    method = trained["trainer"].method
    params = dict(trained["trainer"].ctx.base.model.named_parameters())
    moved_kv = [n for n in method.kv_names if not torch.equal(params[n].detach().cpu().float(), method.initial_kv[n])]
    assert len(moved_kv) == len(method.kv_names)
    import json

    init = method.initial_tokens
    assert not torch.equal(method.tokens.detach().cpu(), init)
    # both start from the init word; only a low or high draw trains one band apart from the other
    banded = [m for m in map(json.loads, (trained["out"] / "metrics.jsonl").read_text().splitlines())
              if m.get("band_low", 0) + m.get("band_high", 0) > 0]
    assert banded and not torch.equal(method.tokens[0].detach(), method.tokens[1].detach())
    assert all(m.fusion.weight.abs().sum() > 0 for m in method.rra.values())      # H_r left zero


def _loaded(comfy, trained, caplog):
    import folder_paths

    out = trained["out"]
    folder_paths.add_model_folder_path("loras", str(out / "loras"))
    folder_paths.add_model_folder_path("embeddings", str(out / "embeddings"))
    folder_paths.add_model_folder_path("eqdiff", str(out))
    model, clip, vae = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
    with caplog.at_level(logging.INFO):
        (lora_model,) = comfy.LoraLoaderModelOnly().load_lora_model_only(model, "disc_kv.safetensors", 1.0)
    return model, lora_model, clip, vae


def test_the_stock_lora_loader_applies_every_kv_key(trained, comfy, caplog):
    import safetensors

    with safetensors.safe_open(str(trained["out"] / "loras" / "disc_kv.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    _, lora_model, _, _ = _loaded(comfy, trained, caplog)
    assert len(keys) == 14 and all(k.endswith(".diff") and ".attn2.to_" in k for k in keys)
    patched = {k for k in lora_model.patches}
    assert patched == {k[:-len(".diff")] + ".weight" for k in keys}
    log = caplog.text
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log


def test_the_stock_embedding_is_the_trainer_token_at_the_placeholder(trained, comfy, caplog):
    from model_patches import eqdiff_tokens as fdte

    _, _, clip, _ = _loaded(comfy, trained, caplog)
    method = trained["trainer"].method
    stock = comfy.CLIPTextEncode().encode(clip, "photo of a embedding:disc cat")[0][0][0]
    vector = (method.tokens[0] + method.tokens[1]).detach().float().cpu()
    ours = clip.encode_from_tokens(fdte.tokens_with_vector(clip, "photo of a sks cat", "sks", vector))
    assert torch.equal(stock, ours)
    # input level: only the placeholder's row of the embedding sequence differs from the plain prompt
    model = clip.cond_stage_model.clip_l
    with torch.no_grad():
        plain = model.process_tokens([[p[0] for p in clip.tokenize("photo of a sks cat")["l"][0]]], "cpu")[0]
        inserted = model.process_tokens([[p[0] for p in clip.tokenize("photo of a embedding:disc cat")["l"][0]]],
                                        "cpu")[0]
    differs = (plain != inserted).any(-1)[0].nonzero().flatten().tolist()
    assert differs == [4]
    plain_out = comfy.CLIPTextEncode().encode(clip, "photo of a sks cat")[0][0][0]
    assert torch.equal(stock[0, :4], plain_out[0, :4])  # causal: the positions before it are untouched


def test_the_trainer_forward_equals_the_node_path_from_the_exports(trained, comfy, caplog):
    """One sampling step through the stock graph (LoRA K/V + EqDiff Loader/Apply in training reference mode +
    the embedding in CLIPTextEncode): the cond and uncond predictions equal the trainer's eqdiff_forward on the
    same inputs, with its in-memory weights."""
    from model_patches.eqdiff_rra import reference_input
    from model_patches.extra_pass import seeded_noise
    from train.eqdiff_step import eqdiff_forward

    _, lora_model, clip, vae = _loaded(comfy, trained, caplog)
    weights = comfy.NODE_CLASS_MAPPINGS["SC_EqDiffLoader"]().load("disc.safetensors")[0]
    reference = trained["trainer"].dataset[1]["pixels"][None]
    (patched,) = comfy.NODE_CLASS_MAPPINGS["SC_EqDiffApply"]().apply(lora_model, vae, weights, reference, 1.0, 0.0,
                                                                     1.0, "training", 7, 64)
    ref_latent = patched.get_attachment("subject_customization.eqdiff").reference
    seen = {}

    def record(args):
        if not seen:
            seen.update(x=args["input"].clone(), sigma=args["sigma"].clone(), cond=args["cond_denoised"].clone(),
                        uncond=args["uncond_denoised"].clone())
        return args["denoised"]

    patched = patched.clone()
    patched.set_model_sampler_post_cfg_function(record)
    positive = comfy.CLIPTextEncode().encode(clip, "photo of a embedding:disc cat")
    negative = comfy.CLIPTextEncode().encode(clip, "")
    comfy.common_ksampler(patched, 3, 1, 2.0, "euler", "normal", positive[0], negative[0],
                          {"samples": torch.zeros(1, 4, 8, 8)})
    trainer = trained["trainer"]
    method, model = trainer.method, trainer.ctx.base.model
    sigma = seen["sigma"]
    noise = seeded_noise(ref_latent.shape, 7, float(sigma), "cpu")
    ref_x, ref_sigma = reference_input(model, ref_latent, sigma, "training", noise=noise)
    pos, neg = positive[0][0][0], negative[0][0][0]
    with torch.no_grad():
        out = eqdiff_forward(model, method.transformer_options, method.slots, method.rra,
                             seen["x"].expand(2, -1, -1, -1), sigma.expand(2), torch.cat([pos, neg]), ref_x,
                             ref_sigma, pos)
    scale = float(seen["cond"].abs().max())
    print(f"max |trainer - node|: cond {float((out[:1] - seen['cond']).abs().max()):.3g}, uncond "
          f"{float((out[1:] - seen['uncond']).abs().max()):.3g} (scale {scale:.3g})")
    # the same operations on the same values; the K/V weights differ by the diff round trip (w0 + (w - w0))
    torch.testing.assert_close(out[:1], seen["cond"], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(out[1:], seen["uncond"], atol=1e-5 * scale, rtol=1e-5)
    assert float((seen["cond"] - seen["uncond"]).abs().max()) > 1e-4 * scale


@pytest.mark.parametrize("case, message", [
    ("no_placeholder", "does not contain the placeholder 'sks'"),
    ("no_class_word", "class_word is required"),
    ("empty_manifest", "manifest"),
    ("mask_size", "is 32x32 but image"),
    ("empty_mask", "is empty at 64 px"),
])
def test_bad_training_input_stops_with_a_message(case, message, tmp_path, model_dirs, subject_folder, capsys):
    import json

    import numpy as np
    from PIL import Image

    manifest = subject_folder / "manifest.jsonl"
    overrides = {}
    if case == "no_placeholder":
        overrides["instance_prompt"] = "photo of a cat"
    elif case == "no_class_word":
        overrides["class_word"] = ""
    elif case == "empty_manifest":
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text("")
    else:
        mask = np.zeros((32, 32) if case == "mask_size" else (64, 64), np.uint8)
        Image.fromarray(mask).save(tmp_path / "m.png")
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text(json.dumps({"image": str(subject_folder / "disc_0.png"), "mask": str(tmp_path / "m.png")}))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, manifest, **overrides)
    assert main(["--config", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_a_resumed_run_reproduces_the_uninterrupted_one(trained, tmp_path, model_dirs, subject_folder):
    """1 step, stop, resume to 2 (same output_dir): the exports equal the uninterrupted 2-step run's bit for bit
    (tokens, K/V, RRA and data order are restored from the checkpoint; every draw depends on seed, step, position)."""
    import safetensors.torch

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, subject_folder / "manifest.jsonl", checkpoint_every=1)
    assert main(["--config", str(cfg), "--output_dir", str(out), "--steps", "1"]) == 0
    assert main(["--config", str(cfg), "--output_dir", str(out), "--steps", str(STEPS)]) == 0
    assert '"event": "resume"' in (out / "metrics.jsonl").read_text()
    for name in ("disc.safetensors", "loras/disc_kv.safetensors", "embeddings/disc.safetensors",
                 "embeddings/disc_low.safetensors"):
        resumed = safetensors.torch.load_file(str(out / name))
        whole = safetensors.torch.load_file(str(trained["out"] / name))
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), name


def test_reference_noise_same_is_the_target_noise_and_independent_is_its_own_draw(trained, monkeypatch):
    """Official training noises the reference with the target's own noise; 'independent' draws another one after
    every official draw, so the target's and the prior's draws stay exactly those of the official recipe."""
    import train.eqdiff as module
    from train.randomness import SampleRandom

    trainer = trained["trainer"]
    method, ctx = trainer.method, trainer.ctx
    batch = method.collate([trainer.dataset[0], trainer.dataset[1]])
    seen = {}

    def recording_noised(model, x0, noise, sigma):
        seen.setdefault("noised", []).append(noise.clone())
        return noised(model, x0, noise, sigma)

    def recording_reference_input(model, latent, sigma, mode, *, noise=None, gap=2):
        seen["reference"] = (mode, gap, noise.clone())
        return reference_input(model, latent, sigma, mode, noise=noise, gap=gap)

    noised, reference_input = module.noised, module.reference_input
    monkeypatch.setattr(module, "noised", recording_noised)
    monkeypatch.setattr(module, "reference_input", recording_reference_input)
    draws = {}
    original = method.config.reference_noise
    try:
        for mode in ("same", "independent"):
            method.config.reference_noise = mode
            seen.clear()
            with torch.no_grad():
                method.training_loss(batch, ctx, SampleRandom(7, 3, [0, 1], ctx.device))
            (target, prior), (ref_mode, gap, ref_noise) = seen["noised"], seen["reference"]
            draws[mode] = (target, prior, ref_noise)
            assert (ref_mode, gap) == ("training", 2)
    finally:
        method.config.reference_noise = original
    same, independent = draws["same"], draws["independent"]
    assert torch.equal(same[2], same[0])                       # the target's noise, as the official code
    assert torch.equal(independent[0], same[0]) and torch.equal(independent[1], same[1])  # official draws kept
    assert not torch.equal(independent[2], same[0]) and not torch.equal(independent[2], same[1])


# ---- torchrun (2 processes, gloo) and SIGKILL + resume, as python -m train.eqdiff runs ---------------------------
PARALLEL_STEPS = 4


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, model_dirs, subject_folder, trainer):
    """4 steps of global batch 2 (checkpoints every 2): 1 process x micro-batch 2, torchrun 2 x micro-batch 1, and
    1 process SIGKILLed after its first checkpoint, then the same command again. The class images are made once
    (by the first run) in a shared folder, so all three read the same priors."""
    from train.checkpoint import list_checkpoints

    root = tmp_path_factory.mktemp("eqdiff_parallel")
    cfg = write_config(root / "cfg.yaml", model_dirs, subject_folder / "manifest.jsonl", steps=PARALLEL_STEPS,
                       checkpoint_every=2, prior_dir=str(root / "class_images"))
    args = ["-m", "train.eqdiff", "--config", cfg, "--output_dir"]
    trainer.run(args + [root / "single"])
    trainer.run_torchrun(2, args + [root / "ddp"])
    killed = root / "killed"
    trainer.kill_when_written(args + [killed], killed / "checkpoints" / "step_00000002.pt")
    saved = [s for s, _ in list_checkpoints(killed / "checkpoints")]
    assert saved and saved[-1] < PARALLEL_STEPS and not (killed / "disc.safetensors").exists()
    resumed = trainer.run(args + [killed])
    assert f"(step {saved[-1]})" in resumed.stderr
    return {"single": root / "single", "ddp": root / "ddp", "killed": killed}


def _run_log(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_checkpoint(out) -> dict:
    from train.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoints" / f"step_{PARALLEL_STEPS:08d}.pt")


def test_two_processes_equal_one_process_with_the_same_global_batch(parallel_runs):
    """Every draw (band, timestep, noise, reference photo, class image) is per sample, so the logged draws match.
    Step 1's losses agree to 1e-6 relative (float summation order only: two batch-1 forwards + an all-reduce vs
    one batch-2 forward; measured <= 2e-7); the later steps run at weights that already differ (below), so their
    losses agree to 1e-4 (measured <= 2e-5, the cross-attention loss the most sensitive). The states agree to
    that order and its consequences: at lr 1e-3 AdamW divides by sqrt of the second moment, so a last-bit
    difference on a near-zero gradient entry can move that weight by up to lr per step (hence max |diff| <=
    steps x lr; measured 4.9e-4), and the later gradients are taken at those weights. The step here is a long
    chain (CLIP with gradient into the tokens, the reference pass, two attention losses), so the spread is wider
    than finetune's: measured 87 % of the 11 M weights within 1e-7 and 99.5 % within 1e-6 (one step moves a weight
    by about lr = 1e-3, measured median 9e-4 per 2 steps), asserted >= 99 % within 1e-6; the final first moment
    (the averaged gradients) agrees to 1.1e-4 of its largest entry, asserted 1e-3. A gradient summed instead of
    averaged, or one rank's sample missing, moves it by order 1 (and step 1's losses by far more than 1e-6)."""
    a, b = _final_checkpoint(parallel_runs["ddp"]), _final_checkpoint(parallel_runs["single"])
    assert a["trainable_names"] == b["trainable_names"]
    assert {"tokens"} < set(b["trainable_names"]) and any(n.startswith("rra.") for n in b["trainable_names"])
    steps_a = [r for r in _run_log(parallel_runs["ddp"]) if "loss" in r]
    steps_b = [r for r in _run_log(parallel_runs["single"]) if "loss" in r]
    assert [r["step"] for r in steps_b] == list(range(1, PARALLEL_STEPS + 1)) == [r["step"] for r in steps_a]
    for ra, rb in zip(steps_a, steps_b):
        for key in ("band_low", "band_high"):
            assert ra[key] == rb[key], key
        assert ra["sigma_mean"] == pytest.approx(rb["sigma_mean"], rel=1e-6)
        rel = 1e-6 if rb["step"] == 1 else 1e-4
        for key in ("loss", "instance_loss", "prior_loss", "cross_attention_loss", "reference_attention_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-9), (rb["step"], key)
    m_a = torch.cat([a["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    m_b = torch.cat([b["optimizer"]["state"][i]["exp_avg"].flatten() for i in sorted(b["optimizer"]["state"])])
    worst, scale = float((m_a - m_b).abs().max()), float(m_b.abs().max())
    diff = torch.cat([(a["trainable"][n] - b["trainable"][n]).abs().flatten() for n in b["trainable_names"]])
    print(f"eqdiff ddp: first moment max |diff| {worst:.3g} of {scale:.3g}; weights max |diff| "
          f"{float(diff.max()):.3g}, {float((diff <= 1e-7).float().mean()):.4f} within 1e-7, "
          f"{float((diff <= 1e-6).float().mean()):.4f} within 1e-6")
    assert scale > 0 and worst <= 1e-3 * scale
    assert float(diff.max()) <= PARALLEL_STEPS * 1e-3 and float((diff <= 1e-6).float().mean()) >= 0.99
    events = [r for r in _run_log(parallel_runs["ddp"]) if r.get("event") == "checkpoint"]
    assert [e["step"] for e in events] == [2, 4]
    assert all(len(e["rank_digests"]) == 2 and len(set(e["rank_digests"])) == 1 for e in events)  # same weights


def test_sigkill_then_resume_equals_the_uninterrupted_run_exactly(parallel_runs):
    import safetensors.torch

    a, b = _final_checkpoint(parallel_runs["killed"]), _final_checkpoint(parallel_runs["single"])
    for name in b["trainable_names"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    for i, sb in b["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][i][key], sb[key])
    steps = lambda out: [(r["step"], r["loss"], r["band_low"], r["band_high"]) for r in _run_log(out) if "loss" in r]  # noqa
    assert steps(parallel_runs["killed"]) == steps(parallel_runs["single"])  # the log reads as one run
    for name in ("disc.safetensors", "loras/disc_kv.safetensors", "embeddings/disc.safetensors",
                 "embeddings/disc_high.safetensors"):
        ea = safetensors.torch.load_file(str(parallel_runs["killed"] / name))
        eb = safetensors.torch.load_file(str(parallel_runs["single"] / name))
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in eb), name


# ---- masks from clicked points (a manifest row with positive_points / negative_points and no mask) ------------

def _points_test_module():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("eqdiff_points_support",
                                                  Path(__file__).parent / "test_points_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clicked(tmp_path_factory, model_dirs, subject_folder, comfy):
    """A photo of two look-alike boxes, the feature-built CLIP of the Points to Mask tests saved as a user's file,
    and a method configured with it."""
    import json

    import numpy as np
    from PIL import Image

    from model_patches.weight_files import save_weights
    from standalone import tiny_models

    pts = _points_test_module()
    folder = tmp_path_factory.mktemp("eqdiff_points")
    weights, config = folder / "feature_clip.safetensors", folder / "feature_clip.json"
    save_weights(weights, {k: v.contiguous() for k, v in pts.feature_clip().get_sd().items()}, {"tiny_model": "x"})
    config.write_text(json.dumps(tiny_models.TINY_CLIP_VISION_CONFIG))
    photo = folder / "twins.png"
    Image.fromarray((pts.scene([pts.LEFT, pts.RIGHT_APART])[0].numpy() * 255).round().astype(np.uint8)).save(photo)
    cfg = write_config(folder / "cfg.yaml", model_dirs, subject_folder / "manifest.jsonl", clip_vision=str(weights),
                       clip_vision_config=str(config))
    parsed, _ = parse_command_line(EqDiffConfig, ["--config", str(cfg), "--output_dir", str(folder / "out")])
    return {"pts": pts, "photo": photo, "method": EqDiffMethod(parsed)}


def test_a_mask_from_points_is_the_points_to_mask_nodes_mask(clicked, pack_nodes):
    import numpy as np
    from PIL import Image

    from train.eqdiff_data import SubjectDataset, square_mask

    pts = clicked["pts"]
    positive, negative = "%d,%d" % pts.centre(pts.LEFT), "%d,%d" % pts.centre(pts.RIGHT_APART)
    row = {"image": str(clicked["photo"]), "positive_points": positive, "negative_points": negative, "_line": 1}
    made = clicked["method"]._masks_from_points([row])[0]
    # the node on the very pixels the trainer read from the PNG
    image = torch.from_numpy(np.asarray(Image.open(clicked["photo"]).convert("RGB"), dtype=np.float32) / 255)[None]
    expected = pts.run(pack_nodes["SC_PointsToMask"](), image, positive, negative)[0][0]
    assert torch.equal(made, expected)
    assert pts.iou(made, pts.LEFT) > 0.9  # the clicked box, not its twin (the node's own tests hold it there)
    # the dataset crops it like a mask file: nearest resize of the same square
    dataset = SubjectDataset([row], 64, {0: made})
    pil = Image.fromarray((made.numpy() * 255).astype(np.uint8), mode="L")
    assert torch.equal(dataset[0]["mask"], (square_mask(pil, 64) > 0.5).float())


@pytest.mark.parametrize("positive,negative,message", [
    ("9999,10", "", "manifest line 3 .*outside"),
    ("", "20,20", "manifest line 3 .*positive"),
])
def test_bad_points_are_refused_with_the_manifest_line(clicked, positive, negative, message):
    from train.config import ConfigError

    row = {"image": str(clicked["photo"]), "positive_points": positive, "negative_points": negative, "_line": 3}
    with pytest.raises(ConfigError, match=message):
        clicked["method"]._masks_from_points([row])


def test_points_without_a_clip_vision_file_are_refused(clicked, model_dirs, subject_folder, tmp_path):
    from train.config import ConfigError

    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, subject_folder / "manifest.jsonl")
    parsed, _ = parse_command_line(EqDiffConfig, ["--config", str(cfg), "--output_dir", str(tmp_path / "out")])
    row = {"image": str(clicked["photo"]), "positive_points": "10,10", "_line": 2}
    with pytest.raises(ConfigError, match="manifest line 2 gives points.*clip_vision is required"):
        EqDiffMethod(parsed)._masks_from_points([row])
