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


def test_widget_slots_follow_the_frontends_rules():
    from standalone.workflow_format import widget_slots

    class Node:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "image": (["a.png"], {"image_upload": True}),
                                 "seed": ("INT", {"default": 0}), "noise_seed": ("INT", {"control_after_generate": False}),
                                 "count": ("INT", {"control_after_generate": True}),
                                 "pick": (["x", "y"], {"control_after_generate": True}), "linked": ("INT", {"forceInput": True})},
                    "optional": {"strength": ("FLOAT", {"default": 1.0}), "seed2": ("INT", {})}}

    # the upload button closes the required group; explicit False wins over the seed-name convention
    assert widget_slots(Node) == [("value", "image"), ("value", "seed"), ("control", "seed"), ("value", "noise_seed"),
                                  ("value", "count"), ("control", "count"), ("value", "pick"), ("control", "pick"),
                                  ("upload", None), ("value", "strength"), ("value", "seed2")]


def test_stock_image_mask_loader_has_its_upload_button_last(comfy):
    from standalone.workflow_format import widget_slots

    # as the frontend saves it, e.g. ["name.png", "alpha", "image"]; tests/test_frontend.py checks it in the browser
    assert widget_slots(comfy.NODE_CLASS_MAPPINGS["LoadImageMask"]) == [
        ("value", "image"), ("value", "channel"), ("upload", None)]
