"""Manifest validation names each bad row and why; skip/stop; building manifests from a folder layout."""
import json

import numpy as np
import pytest
from PIL import Image

from train.manifest import FieldSpec, ManifestError, ManifestSchema, read_manifest
from train.prepare_manifest import Companion, FolderLayout, build_rows, cli, parse_companion

SCHEMA = ManifestSchema(fields={"scene": FieldSpec("image"), "mask": FieldSpec("mask"),
                                "caption": FieldSpec("text", required=False),
                                "points": FieldSpec("list", required=False)},
                        same_size=(("scene", "mask"),))


def _png(path, w, h, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": (h, w, 3), "L": (h, w)}[mode]
    Image.fromarray(np.zeros(channels, np.uint8), mode).save(path)
    return path


@pytest.fixture
def manifest(tmp_path):
    _png(tmp_path / "img/a.png", 64, 64)
    _png(tmp_path / "img/a_mask.png", 64, 64, "L")
    _png(tmp_path / "img/b.png", 64, 64)
    _png(tmp_path / "img/b_mask.png", 64, 48, "L")
    (tmp_path / "img/c.png").write_text("not an image")
    rows = [
        {"id": "a", "scene": "img/a.png", "mask": "img/a_mask.png", "caption": "a logo", "points": [[1, 2]]},
        {"id": "b", "scene": "img/b.png", "mask": "img/b_mask.png"},                  # size mismatch
        {"id": "gone", "scene": "img/missing.png", "mask": "img/a_mask.png"},         # missing file
        {"scene": "img/a.png"},                                                       # no mask, no id
        {"id": 4, "scene": "img/c.png", "mask": "img/a_mask.png", "caption": 3},      # not an image, bad caption
    ]
    path = tmp_path / "data" / "manifest.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({k: (f"../{v}" if isinstance(v, str) and v.startswith("img/") else v)
                         for k, v in r.items()}) for r in rows]
    lines.insert(2, "")                      # blank lines are ignored but counted
    lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stop_names_every_bad_row_and_reason(manifest):
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, SCHEMA, on_bad_row="stop")
    text = str(err.value)
    assert "set on_bad_row=skip" in text
    assert ("line 2 (id 'b'): mask '../img/b_mask.png' (mask) is 64x48 but image '../img/b.png' (scene) is 64x64"
            in text)
    assert "line 4 (id 'gone'): image file '../img/missing.png' (scene) does not exist" in text
    assert "line 5: missing field 'mask'" in text
    assert "line 6 (id '4'): image file '../img/c.png' (scene) cannot be read as an image" in text
    assert "caption must be text, got 3" in text
    assert "line 7: not valid JSON" in text


def test_skip_keeps_good_rows_resolved_and_reports_the_rest(manifest):
    report = read_manifest(manifest, SCHEMA, on_bad_row="skip")
    assert [r["id"] for r in report.rows] == ["a"]
    row = report.rows[0]
    assert row["scene"] == str((manifest.parent.parent / "img/a.png").resolve())   # relative to the manifest
    assert row["caption"] == "a logo" and row["points"] == [[1, 2]] and row["_line"] == 1
    assert [b.line for b in report.bad_rows] == [2, 4, 5, 6, 7]
    summary = report.to_json()
    assert summary["usable_rows"] == 1 and summary["bad_rows"][0] == {
        "line": 2, "id": "b",
        "problems": ["mask '../img/b_mask.png' (mask) is 64x48 but image '../img/b.png' (scene) is 64x64"]}


def test_no_usable_rows_and_missing_manifest(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"scene": "nope.png", "mask": "nope.png"}) + "\n")
    with pytest.raises(ManifestError, match="no usable rows"):
        read_manifest(path, SCHEMA, on_bad_row="skip")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "absent.jsonl", SCHEMA)


def test_schema_rejects_same_size_on_non_image_fields():
    with pytest.raises(ValueError, match="'caption', which is not an image or mask field"):
        ManifestSchema(fields={"image": FieldSpec("image"), "caption": FieldSpec("text")},
                       same_size=(("image", "caption"),))


LAYOUT = FolderLayout("scene", (Companion("mask", ("_mask.png", "_mask.jpg"), "path", required=True),
                                Companion("caption", (".txt",), "text")))


def test_folder_layout_rows_and_skips(tmp_path):
    data = tmp_path / "data"
    _png(data / "a.png", 8, 8)
    _png(data / "a_mask.png", 8, 8, "L")
    (data / "a.txt").write_text("  a red logo \n")
    _png(data / "sub/b.jpg", 8, 8)                      # no mask: skipped
    _png(data / "sub/c.png", 8, 8)
    _png(data / "sub/c_mask.jpg", 8, 8)                 # second suffix alternative, no caption (optional)
    rows, skipped = build_rows(data, LAYOUT, relative_to=tmp_path)
    assert rows == [{"id": "a", "scene": "data/a.png", "mask": "data/a_mask.png", "caption": "a red logo"},
                    {"id": "sub/c", "scene": "data/sub/c.png", "mask": "data/sub/c_mask.jpg"}]
    assert skipped == [(str(data / "sub/b.jpg"), "no mask file (b_mask.png or b_mask.jpg)")]


def test_cli_writes_a_manifest_the_validator_accepts(tmp_path, capsys):
    data = tmp_path / "data"
    _png(data / "x.png", 16, 16)
    _png(data / "x_mask.png", 16, 16, "L")
    _png(data / "y.png", 16, 16)
    out = tmp_path / "out" / "m.jsonl"
    assert cli([str(data), "--out", str(out), "--primary", "scene", "--companion", "mask=_mask.png:required",
                "--companion", "caption=.txt:text"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 rows" in printed and "skipped 1" in printed and "y.png: no mask file (y_mask.png)" in printed
    report = read_manifest(out, SCHEMA)
    assert report.rows[0]["mask"] == str(data / "x_mask.png")
    # a trainer's published layout: finetune has no mask companion, so the mask file is an image of its own
    assert cli([str(data), "--out", str(out), "--method", "finetune"]) == 0
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == [
        "../data/x.png", "../data/x_mask.png", "../data/y.png"]


def test_parse_companion_errors():
    assert parse_companion("mask=_m.png,_m.jpg:required") == Companion("mask", ("_m.png", "_m.jpg"), "path", True)
    assert parse_companion("box=_box.json:json") == Companion("box", ("_box.json",), "json", False)
    with pytest.raises(ValueError, match="unknown flag"):
        parse_companion("mask=_m.png:optional")
    with pytest.raises(ValueError, match="expects field=suffix"):
        parse_companion("mask")
