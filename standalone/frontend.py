"""ComfyUI served for real, with the pack installed, and its own frontend driven in headless Chromium.

What a user meets: `main.py` started as a server with a base directory of its own (the pack under
`custom_nodes/`, stand-in weights under the exact file names the workflows ask for, the example images in
`input/`), the bundled frontend (comfyui_frontend_package) loaded in Debian's Chromium through Playwright.
A workflow is loaded with the frontend's `app.loadGraphData`, converted with its `app.graphToPrompt()`,
queued with `POST /prompt` and followed in `/history`. Used by tests/test_frontend.py and by
`python -m standalone.frontend` (which refreshes the workflow screenshots and template thumbnails).
Nothing here downloads a browser.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .host import PACK_ROOT, find_comfyui
from .stand_ins import LOADER_INPUTS, prompt_embeddings, stand_in_file

PACK_FOLDER_NAME = "comfyui-subject-customization"  # the name the README's clone line and ComfyUI-Manager use
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Headless on a machine without a display or internet: no GPU, no sandbox (root in CI), and no background
# connections to Google's services (refused here, and slow to time out).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Frontend settings for a first visit: no tutorial or template browser over the canvas; no minimap or
# frame-rate text in the screenshots.
FIRST_VISIT_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                        "Comfy.Graph.CanvasInfo": False}


class BrowserUnavailable(RuntimeError):
    pass


def find_chromium() -> str:
    explicit = os.environ.get("SUBJECT_CUSTOMIZATION_CHROMIUM")
    for candidate in ([explicit] if explicit else []) + list(CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BrowserUnavailable(
        "No Chromium found (looked at " + ", ".join(CHROMIUM_CANDIDATES) + "). The frontend test drives the "
        "system browser: install Debian's package (`apt-get install chromium`; tools/ensure_env.sh does it where "
        "it may), or set SUBJECT_CUSTOMIZATION_CHROMIUM to a Chromium/Chrome binary.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workflow_weights(prompt: dict) -> set[tuple[str, str]]:
    """(model folder, file name) of every weight file an API-format workflow asks for."""
    wanted = set()
    for node in prompt.values():
        for (node_type, input_name), folder in LOADER_INPUTS.items():
            value = node["inputs"].get(input_name)
            if node["class_type"] == node_type and isinstance(value, str):
                wanted.add((folder, value))
    return wanted | prompt_embeddings(prompt)


def prepare_base_directory(base: Path, api_workflows: list[dict], cache: Path | None = None) -> Path:
    """A ComfyUI base directory holding the pack, stand-ins for every weight the workflows name, and settings.

    The pack is linked in under the folder name users get, so ComfyUI's loader imports it as it does for them.
    The example images reach `input/` the way they reach a user's: the pack copies them when it loads.
    """
    base.mkdir(parents=True, exist_ok=True)
    pack_link = base / "custom_nodes" / PACK_FOLDER_NAME
    pack_link.parent.mkdir(parents=True, exist_ok=True)
    if not pack_link.exists():
        pack_link.symlink_to(PACK_ROOT, target_is_directory=True)
    for folder, name in sorted(set().union(*map(workflow_weights, api_workflows))):
        target = base / "models" / folder / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(stand_in_file(folder, name, cache))
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    if not settings.exists():
        settings.write_text(json.dumps(FIRST_VISIT_SETTINGS))
    return base


class ComfyServer:
    """`python main.py --cpu` on a free local port, stopped (and its log kept) on exit."""

    def __init__(self, base: Path, *, python: str = sys.executable, startup_timeout: float = 180.0):
        self.base, self.python, self.startup_timeout = base, python, startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        comfy = find_comfyui()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        command = [self.python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base), "--temp-directory", str(self.base / "temp"),
                   "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=comfy, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s:\n"
                           + self.log_tail())

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def queue(self, prompt: dict) -> str:
        """POST /prompt as the frontend does; returns the prompt id, or raises with the server's refusal."""
        body = json.dumps({"prompt": prompt, "client_id": "subject-customization-tests"}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            raise PromptRefused(json.loads(error.read() or b"{}")) from None

    def wait_for(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The prompt's /history entry once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n" + self.log_tail())


class PromptRefused(RuntimeError):
    def __init__(self, answer: dict):
        self.answer = answer
        super().__init__("the server refused the prompt: " + json.dumps(answer)[:4000])


@dataclass
class LoadedWorkflow:
    """What the frontend made of one UI workflow file."""
    missing_types: list[str]
    widgets: dict[str, list[tuple[str, object]]]  # node id -> (widget name, value) as the frontend shows them
    prompt: dict  # graphToPrompt().output, `_meta` removed
    serialized_widgets: dict[str, list]  # node id -> widgets_values when the frontend saves the graph again
    errors: list[str] = field(default_factory=list)  # page errors and console errors while loading
    dialogs: list[str] = field(default_factory=list)  # texts of dialogs open after loading


class Frontend:
    """One headless Chromium page on the served frontend."""

    def __init__(self, url: str, *, viewport=(2000, 1150)):
        self.url, self.viewport = url, viewport
        self.startup_errors: list[str] = []
        self._errors: list[str] = []

    def __enter__(self) -> "Frontend":
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as error:
            raise BrowserUnavailable("playwright is not installed in this environment (requirements-dev.txt "
                                     "lists it; `make test` installs it)") from error
        executable = find_chromium()
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
        self.page.on("pageerror", lambda error: self._errors.append(f"page error: {error}"))
        self.page.on("console", lambda msg: msg.type == "error" and self._errors.append(
            f"console error: {msg.text} ({msg.location.get('url', '')})"))
        self.page.goto(self.url + "/")
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
        self.page.wait_for_timeout(1000)  # extensions finish registering after the graph exists
        self.startup_errors, self._errors = self._errors, []
        return self

    def __exit__(self, *exc) -> None:
        self._browser.close()
        self._playwright.stop()

    def load(self, ui_workflow: dict, name: str) -> LoadedWorkflow:
        self._errors = []
        self.page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                           [ui_workflow, name])
        self.page.wait_for_timeout(500)
        state = self.page.evaluate("""async () => {
            const app = window.app, LiteGraph = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
            const known = LiteGraph?.registered_node_types ?? {};
            const nodes = app.graph.nodes ?? app.graph._nodes;
            const prompt = (await app.graphToPrompt()).output;
            const saved = app.graph.serialize();
            return {
              missing: nodes.filter(n => !(n.type in known)).map(n => n.type),
              widgets: Object.fromEntries(nodes.map(n => [String(n.id),
                        (n.widgets ?? []).map(w => [w.name, w.value ?? null])])),
              prompt,
              saved: Object.fromEntries(saved.nodes.map(n => [String(n.id), n.widgets_values ?? []])),
              // text boxes are page elements over the canvas: what they show must be the widget's value
              shown_differently: nodes.flatMap(n => (n.widgets ?? [])
                  .filter(w => w.element && typeof w.element.value === 'string' && w.element.value !== String(w.value))
                  .map(w => `node ${n.id} ${w.name}: shows ${JSON.stringify(w.element.value)}, holds ${JSON.stringify(w.value)}`)),
              dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 400)),
            };
        }""")
        for node in state["prompt"].values():
            node.pop("_meta", None)
        return LoadedWorkflow(state["missing"], state["widgets"], state["prompt"], state["saved"],
                              list(self._errors) + state["shown_differently"], state["dialogs"])

    def screenshot(self, path: Path, *, scale: float = 0.8, max_size=(3200, 2400)) -> None:
        """The whole graph at a zoom where the frontend draws widget text (it drops text below about 0.6),
        with the text boxes, which are page elements over the canvas, included."""
        bounds = self.page.evaluate("""() => {
            const nodes = window.app.graph.nodes ?? window.app.graph._nodes;
            return [Math.min(...nodes.map(n => n.pos[0])), Math.min(...nodes.map(n => n.pos[1] - 30)),
                    Math.max(...nodes.map(n => n.pos[0] + n.size[0])), Math.max(...nodes.map(n => n.pos[1] + n.size[1]))];
        }""")
        pad = 30
        box = self.page.evaluate("() => { const r = window.app.canvas.canvas.getBoundingClientRect();"
                                 " return [r.left, r.top, window.innerWidth - r.width, window.innerHeight - r.height]; }")
        width = min(max_size[0], int((bounds[2] - bounds[0]) * scale) + 2 * pad)
        height = min(max_size[1], int((bounds[3] - bounds[1]) * scale) + 2 * pad)
        self.page.set_viewport_size({"width": width + int(box[2]), "height": height + int(box[3])})
        self.page.wait_for_timeout(300)
        self.page.evaluate("""([x0, y0, scale, pad]) => {
            const canvas = window.app.canvas;
            canvas.ds.scale = scale;
            canvas.ds.offset = [pad / scale - x0, pad / scale - y0];
            canvas.setDirty(true, true);
        }""", [bounds[0], bounds[1], scale, pad])
        self.page.wait_for_timeout(700)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip={"x": box[0], "y": box[1], "width": width, "height": height})
        self.page.set_viewport_size({"width": self.viewport[0], "height": self.viewport[1]})


