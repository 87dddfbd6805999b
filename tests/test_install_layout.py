"""The suite runs from the folder names users install the pack under, not only from the one CI clones into.

The README's `git clone` line and ComfyUI-Manager both name the folder after the repository
(`comfyui-subject-customization`): not a Python identifier. The pack's tracked files are copied into such folders
under a `custom_nodes/` directory and a part of the suite is run there in a fresh interpreter, from the pack
folder (the README's command) and from the ComfyUI-like root above it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent


def _copy_tracked_files(target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PACK_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = PACK_ROOT / rel
        if not source.is_file():  # deleted in the working tree
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def installed_copies(tmp_path_factory):
    base = tmp_path_factory.mktemp("install_layout") / "custom_nodes"
    copies = {}
    for name in ("comfyui-subject-customization", "comfyui.subject.customization"):
        _copy_tracked_files(base / name)
        copies[name] = base / name
    return copies


def test_suite_runs_from_a_dashed_folder_under_custom_nodes(installed_copies):
    pack = installed_copies["comfyui-subject-customization"]
    run = _pytest(pack, "tests/test_host.py", "-q")
    assert run.returncode == 0, f"pytest in {pack} failed:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout and "error" not in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("name", ["comfyui-subject-customization", "comfyui.subject.customization"])
def test_tests_run_from_the_folder_above_custom_nodes(installed_copies, name):
    pack = installed_copies[name]
    # From where a user of a ComfyUI checkout stands, by path. A test must run, not only be collected: pytest
    # imports a package's __init__.py when it sets the package up, so --collect-only would pass either way.
    test = pack / "tests" / "test_host.py::test_every_pack_node_documents_every_input"
    run = _pytest(pack.parent.parent, str(test), "-q")
    assert run.returncode == 0, f"pytest from {pack.parent.parent} failed:\n{run.stdout[-4000:]}"
    assert "1 passed" in run.stdout


def test_installed_copies_are_complete(installed_copies):
    for pack in installed_copies.values():
        for required in ("__init__.py", "pyproject.toml", "tests/conftest.py", "Makefile"):
            assert (pack / required).is_file(), f"{required} missing from the copy in {pack}"
