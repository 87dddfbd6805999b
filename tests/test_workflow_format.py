"""The UI<->API workflow converter the twin check relies on, tested against a real front-end file."""
import json
from pathlib import Path

import pytest

from standalone.workflow_format import api_to_ui, ui_to_api


def _frontend_default_template() -> dict:
    import comfyui_workflow_templates

    path = Path(comfyui_workflow_templates.__file__).parent / "templates" / "default.json"
    return json.loads(path.read_text())


def test_ui_to_api_reads_the_front_ends_own_default_template(comfy):
    api = ui_to_api(_frontend_default_template(), comfy.NODE_CLASS_MAPPINGS)
    ksampler = api["3"]
    assert ksampler["class_type"] == "KSampler"
    # the seed widget is followed by its control_after_generate value, which the API format does not carry
    assert ksampler["inputs"] == {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                  "latent_image": ["5", 0], "seed": 156680208700286, "steps": 20, "cfg": 8,
                                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
    assert api["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert api["9"]["inputs"] == {"images": ["8", 0], "filename_prefix": "ComfyUI"}  # default, not stored
    assert api["4"]["inputs"] == {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}


def test_api_to_ui_round_trips_through_the_front_end_layout(comfy):
    api = ui_to_api(_frontend_default_template(), comfy.NODE_CLASS_MAPPINGS)
    ui = api_to_ui(api, comfy.NODE_CLASS_MAPPINGS)
    assert ui_to_api(ui, comfy.NODE_CLASS_MAPPINGS) == api
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"][1] == "fixed"  # seed control keeps the run reproducible
    for link in ui["links"]:  # every link is listed at both ends
        link_id, src, src_slot, dst, dst_slot, _ = link
        assert link_id in next(n for n in ui["nodes"] if n["id"] == src)["outputs"][src_slot]["links"]
        assert next(n for n in ui["nodes"] if n["id"] == dst)["inputs"][dst_slot]["link"] == link_id


def test_ui_to_api_rejects_unknown_node_types(comfy):
    ui = _frontend_default_template()
    ui["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(KeyError, match="NoSuchNode"):
        ui_to_api(ui, comfy.NODE_CLASS_MAPPINGS)
