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


def _extra_widget_values(spec: tuple) -> int:
    """Front-end widgets that add a value after this one: the seed control and the image upload button."""
    opts = _options(spec)
    return int(bool(opts.get("control_after_generate"))) + int(bool(opts.get("image_upload")))


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
        values = list(node.get("widgets_values") or [])
        position = 0
        for name, spec in _ordered_inputs(node_cls):
            if not _is_widget(spec):
                continue
            if name not in inputs:
                if position < len(values):
                    inputs[name] = values[position]
                elif "default" in _options(spec):  # the front end leaves untouched defaults out
                    inputs[name] = _options(spec)["default"]
                else:
                    raise ValueError(f"node {node['id']} ({node['type']}) has no value for widget {name!r}")
            position += 1 + _extra_widget_values(spec)
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


def api_to_ui(prompt: dict, node_classes: dict) -> dict:
    depth = _depths(prompt)
    order = sorted(prompt, key=lambda n: (depth[n], int(n)))
    links, nodes = [], []
    outputs: dict[tuple[str, int], list[int]] = {}
    rows_at_depth: dict[int, int] = {}
    for nid in order:
        for name, value in prompt[nid]["inputs"].items():
            if isinstance(value, list):
                outputs.setdefault((value[0], value[1]), [])
    for index, nid in enumerate(order):
        entry = prompt[nid]
        node_cls = node_classes[entry["class_type"]]
        inputs, widgets = [], []
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
                widgets.append(value if not isinstance(value, list) else _options(spec).get("default"))
                if _options(spec).get("control_after_generate"):
                    widgets.append("fixed")
                if _options(spec).get("image_upload"):
                    widgets.append("image")
        names = getattr(node_cls, "RETURN_NAMES", None) or node_cls.RETURN_TYPES
        row = rows_at_depth.get(depth[nid], 0)
        rows_at_depth[depth[nid]] = row + 1
        nodes.append({
            "id": int(nid), "type": entry["class_type"], "pos": [60 + 380 * depth[nid], 60 + 260 * row],
            "size": [340, 60 + 26 * (len(inputs) + len(widgets))], "flags": {}, "order": index, "mode": 0,
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