def ui_and_api_files() -> list[tuple[Path, Path]]:
    return [(PACK_ROOT / "workflows" / "ui" / api.name, api)
            for api in sorted((PACK_ROOT / "workflows" / "api").glob("*.json"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Load every shipped workflow in ComfyUI's frontend and write "
                                                 "its screenshot (docs/workflows/) and template thumbnail "
                                                 "(example_workflows/NAME.jpg).")
    parser.add_argument("--base", type=Path, default=None, help="base directory for the server (default: temp)")
    args = parser.parse_args(argv)
    import tempfile

    from PIL import Image

    from .host import bootstrap

    bootstrap()  # the stand-in builders import ComfyUI

    files = ui_and_api_files()
    base = args.base or Path(tempfile.mkdtemp(prefix="sc_frontend_"))
    prepare_base_directory(base, [json.loads(api.read_text()) for _, api in files])
    with ComfyServer(base) as server, Frontend(server.url) as frontend:
        for ui_file, _ in files:
            frontend.load(json.loads(ui_file.read_text()), ui_file.stem)
            shot = PACK_ROOT / "docs" / "workflows" / f"{ui_file.stem}.png"
            frontend.screenshot(shot)
            with Image.open(shot) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((640, 400))
                thumb.save(PACK_ROOT / "example_workflows" / f"{ui_file.stem}.jpg", quality=85)
            print(f"wrote {shot.relative_to(PACK_ROOT)} and example_workflows/{ui_file.stem}.jpg")
    if args.base is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
