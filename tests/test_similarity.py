"""Subject Similarity scores (image_ops.similarity, image_ops.lpips): each metric against a hand computation on
tiny real-architecture encoders, regions and masks, determinism, and the node = the command."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from image_ops import similarity as sim
from image_ops.lpips import LPIPSWeightsError, load_lpips, random_lpips, save_lpips
from image_ops.subject_preprocess import fit_square
from image_ops.vision_features import layer_states, normalize_pixels
from standalone import tiny_models

CLIP_CONFIG = {**tiny_models.TINY_CLIP_VISION_CONFIG, "projection_dim": 768}  # CLIP-L text space


def images(n, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip():
    return tiny_models.vision_model_from_config(CLIP_CONFIG, seed=0)


@pytest.fixture(scope="module")
def dino():
    return tiny_models.tiny_dinov2(seed=0)


@pytest.fixture(scope="module")
def lpips_net():
    return random_lpips("alex", seed=0)


@pytest.fixture(scope="module")
def clip_text(comfy):
    """The tiny checkpoint's CLIP-L text model with a random text_projection (an SD1.5 checkpoint has none)."""
    text = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[1]
    weight = text.cond_stage_model.clip_l.transformer.text_projection.weight
    gen = torch.Generator().manual_seed(3)
    weight.data.copy_((torch.randn(weight.shape, generator=gen) / 28).to(weight.dtype))
    return text


