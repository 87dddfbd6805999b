"""The pack inside a real ComfyUI: loader, host resolution, import modes, model folders."""
import os
import subprocess
import sys
from pathlib import Path


PACK_ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_comfyui_loader_imports_the_pack_and_registers_nodes(comfy, pack_nodes):
    import nodes

    assert pack_nodes, "ComfyUI's loader registered no node from the pack"
    for name, cls in pack_nodes.items():
        assert nodes.NODE_CLASS_MAPPINGS[name] is cls
        assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS, f"{name} has no display name"


def test_every_pack_node_documents_every_input(pack_nodes):
    for name, cls in pack_nodes.items():
        assert getattr(cls, "DESCRIPTION", ""), f"{name} has no DESCRIPTION"
        assert cls.CATEGORY.startswith("subject_customization"), f"{name} is filed under {cls.CATEGORY!r}"
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, input_spec in spec.get(group, {}).items():
                opts = input_spec[1] if len(input_spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), f"{name} lacks output tooltips"


def test_wrong_comfyui_path_gives_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "--where"], cwd=PACK_ROOT, capture_output=True,
                            text=True, env=_env(COMFYUI_PATH=str(tmp_path / "not-comfyui")), timeout=120)
    assert result.returncode != 0
    assert "No ComfyUI found" in result.stderr and "COMFYUI_PATH" in result.stderr
    # the failure is raised before any host import: no frame from inside torch or ComfyUI
    assert "/comfy/" not in result.stderr and "site-packages" not in result.stderr


def test_shell_side_gives_the_same_message(tmp_path):
    script = f'source "{PACK_ROOT}/tools/find_comfyui.sh"; find_comfyui "{PACK_ROOT}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env=_env(COMFYUI_PATH=str(tmp_path)), timeout=60)
    assert result.returncode != 0 and "No ComfyUI found" in result.stderr


def test_trainer_entry_point_keeps_comfyuis_nodes_module(comfy):
    """`python -m train…` from the pack root must not let the pack's nodes/ package shadow ComfyUI's nodes.py."""
    import folder_paths

    comfy_root = Path(folder_paths.__file__).parent
    result = subprocess.run([sys.executable, "-m", "train", "--where"], cwd=PACK_ROOT, capture_output=True,
                            text=True, env=_env(COMFYUI_PATH=str(comfy_root)), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"nodes module: {comfy_root / 'nodes.py'}" in result.stdout


def test_pack_root_on_sys_path_first_would_shadow_and_bootstrap_fixes_it(comfy):
    """The failure bootstrap guards against is real: plain `import nodes` from the pack root finds ours."""
    # Resolve without executing: the pack's node modules use relative imports and import ComfyUI, so running
    # them as a top-level package outside ComfyUI fails, which is the point.
    where = "import importlib.util; print(importlib.util.find_spec('nodes').origin)"
    plain = subprocess.run([sys.executable, "-c", where], cwd=PACK_ROOT, capture_output=True, text=True,
                           env=_env(), timeout=60)
    assert plain.stdout.strip() == str(PACK_ROOT / "nodes" / "__init__.py"), plain.stderr
    code = "import nodes, sys; print(nodes.__file__)"
    fixed = subprocess.run([sys.executable, "-c", "import train; " + code], cwd=PACK_ROOT, capture_output=True,
                           text=True, env=_env(), timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip().endswith(os.path.join("ComfyUI", "nodes.py")) or "nodes.py" in fixed.stdout


def test_method_model_folders_are_registered(comfy):
    import folder_paths

    for name in ("anylogo", "eqdiff", "p3s", "customcontrast"):
        paths, extensions = folder_paths.folder_names_and_paths[name]
        assert os.path.join(folder_paths.models_dir, name) in paths
        assert extensions == {".safetensors"}


def test_model_folder_registration_keeps_user_paths(comfy, pack_module):
    import folder_paths

    register = pack_module.nodes.model_folders.register_model_folders
    saved = dict(folder_paths.folder_names_and_paths)
    try:
        # what extra_model_paths.yaml leaves behind before custom nodes load
        folder_paths.folder_names_and_paths["eqdiff"] = (["/data/my_eqdiff"], set())
        register()
        paths, extensions = folder_paths.folder_names_and_paths["eqdiff"]
        assert paths == ["/data/my_eqdiff", os.path.join(folder_paths.models_dir, "eqdiff")]
        assert extensions == {".safetensors"}
        register()  # idempotent
        assert folder_paths.folder_names_and_paths["eqdiff"][0] == paths
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved)
