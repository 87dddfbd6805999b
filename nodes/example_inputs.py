"""The example workflows' input images, placed in ComfyUI's input folder so a template opens ready to run.

The shipped workflows name their images (`shirt_scene.png`, ...) in LoadImage nodes, and LoadImage only lists
the top level of the input folder. When the pack loads, each file of `example_inputs/` that the input folder
lacks is copied there; a file the user already has under that name is never touched. Set
SUBJECT_CUSTOMIZATION_NO_EXAMPLE_INPUTS=1 to skip the copy.
"""
import logging
import os
import shutil
from pathlib import Path

import folder_paths

EXAMPLE_INPUTS_DIR = Path(__file__).resolve().parent.parent / "example_inputs"
OPT_OUT_VARIABLE = "SUBJECT_CUSTOMIZATION_NO_EXAMPLE_INPUTS"


def example_input_files() -> list[Path]:
    return sorted(p for p in EXAMPLE_INPUTS_DIR.iterdir() if p.suffix.lower() == ".png")


def install_example_inputs(input_dir: str | os.PathLike | None = None) -> list[Path]:
    """Copy the missing example images into input_dir (ComfyUI's input folder by default); return the copies."""
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0"):
        return []
    target = Path(input_dir or folder_paths.get_input_directory())
    copied = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for source in example_input_files():
            dest = target / source.name
            if not dest.exists():
                shutil.copyfile(source, dest)
                copied.append(dest)
    except OSError as error:  # a read-only input folder must not stop the pack from loading
        logging.warning("Subject Customization: could not copy the example images into %s (%s); copy them from "
                        "%s yourself to run the example workflows", target, error, EXAMPLE_INPUTS_DIR)
        return copied
    if copied:
        logging.info("Subject Customization: copied %d example image(s) for the example workflows into %s",
                     len(copied), target)
    return copied