def hand_cosine(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_cosine_equals_the_formula():
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    table = sim.cosine(a, b)
    for i in range(3):
        for j in range(2):
            assert table[i, j].item() == pytest.approx(hand_cosine(a[i], b[j]), abs=1e-12)


def test_clip_i_is_the_projected_class_token_cosine_averaged_over_references(clip):
    gen, refs = images(1, 224, 224, 1), images(2, 224, 224, 2)
    got = sim.score(gen, refs, sim.Encoders(clip_vision=clip))["clip_i"]

    def embed(x):  # by hand: last layer's class token → post_layernorm → visual_projection
        cls = layer_states(clip, x, [6])[6][:, 0]
        return clip.model.visual_projection(clip.model.vision_model.post_layernorm(cls))

    e = embed(torch.cat([gen, refs]))
    hand = (hand_cosine(e[0], e[1]) + hand_cosine(e[0], e[2])) / 2
    assert got.item() == pytest.approx(hand, abs=1e-5)


def test_dino_i_uses_the_class_token_after_the_final_norm(dino):
    x = images(2, 518, 518, 4)
    tokens = sim.dino_class_tokens(dino, list(x), 518)
    info = sim.describe(dino)
    pooled = dino.model(pixel_values=normalize_pixels(x, info))[2]  # ComfyUI's own pooled output
    assert torch.allclose(tokens, pooled.float(), atol=1e-5)
    patch_mean = F.layer_norm(layer_states(dino, x, [8])[8], (64,), dino.model.layernorm.weight.float(),
                              dino.model.layernorm.bias.float(), 1e-6)[:, 1:].mean(1)
    assert not torch.allclose(tokens, patch_mean, atol=1e-3)  # not a patch average


def test_identical_inputs_score_one_and_lpips_zero(clip, dino, lpips_net):
    x = images(2, 40, 56, 5)
    scores = sim.score(x[:1], x[:1], sim.Encoders(clip_vision=clip, dinov2=dino, lpips=lpips_net))
    assert scores["clip_i"].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["dino_i"].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["lpips"].item() == 0.0


def test_a_permuted_pairing_changes_the_scores_and_runs_are_deterministic(clip, dino, lpips_net):
    enc = sim.Encoders(clip_vision=clip, dinov2=dino, lpips=lpips_net)
    gen, refs = images(2, seed=6), images(2, seed=7)
    paired = [sim.score(gen[i:i + 1], refs[i:i + 1], enc) for i in range(2)]
    swapped = [sim.score(gen[i:i + 1], refs[1 - i:2 - i], enc) for i in range(2)]
    for metric in ("clip_i", "dino_i", "lpips"):
        assert paired[0][metric].item() != swapped[0][metric].item()
    again = [sim.score(gen[i:i + 1], refs[i:i + 1], enc) for i in range(2)]
    for a, b in zip(paired, again):
        assert all(torch.equal(a[m], b[m]) for m in a)


def test_box_region_scores_the_mask_box_and_segment_fills_outside(clip, dino):
    enc = sim.Encoders(clip_vision=clip, dinov2=dino)
    gen, ref = images(1, 48, 64, 8), images(1, 30, 30, 9)
    mask = torch.zeros(1, 48, 64)
    mask[0, 10:30, 20:50] = 1
    mask[0, 18:22, 32:38] = 0  # a hole in the middle: the box is the same, segment fills it
    box = sim.score(gen, ref, enc, sim.Settings(region="box"), generated_masks=mask)
    crop = gen[:, :, 10:30, 20:50]
    by_hand = sim.score(crop, ref, enc)
    assert all(box[m].item() == pytest.approx(by_hand[m].item(), abs=1e-6) for m in box)
    seg = sim.score(gen, ref, enc, sim.Settings(region="segment"), generated_masks=mask)
    filled = (gen * mask[:, None] + (1 - mask[:, None]))[:, :, 10:30, 20:50]
    by_hand = sim.score(filled, ref, enc)
    assert all(seg[m].item() == pytest.approx(by_hand[m].item(), abs=1e-6) for m in seg)
    assert seg["dino_i"].item() != box["dino_i"].item()


def test_reference_masks_apply_in_regions_and_masks_of_other_sizes_are_resized(dino):
    enc = sim.Encoders(dinov2=dino)
    gen, ref = images(1, 32, 32, 10), images(1, 32, 32, 11)
    gmask, rmask = torch.ones(1, 32, 32), torch.zeros(1, 16, 16)
    rmask[0, 4:12, 0:8] = 1  # → rows 8:24, cols 0:16 at 32 px
    got = sim.score(gen, ref, enc, sim.Settings(region="box"), generated_masks=gmask, reference_masks=rmask)
    hand = sim.score(gen, ref[:, :, 8:24, 0:16], enc)
    assert got["dino_i"].item() == pytest.approx(hand["dino_i"].item(), abs=1e-6)


def test_mask_errors_are_clear(dino):
    enc = sim.Encoders(dinov2=dino)
    with pytest.raises(sim.SimilarityError, match="region 'box' needs a generated mask"):
        sim.score(images(1), images(1), enc, sim.Settings(region="box"))
    with pytest.raises(sim.SimilarityError, match="generated mask 0 is empty"):
        sim.score(images(1), images(1), enc, sim.Settings(region="segment"), generated_masks=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="needs DINOv2"):
        sim.score(images(1), images(1), sim.Encoders(dinov2=tiny_models.tiny_clip_vision(0)))


def test_clip_t_is_the_image_embedding_against_the_projected_text_embedding(clip, clip_text):
    gen = images(2, 224, 224, 12)
    prompts = ["a photo of a dog", "a red cube"]
    got = sim.score(gen, images(1, 224, 224, 13), sim.Encoders(clip_vision=clip, clip_text=clip_text),
                    prompts=prompts)["clip_t"]
    image = clip.encode_image(gen.movedim(1, -1))["image_embeds"]
    for i, prompt in enumerate(prompts):
        pooled = clip_text.encode_from_tokens(clip_text.tokenize(prompt), return_pooled="unprojected")[1][0]
        weight = clip_text.cond_stage_model.clip_l.transformer.text_projection.weight.float()  # CLIP's projection
        text = pooled.float() @ weight.T
        assert got[i].item() == pytest.approx(hand_cosine(image[i], text), abs=1e-5)
    swapped = sim.score(gen, images(1, 224, 224, 13), sim.Encoders(clip_vision=clip, clip_text=clip_text),
                        prompts=prompts[::-1])["clip_t"]
    assert not torch.allclose(got, swapped)


def test_clip_t_refuses_a_checkpoint_clip_without_projection_and_mismatched_widths(comfy, clip, clip_text):
    # A checkpoint's CLIP has no text_projection and ComfyUI does not initialise it: its values are whatever memory
    # it got. Fresh memory is zeros; freed memory can hold NaN or integers read as floats (denormals). Each such
    # state is set explicitly so the check is tested on all of them, not on what the allocator gave this run.
    plain = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[1]
    weight = plain.cond_stage_model.clip_l.transformer.text_projection.weight
    integers = torch.arange(weight.numel(), dtype=torch.int32).view(weight.shape)
    for state in (torch.zeros_like(weight), torch.full_like(weight, float("nan")), integers.view(torch.float32)):
        weight.data.copy_(state)
        with pytest.raises(sim.SimilarityError, match="text_projection weights are missing"):
            sim.score(images(1), images(1), sim.Encoders(clip_vision=clip, clip_text=plain), prompts=["a dog"])
    assert sim.projection_looks_loaded(clip_text.cond_stage_model.clip_l.transformer.text_projection.weight)
    with pytest.raises(sim.SimilarityError, match="has 768 values but the CLIP image embedding 32"):
        sim.score(images(1), images(1), sim.Encoders(clip_vision=tiny_models.tiny_clip_vision(0),
                                                     clip_text=clip_text), prompts=["a dog"])


def test_the_command_refuses_a_text_encoder_file_without_projection(comfy, tmp_path, capsys):
    # The command can do what the node cannot: look in the file for the key before ComfyUI loads it.
    from safetensors.torch import save_file

    from train import evaluate

    (tmp_path / "g").mkdir()
    _save_png(images(1)[0], tmp_path / "g" / "a.png")
    text_sd = {"text_model.final_layer_norm.weight": torch.ones(8)}
    save_file(text_sd, str(tmp_path / "from_checkpoint.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, expected in (("from_checkpoint.safetensors", "has no text_projection tensor (1 tensors)"),
                           ("broken.safetensors", "is not a readable .safetensors file")):
        rc = evaluate.main(["--generated", str(tmp_path / "g"), "--references", str(tmp_path / "g"), "--clip-text",
                            str(tmp_path / name), "--prompt", "a dog", "--out", str(tmp_path / "out"),
                            "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and name in err and expected in err, err
    assert not (tmp_path / "out").exists()
    with_projection = {**text_sd, "text_projection.weight": torch.eye(8)}
    save_file(with_projection, str(tmp_path / "clip_l.safetensors"))
    assert "text_projection.weight" in evaluate._tensor_names(tmp_path / "clip_l.safetensors")


def test_lpips_equals_the_formula_and_round_trips_through_its_file(lpips_net, tmp_path):
    x0, x1 = images(2, 64, 64, 14), images(2, 64, 64, 15)
    got = lpips_net.distance(x0, x1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b, total = (2 * x0 - 1 - shift) / scale, (2 * x1 - 1 - shift) / scale, 0
    for index, layer in enumerate(lpips_net.features):  # ReLU outputs 1, 4, 7, 9, 11 of AlexNet
        a, b = layer(a), layer(b)
        if index in (1, 4, 7, 9, 11):
            k = (1, 4, 7, 9, 11).index(index)
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((na - nb) ** 2 * lpips_net.lins[k].weight.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    assert torch.allclose(got, total, atol=1e-6)
    path = save_lpips(lpips_net, tmp_path / "lpips_alex.safetensors")
    assert torch.equal(load_lpips(path).distance(x0, x1), got)
    vgg = random_lpips("vgg16", seed=1)
    assert vgg.distance(x0, x0).abs().max().item() == 0.0


def test_lpips_file_errors_name_the_file(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="LPIPS weights file not found: .*absent.safetensors.*models/lpips"):
        load_lpips(tmp_path / "absent.safetensors")
    import safetensors.torch

    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LPIPSWeightsError, match="other.safetensors is not an LPIPS"):
        load_lpips(tmp_path / "other.safetensors")


# ---- the node and the command ---------------------------------------------------------------------------------

def node_call(comfy, **kwargs):
    cls = comfy.NODE_CLASS_MAPPINGS["SC_SubjectSimilarity"]
    args = dict(region="full", dino_size=224, lpips_weights="none", lpips_size=256, rank_by="auto")
    return getattr(cls(), cls.FUNCTION)(**{**args, **kwargs})


def test_node_outputs_report_means_and_best_index(comfy, clip, dino):
    gen, ref = images(3, 32, 32, 16), images(1, 32, 32, 17)
    gen[1] = ref[0]
    report, clip_i, clip_t, dino_i, lpips, best = node_call(comfy, generated=gen.movedim(1, -1),
                                                            reference=ref.movedim(1, -1), clip_vision=clip,
                                                            dinov2=dino)
    scores = sim.score(gen, ref, sim.Encoders(clip_vision=clip, dinov2=dino))
    assert clip_i == pytest.approx(scores["clip_i"].mean().item(), abs=1e-12) and dino_i == pytest.approx(
        scores["dino_i"].mean().item(), abs=1e-12)
    assert (clip_t, lpips, best) == (-1.0, -1.0, 1)
    assert "image 1: CLIP-I 1.0000  DINO-I 1.0000" in report and "best by DINO-I: image 1" in report


def _vision_files(tmp_path, clip, dino):
    import safetensors.torch

    files = {}
    for name, model, config in (("clip", clip, CLIP_CONFIG), ("dino", dino, tiny_models.TINY_DINOV2_CONFIG)):
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.get_sd().items()},
                                    str(tmp_path / f"{name}.safetensors"))
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        files[name] = (str(tmp_path / f"{name}.safetensors"), str(tmp_path / f"{name}.json"))
    return files


def _save_png(tensor, path):
    import numpy as np
    from PIL import Image

    Image.fromarray((tensor.movedim(0, -1).numpy() * 255).round().astype(np.uint8)).save(path)


def test_the_command_and_the_node_give_the_same_numbers(comfy, clip, dino, lpips_net, tmp_path):
    from train import evaluate

    files = _vision_files(tmp_path, clip, dino)
    save_lpips(lpips_net, tmp_path / "lpips.safetensors")
    gen, ref = images(2, 40, 40, 18), images(2, 40, 40, 19)
    (tmp_path / "g").mkdir(), (tmp_path / "r").mkdir()
    for i in range(2):
        _save_png(gen[i], tmp_path / "g" / f"seed{i}.png")
        _save_png(ref[i], tmp_path / "r" / f"ref{i}.png")
    out = tmp_path / "out"
    rc = evaluate.main(["--generated", str(tmp_path / "g"), "--references", str(tmp_path / "r"),
                        "--clip-vision", files["clip"][0], "--clip-vision-config", files["clip"][1],
                        "--dinov2", files["dino"][0], "--dinov2-config", files["dino"][1],
                        "--lpips", str(tmp_path / "lpips.safetensors"), "--out", str(out), "--no-progress"])
    assert rc == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    header, rows = lines[0]["header"], lines[1:]
    assert header["metric_version"] == sim.METRIC_VERSION and len(header["models"]["clip_vision"]["sha256"]) == 64
    assert header["models"]["lpips"]["lpips_version"] == "0.1"
    # the node on the same 8-bit images (the PNG round trip quantises them)
    quant = lambda x: (x * 255).round() / 255  # noqa: E731
    for i, row in enumerate(rows):
        node = node_call(comfy, generated=quant(gen[i:i + 1]).movedim(1, -1), reference=quant(ref).movedim(1, -1),
                         clip_vision=clip, dinov2=dino)
        assert row["clip_i"] == pytest.approx(node[1], abs=1e-6) and row["dino_i"] == pytest.approx(node[3], abs=1e-6)
        direct = sim.score(quant(gen[i:i + 1]), quant(ref), sim.Encoders(lpips=lpips_net))["lpips"].item()
        assert row["lpips"] == pytest.approx(direct, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    clip_line = next(s for s in summary if s["metric"] == "clip_i")
    values = [r["clip_i"] for r in rows]
    assert clip_line["count"] == 2 and clip_line["mean"] == pytest.approx(sum(values) / 2)
    assert clip_line["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    csv_text = (out / "results.csv").read_text()
    assert csv_text.startswith("# {") and "metric_version" in csv_text and "\nid,generated,references," in csv_text


def test_the_command_reads_a_manifest_and_never_leaves_a_truncated_file(comfy, dino, clip, tmp_path, capsys):
    from PIL import Image

    from train import evaluate

    files = _vision_files(tmp_path, clip, dino)
    _save_png(images(1, 32, 32, 20)[0], tmp_path / "a.png")
    _save_png(images(1, 32, 32, 21)[0], tmp_path / "s.png")
    Image.new("RGBA", (32, 32)).save(tmp_path / "alpha.png")
    mask = torch.zeros(32, 32)
    mask[4:20, 4:20] = 1
    Image.fromarray((mask.numpy() * 255).astype("uint8")).save(tmp_path / "m.png")
    rows = [{"id": "one", "generated": "a.png", "references": ["s.png"], "generated_mask": "m.png", "subject": "x"},
            {"id": "two", "generated": "alpha.png", "reference": "s.png", "generated_mask": "m.png"}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("previous run\n")
    args = ["--manifest", str(tmp_path / "eval.jsonl"), "--dinov2", files["dino"][0], "--dinov2-config",
            files["dino"][1], "--region", "box", "--out", str(out), "--no-progress"]
    assert evaluate.main(args) == 2
    assert "alpha.png has an alpha channel" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == "previous run\n" and sorted(p.name for p in out.iterdir()) == [
        "results.jsonl"]
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"generated": "a.png"}) + "\n")
    assert evaluate.main(args) == 2
    assert "line 2: missing reference" in capsys.readouterr().err
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert evaluate.main(args + ["--group-by", "subject"]) == 0
    result = json.loads((out / "results.jsonl").read_text().splitlines()[1])
    hand = sim.score(evaluate.load_image(tmp_path / "a.png"), evaluate.load_image(tmp_path / "s.png"),
                     sim.Encoders(dinov2=dino), sim.Settings(region="box"),
                     generated_masks=mask[None])["dino_i"].item()
    assert result["dino_i"] == pytest.approx(hand, abs=1e-9) and result["subject"] == "x"
    groups = {s["group"] for s in json.loads((out / "summary.json").read_text())["summary"]}
    assert groups == {"all", "subject=x"}


def test_the_command_names_a_missing_lpips_file(comfy, tmp_path, capsys):
    from train import evaluate

    (tmp_path / "g").mkdir()
    _save_png(images(1)[0], tmp_path / "g" / "a.png")
    rc = evaluate.main(["--generated", str(tmp_path / "g"), "--references", str(tmp_path / "g"), "--lpips",
                        "alex_lpips.safetensors", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "LPIPS weights file not found: alex_lpips.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_a_wrong_or_corrupt_vision_file_with_the_trainers_message(clip, dino, tmp_path, capsys):
    from train import evaluate

    files = _vision_files(tmp_path, clip, dino)
    (tmp_path / "g").mkdir()
    _save_png(images(1, 40, 40, 3)[0], tmp_path / "g" / "a.png")
    base = ["--generated", str(tmp_path / "g"), "--references", str(tmp_path / "g"), "--no-progress",
            "--out", str(tmp_path / "out")]
    # DINOv2 weights where CLIP vision is asked for: the kind check names both
    assert evaluate.main(base + ["--clip-vision", files["dino"][0], "--clip-vision-config", files["dino"][1]]) == 2
    err = capsys.readouterr().err
    assert "CLIP" in err and "DINOv2" in err
    # a truncated file: says which file and what was expected
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert evaluate.main(base + ["--dinov2", str(tmp_path / "broken.safetensors"),
                                 "--dinov2-config", files["dino"][1]]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "DINOv2" in err
