"""Convert between ComfyUI's two workflow formats using the node definitions.

The UI format (what users load and share) stores widget values as a positional list per node; the API format
(what the executor runs) stores named inputs. ComfyUI core only converts UI→API inside the browser, so the pack
keeps an API twin of each shipped workflow. ``ui_to_api`` lets the tests prove a UI file and its twin describe
the same graph; ``api_to_ui`` writes the UI file from a hand-written API twin
(``python -m standalone.workflow_format workflows/api/NAME.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(node_cls) -> list[tuple[str, tuple]]:
    spec = node_cls.INPUT_TYPES()
    return [(name, s if isinstance(s, tuple) else (s,))
            for group in ("required", "optional") for name, s in spec.get(group, {}).items()]


def _options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput", False)


# The front end adds widgets that have no input of their own, and their values take slots in the UI file's
# `widgets_values` (comfyui_frontend_package 1.27, read from its bundle):
#  - a "control after generate" combo right after an INT widget whose spec sets `control_after_generate`, or,
#    when the spec leaves it unset, whose name is `seed` or `noise_seed` (legacy convention; an explicit False
#    turns it off), and after a COMBO widget whose spec sets it;
#  - an upload button for the first required COMBO with `image_upload` (or video/animated upload), appended to
#    the *required* inputs, so its value comes after every required widget and before the optional ones.
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


def _has_control_widget(name: str, spec: tuple) -> bool:
    setting = _options(spec).get("control_after_generate")
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        return bool(setting)
    if spec[0] == "INT":
        return bool(setting) if setting is not None else name in SEED_NAMES
    return False


def widget_slots(node_cls) -> list[tuple[str, str | None]]:
    """The node's `widgets_values` layout in the front end: (kind, input name) per slot, kind being
    "value" (the input's own widget), "control" (its control-after-generate combo) or "upload" (name None)."""
    spec = node_cls.INPUT_TYPES()
    slots: list[tuple[str, str | None]] = []
    for group in ("required", "optional"):
        entries = [(name, s if isinstance(s, tuple) else (s,)) for name, s in spec.get(group, {}).items()]
        for name, input_spec in entries:
            if _is_widget(input_spec):
                slots.append(("value", name))
                if _has_control_widget(name, input_spec):
                    slots.append(("control", name))
        if group == "required" and any(
                (isinstance(s[0], list) or s[0] == "COMBO") and any(_options(s).get(f) for f in UPLOAD_FLAGS)
                for _, s in entries):
            slots.append(("upload", None))
    return slots


def ui_to_api(ui: dict, node_classes: dict) -> dict:
    links = {link[0]: link for link in ui.get("links", [])}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) == 2:  # muted nodes are not sent to the executor
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} is bypassed; bypass is resolved by the front end, not here")
        node_cls = node_classes.get(node["type"])
        if node_cls is None:
            raise KeyError(f"node {node['id']} has type {node['type']!r}, which no loaded node pack provides")
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some front-end extensions store widgets by name
            raise ValueError(f"node {node['id']} ({node['type']}) stores widgets_values as a dict")
        specs = dict(_ordered_inputs(node_cls))
        for position, (kind, name) in enumerate(widget_slots(node_cls)):
            if kind != "value" or name in inputs:
                continue
            if position < len(values):
                inputs[name] = values[position]
            elif "default" in _options(specs[name]):  # the front end leaves untouched defaults out
                inputs[name] = _options(specs[name])["default"]
            else:
                raise ValueError(f"node {node['id']} ({node['type']}) has no value for widget {name!r}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _depths(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str, stack=()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise ValueError(f"the workflow has a cycle through node {nid}")
        parents = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
        depth[nid] = 1 + max((visit(p, stack + (nid,)) for p in parents), default=-1)
        return depth[nid]

    for nid in prompt:
        visit(nid)
    return depth


def _estimated_height(n_inputs: int, n_outputs: int, widgets: list, has_upload: bool) -> int:
    """About the height the frontend gives the node (slots, widgets, an image loader's preview), so that the
    columns of a generated workflow do not overlap when it opens."""
    height = 10 + 22 * max(n_inputs, n_outputs) + 26 * len(widgets)
    if has_upload:  # an image loader: the frontend draws the picture below its widgets
        height += 260
    height += sum(80 for value in widgets if isinstance(value, str) and len(value) > 40)  # multiline text
    return height


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    depth = _depths(prompt)
    order = sorted(prompt, key=lambda n: (depth[n], int(n)))
    links, nodes = [], []
    outputs: dict[tuple[str, int], list[int]] = {}
    column_tops: dict[int, int] = {}
    for nid in order:
        for name, value in prompt[nid]["inputs"].items():
            if isinstance(value, list):
                outputs.setdefault((value[0], value[1]), [])
    for index, nid in enumerate(order):
        entry = prompt[nid]
        node_cls = node_classes[entry["class_type"]]
        inputs, widget_values = [], {}
        for name, spec in _ordered_inputs(node_cls):
            value = entry["inputs"].get(name)
            if isinstance(value, list):
                source_cls = node_classes[prompt[value[0]]["class_type"]]
                link_type = source_cls.RETURN_TYPES[value[1]]
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(nid), len(inputs), link_type])
                outputs[(value[0], value[1])].append(link_id)
                slot = {"name": name, "type": link_type if not _is_widget(spec) else spec[0]
                        if not isinstance(spec[0], list) else "COMBO", "link": link_id}
                if _is_widget(spec):
                    slot["widget"] = {"name": name}
                inputs.append(slot)
            elif not _is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None})
            if _is_widget(spec):
                widget_values[name] = value if not isinstance(value, list) else _options(spec).get("default")
        # "fixed" keeps a shipped workflow reproducible; the upload button's value is the word "image"
        widgets = [widget_values[name] if kind == "value" else "fixed" if kind == "control" else "image"
                   for kind, name in widget_slots(node_cls)]
        names = getattr(node_cls, "RETURN_NAMES", None) or node_cls.RETURN_TYPES
        height = _estimated_height(len(inputs), len(node_cls.RETURN_TYPES), widgets,
                                   any(kind == "upload" for kind, _ in widget_slots(node_cls)))
        top = column_tops.get(depth[nid], 60)
        column_tops[depth[nid]] = top + height + 70  # room for the next node's title bar
        nodes.append({
            "id": int(nid), "type": entry["class_type"], "pos": [60 + 400 * depth[nid], top],
            "size": [340, height], "flags": {}, "order": index, "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": outputs.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(zip(names, node_cls.RETURN_TYPES))],
            "properties": {"Node name for S&R": entry["class_type"]},
            "widgets_values": widgets,
        })
    return {"last_node_id": max(int(n) for n in prompt), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write workflows/ui/NAME.json and example_workflows/NAME.json "
                                                 "from the API twin workflows/api/NAME.json.")
    parser.add_argument("api_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    from .host import PACK_ROOT
    from .runner import init_comfyui

    nodes = init_comfyui(PACK_ROOT)
    for api_file in args.api_files:
        ui = api_to_ui(json.loads(api_file.read_text()), nodes.NODE_CLASS_MAPPINGS)
        text = json.dumps(ui, indent=2) + "\n"
        for target in (PACK_ROOT / "workflows" / "ui" / api_file.name, PACK_ROOT / "example_workflows" / api_file.name):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target.relative_to(PACK_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
