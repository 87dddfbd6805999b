"""Execute API-format workflows headless through ComfyUI's own validator and executor.

This is the same path a prompt takes in a running ComfyUI server (``execution.validate_prompt`` then
``execution.PromptExecutor``), minus the web socket: a small stand-in records what the executor would have
sent to the browser, which is also where execution errors arrive.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from .host import PACK_ROOT, bootstrap


class WorkflowInvalid(RuntimeError):
    """ComfyUI's validator refused the prompt (missing node type, bad widget value, broken link)."""


class WorkflowFailed(RuntimeError):
    """A node raised while the prompt executed; the message carries the node and ComfyUI's error text."""


class _BrowserStandIn:
    """What PromptExecutor expects of PromptServer when nobody is connected."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


_loaded_packs: dict[str, bool] = {}


def init_comfyui(pack_dir: Path | str = PACK_ROOT, *, output_dir=None, input_dir=None, extra_model_dirs=None):
    """Boot ComfyUI's node registry once per process and load the pack with ComfyUI's custom-node loader.

    extra_model_dirs maps a folder name ("checkpoints", "clip_vision", "anylogo", ...) to a directory that is
    added in front of that folder's search paths, the way extra_model_paths.yaml entries are.
    Returns ComfyUI's ``nodes`` module.
    """
    bootstrap()
    # main.py imports ComfyUI's `utils` package before nodes.py puts comfy/ (which has a utils.py) at
    # sys.path[0]; keep that order or `server` (imported by core nodes) fails to import.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401

    import folder_paths

    # before the pack loads: it copies the example images into the input folder
    if output_dir is not None:
        folder_paths.set_output_directory(str(output_dir))
    if input_dir is not None:
        folder_paths.set_input_directory(str(input_dir))
    root = logging.getLogger()
    quiet = root.level >= logging.WARNING
    if quiet:  # ComfyUI warns about each optional core module it cannot use (e.g. audio without torchaudio)
        root.setLevel(logging.ERROR)
    try:
        import nodes

        failed = []
        if not _loaded_packs:
            failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        if quiet:
            root.setLevel(logging.WARNING)
    if quiet and failed:
        print(f"(ComfyUI core modules not importable here, unused by this pack: {', '.join(failed)})")
    pack_dir = str(Path(pack_dir).resolve())
    if pack_dir not in _loaded_packs:
        ok = asyncio.run(nodes.load_custom_node(pack_dir, module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI's custom-node loader could not import the pack at {pack_dir}; "
                               "its log above holds the traceback")
        _loaded_packs[pack_dir] = ok
    for folder, path in (extra_model_dirs or {}).items():
        folder_paths.add_model_folder_path(folder, str(path), is_default=True)
    return nodes


def run_workflow(prompt: dict, *, executor=None) -> dict:
    """Validate and execute an API-format prompt; return ComfyUI's history result (``{"outputs": …}``).

    Pass the same ``executor`` (from ``make_executor``) to several calls to keep ComfyUI's node cache between
    them, as a server does between queued prompts.
    """
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        details = "; ".join(f"node {nid} ({info.get('class_type')}): "
                            + ", ".join(": ".join(part for part in (e.get("message"), e.get("details")) if part)
                                        for e in info.get("errors", []))
                            for nid, info in node_errors.items())
        raise WorkflowInvalid(f"{error.get('message')}: {error.get('details')} {details}".strip())
    executor = executor or make_executor()
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        if errors:
            e = errors[0]
            raise WorkflowFailed(f"node {e['node_id']} ({e['node_type']}) raised {e['exception_type']}: "
                                 f"{e['exception_message']}")
        raise WorkflowFailed(f"execution did not succeed: {executor.status_messages}")
    return executor.history_result


def make_executor():
    import execution

    return execution.PromptExecutor(_BrowserStandIn(), cache_type=execution.CacheType.CLASSIC)


def quiet_comfyui_logging(level=logging.WARNING):
    logging.getLogger().setLevel(level)
