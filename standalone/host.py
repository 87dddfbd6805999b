"""Locate ComfyUI and make it importable for standalone entry points (trainers, tests, the demo).

The rule is the same as tools/find_comfyui.sh: ``COMFYUI_PATH``, else the ComfyUI that contains the pack
(``<ComfyUI>/custom_nodes/<pack>``). The host must come *first* on ``sys.path``: the pack has a ``nodes/``
package of its own, and ``python -m train.x`` run from the pack root puts the pack root at ``sys.path[0]``,
where our ``nodes/`` would shadow ComfyUI's ``nodes.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
TESTED_COMFYUI_VERSION = "0.3.64"


class ComfyUINotFound(RuntimeError):
    pass


def _looks_like_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path:
    """The ComfyUI checkout to use, or a ComfyUINotFound that says how to get one."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        candidate = Path(env).expanduser().resolve()
    else:
        # the ComfyUI around an installed pack, else the one `CLONE_COMFYUI=1 make test` cloned
        candidate = next((c for c in (PACK_ROOT.parent.parent, PACK_ROOT / ".comfyui") if _looks_like_comfyui(c)),
                         PACK_ROOT.parent.parent)
    if _looks_like_comfyui(candidate):
        return candidate
    source = f"COMFYUI_PATH={env!r}" if env else f"the folder containing the pack ({candidate})"
    raise ComfyUINotFound(
        f"No ComfyUI found: {source} has no comfy/model_patcher.py and nodes.py.\n"
        f"The pack needs a ComfyUI checkout (tested with {TESTED_COMFYUI_VERSION}). Either set COMFYUI_PATH to "
        "your ComfyUI folder, or install the pack as <ComfyUI>/custom_nodes/<pack>. "
        "With internet access, `CLONE_COMFYUI=1 make test` clones one into .comfyui/."
    )


def bootstrap() -> Path:
    """Put ComfyUI in front of sys.path (and the pack root after it) and return ComfyUI's path.

    Safe to call repeatedly. Raises ComfyUINotFound before anything is imported from the host, so a wrong
    path gives one clear message instead of a traceback from inside an import.
    """
    comfy_root = find_comfyui()
    root_str, pack_str = str(comfy_root), str(PACK_ROOT)
    # "" and "." also mean the current directory, which is the pack root for `python -m train.x`.
    sys.path[:] = [p for p in sys.path if p not in (root_str, pack_str, "", ".") and
                   os.path.abspath(p) != pack_str]
    sys.path.insert(0, root_str)
    sys.path.insert(1, pack_str)
    shadow = sys.modules.get("nodes")
    if shadow is not None and not str(getattr(shadow, "__file__", "")).startswith(root_str):
        # Something imported the pack's own nodes/ package as top-level `nodes`; drop it so ComfyUI's wins.
        for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
            del sys.modules[name]
    _select_device()
    return comfy_root


def _select_device() -> None:
    """ComfyUI picks CUDA unless started with --cpu; standalone runs on a machine without a GPU need the flag."""
    if "comfy.model_management" in sys.modules:
        return  # already decided for this process
    import torch
    import comfy.cli_args

    has_accelerator = torch.cuda.is_available() or (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    if not has_accelerator:
        comfy.cli_args.args.cpu = True
