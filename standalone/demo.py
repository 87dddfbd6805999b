"""`make demo`: run the pack's main example workflow headless through ComfyUI's executor.

Uses the weights the workflow names when they are in ComfyUI's model folders; otherwise the embedded tiny /
random-weight stand-ins, and says so: images from stand-ins show that the graph runs, not what the method does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .host import PACK_ROOT, bootstrap

MAIN_WORKFLOW = "anylogo_logo_insertion"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def load_api_workflow(name: str) -> dict:
    path = PACK_ROOT / "workflows" / "api" / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in (PACK_ROOT / "workflows" / "api").glob("*.json"))
        raise FileNotFoundError(f"no workflow {name!r} in workflows/api/; available: {', '.join(available)}")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--workflow", default=MAIN_WORKFLOW, help="name of a workflow in workflows/api/")
    parser.add_argument("--output", type=Path, default=PACK_ROOT / "demo_output",
                        help="folder the images are written to")
    args = parser.parse_args(argv)

    comfy_root = bootstrap()
    from . import demo_assets
    from .runner import init_comfyui, quiet_comfyui_logging, run_workflow
    from .stand_ins import cap_for_stand_ins, substitute_stand_ins

    quiet_comfyui_logging()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    input_dir = Path(tempfile.mkdtemp(prefix="demo_input_"))
    demo_assets.write_demo_inputs(input_dir)
    init_comfyui(PACK_ROOT, output_dir=output, input_dir=input_dir)
    print(f"ComfyUI: {comfy_root}")
    print(f"workflow: workflows/api/{args.workflow}.json")

    prompt, substitutions = substitute_stand_ins(load_api_workflow(args.workflow))
    if substitutions:
        print("weights: NOT all found in ComfyUI's model folders, so the embedded tiny/random-weight models "
              "stand in:")
        for s in substitutions:
            print(f"  - node {s.node_id} {s.node_type}.{s.input_name}: {s.wanted} -> {s.stand_in}")
        print("  Images made this way prove the graph runs end to end; they are NOT meaningful pictures.")
        prompt, notes = cap_for_stand_ins(prompt)
        if notes:
            print("  so the run is kept short on a CPU (same graph, these values capped):")
            for note in notes:
                print(f"  - {note}")
    else:
        print("weights: all found in ComfyUI's model folders (real weights)")

    before = {p for p in output.rglob("*") if p.suffix in IMAGE_SUFFIXES}
    run_workflow(prompt)
    written = sorted(p for p in output.rglob("*") if p.suffix in IMAGE_SUFFIXES and p not in before)
    print(f"wrote {len(written)} image(s) to {output}:")
    for path in written:
        print(f"  {path.relative_to(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
