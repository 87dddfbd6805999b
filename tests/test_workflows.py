"""Every shipped workflow: its UI file and API twin describe the same graph, its images and pictures ship."""
import json
import sys
from pathlib import Path

import pytest

from standalone.workflow_format import ui_to_api

PACK_ROOT = Path(__file__).resolve().parent.parent
API_FILES = sorted((PACK_ROOT / "workflows" / "api").glob("*.json"))


def test_workflows_are_shipped():
    assert API_FILES, "workflows/api/ holds no workflow"


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.stem)
def test_ui_file_and_api_twin_describe_the_same_graph(comfy, api_file):
    ui_file = PACK_ROOT / "workflows" / "ui" / api_file.name
    template = PACK_ROOT / "example_workflows" / api_file.name
    assert ui_file.is_file(), f"{api_file.name} has no UI-format file in workflows/ui/"
    assert template.is_file() and template.read_bytes() == ui_file.read_bytes(), \
        f"example_workflows/{api_file.name} must be a copy of workflows/ui/{api_file.name}"
    api = json.loads(api_file.read_text())
    assert ui_to_api(json.loads(ui_file.read_text()), comfy.NODE_CLASS_MAPPINGS) == api


# Running every workflow is tests/test_frontend.py's part: on a real server, from the prompt the frontend builds.

IMAGE_LOADERS = {"LoadImage": "image", "LoadImageMask": "image"}


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.stem)
def test_every_image_a_workflow_loads_is_shipped(api_file):
    names = [node["inputs"][IMAGE_LOADERS[node["class_type"]]] for node in json.loads(api_file.read_text()).values()
             if node["class_type"] in IMAGE_LOADERS]
    for name in names:
        assert (PACK_ROOT / "example_inputs" / name).is_file(), \
            f"{api_file.name} loads {name!r}, which example_inputs/ does not ship"


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.stem)
def test_every_workflow_has_its_pictures(api_file):
    # written by `python -m standalone.frontend` from the frontend itself
    assert (PACK_ROOT / "example_workflows" / f"{api_file.stem}.jpg").is_file(), "no template thumbnail"
    assert (PACK_ROOT / "docs" / "workflows" / f"{api_file.stem}.png").is_file(), "no README screenshot"
    assert f"docs/workflows/{api_file.stem}.png" in (PACK_ROOT / "README.md").read_text()


def test_example_inputs_are_copied_without_touching_the_users_files(pack_module, tmp_path, monkeypatch):
    install = sys.modules[pack_module.__name__ + ".nodes.example_inputs"].install_example_inputs
    (tmp_path / "shirt_scene.png").write_bytes(b"the user's own picture")
    copied = install(tmp_path)
    shipped = sorted(p.name for p in (PACK_ROOT / "example_inputs").glob("*.png"))
    assert sorted(p.name for p in copied) == [n for n in shipped if n != "shirt_scene.png"]
    assert (tmp_path / "shirt_scene.png").read_bytes() == b"the user's own picture"
    for name in shipped:
        if name != "shirt_scene.png":
            assert (tmp_path / name).read_bytes() == (PACK_ROOT / "example_inputs" / name).read_bytes()
    assert install(tmp_path) == []  # nothing left to copy
    monkeypatch.setenv("SUBJECT_CUSTOMIZATION_NO_EXAMPLE_INPUTS", "1")
    assert install(tmp_path / "elsewhere") == [] and not (tmp_path / "elsewhere").exists()
