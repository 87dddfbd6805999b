"""Every shipped workflow: its UI file and API twin describe the same graph, and it runs headless."""
import json
from pathlib import Path

import pytest

from standalone import demo_assets
from standalone.runner import run_workflow
from standalone.stand_ins import cap_for_stand_ins, substitute_stand_ins
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


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.stem)
def test_workflow_runs_headless_on_stand_in_models(comfy, api_file, output_dir):
    import folder_paths

    demo_assets.write_demo_inputs(folder_paths.get_input_directory())
    prompt, _ = substitute_stand_ins(json.loads(api_file.read_text()))
    result = run_workflow(cap_for_stand_ins(prompt)[0])
    saved = [img for out in result["outputs"].values() for img in out.get("images", [])
             if img.get("type") == "output"]
    for image in saved:
        assert (output_dir / image.get("subfolder", "") / image["filename"]).is_file()
    assert result["outputs"], f"{api_file.name} produced no output"
