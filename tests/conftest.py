"""Shared fixtures: a real ComfyUI host with the pack loaded by ComfyUI's own loader, and tiny models.

The host is found by standalone.host (COMFYUI_PATH, else the ComfyUI around the pack). Heavy artefacts (tiny
checkpoints, full-layout vision files) are built once per test session into a cache folder keyed by the
builder version, so a second session on the same machine reuses them.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_ROOT))  # behind ComfyUI, see standalone/host.py

from standalone.host import bootstrap  # noqa: E402

bootstrap()

import pytest  # noqa: E402
import torch  # noqa: E402

from standalone import tiny_models  # noqa: E402


class _PackRootIsADirectoryNotAPackage:
    """Collect the pack root as a plain directory, whatever the folder is called.

    The root __init__.py is ComfyUI's entry point to the pack (relative imports, loaded by ComfyUI's custom-node
    loader). pytest would import it as a package __init__ while collecting, and where the folder name is not a
    Python identifier (`comfyui-subject-customization`, the name users clone into) it imports it as a top-level
    module, which fails. A registered plugin rather than a conftest hook: conftest hooks only see paths below
    tests/, and the pack root is above it. Runs whatever the working directory is.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == PACK_ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    config.pluginmanager.register(_PackRootIsADirectoryNotAPackage(), "subject-customization-pack-root")


@pytest.fixture(scope="session")
def tiny_cache_dir() -> Path:
    path = tiny_models.default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def model_dirs(tiny_cache_dir, tmp_path_factory):
    """A models layout holding the tiny weights, registered with folder_paths like extra_model_paths.yaml."""
    checkpoints = tiny_cache_dir / "checkpoints"
    tiny_models.build_sd15_checkpoint(checkpoints / "tiny_sd15.safetensors")
    tiny_models.build_sd15_checkpoint(checkpoints / "tiny_sd15_inpainting.safetensors", inpainting=True)
    return {"checkpoints": checkpoints}


@pytest.fixture(scope="session")
def clip_vision_dir(tiny_cache_dir):
    """Full-layout CLIP ViT-L/14 and DINOv2-large files with random weights, for the stock CLIPVisionLoader."""
    folder = tiny_cache_dir / "clip_vision"
    tiny_models.build_full_layout_vision_file(folder / "random_clip_vit_l.safetensors", "clip_vit_l")
    tiny_models.build_full_layout_vision_file(folder / "random_dinov2_large.safetensors", "dinov2_large")
    return folder


@pytest.fixture(scope="session")
def comfy(model_dirs, clip_vision_dir, tmp_path_factory):
    """ComfyUI's `nodes` module, with the built-in extra nodes and this pack loaded by ComfyUI's own loader."""
    from standalone.runner import init_comfyui

    out = tmp_path_factory.mktemp("comfy_output")
    inp = tmp_path_factory.mktemp("comfy_input")
    return init_comfyui(PACK_ROOT, output_dir=out, input_dir=inp,
                        extra_model_dirs={**model_dirs, "clip_vision": clip_vision_dir})


@pytest.fixture(scope="session")
def pack_nodes(comfy):
    """NODE_CLASS_MAPPINGS restricted to the nodes this pack registered."""
    import nodes as comfy_nodes

    return {name: cls for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", "").endswith("." + PACK_ROOT.name)}


@pytest.fixture(scope="session")
def output_dir(comfy):
    import folder_paths

    return Path(folder_paths.get_output_directory())


@pytest.fixture
def tiny_clip_vision():
    return tiny_models.tiny_clip_vision(seed=0)


@pytest.fixture
def tiny_dinov2():
    return tiny_models.tiny_dinov2(seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def pack_module(comfy):
    """The pack's package as ComfyUI's loader imported it (its module name is the pack path)."""
    return sys.modules[str(PACK_ROOT).replace(".", "_x_")]


# ---- trainers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def finetune_manifest(tmp_path_factory):
    """Four 64x64 images (a red or blue square on a gradient, placed by a seeded draw) with captions, and
    their manifest."""
    import numpy as np
    from PIL import Image

    from train.prepare_manifest import build_rows, write_manifest
    from train.finetune import FinetuneMethod

    folder = tmp_path_factory.mktemp("finetune_data")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    # two captions only: the full CLIP-L text encoder takes seconds per caption on a CPU
    for i, colour in enumerate(("red", "blue", "red", "blue")):
        image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1)
        y, x = rng.integers(8, 40, size=2)
        image[y:y + 20, x:x + 20] = {"red": (230, 20, 20), "blue": (30, 40, 220)}[colour]
        Image.fromarray(image.astype(np.uint8)).save(folder / f"square_{i}.png")
        (folder / f"square_{i}.txt").write_text(f"a {colour} square")
    rows, skipped = build_rows(folder, FinetuneMethod.folder_layout)
    assert len(rows) == 4 and not skipped
    return write_manifest(rows, folder / "manifest.jsonl")


@pytest.fixture(scope="session")
def finetune_config(model_dirs, finetune_manifest):
    """Write a tiny CPU finetune config (64 px, fp32 export, no progress bar) with overrides; returns its path."""
    import yaml

    def write(path, **overrides):
        config = {"base_checkpoint": str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"),
                  "manifest": str(finetune_manifest), "resolution": 64, "batch_size": 2, "learning_rate": 1e-4,
                  "export_dtype": "fp32", "progress": False, **overrides}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture(scope="session")
def trainer_env():
    """Environment of a trainer subprocess, run with cwd = the pack root like a user would."""
    from standalone.host import find_comfyui

    return {**os.environ, "COMFYUI_PATH": str(find_comfyui()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class TrainerProcess:
    """Runs a trainer the way a user does: its own process, cwd = the pack root, plain or under torchrun."""

    def __init__(self, env: dict):
        self.env = env
        self.torchrun = str(Path(sys.executable).parent / "torchrun")

    def run(self, args: list, check: bool = True) -> subprocess.CompletedProcess:
        """`python ARGS` (e.g. ["-m", "train.finetune", ...]); with check, a failure shows the trainer's stderr."""
        return self._run([sys.executable, *map(str, args)], check)

    def run_torchrun(self, nproc: int, args: list, check: bool = True) -> subprocess.CompletedProcess:
        """`torchrun --nproc_per_node=NPROC ARGS` on a free port, so parallel test runs do not collide."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self._run([self.torchrun, f"--nproc_per_node={nproc}", f"--master_port={port}", *map(str, args)],
                         check)

    def kill_when_written(self, args: list, path: Path, wait_s: float = 600) -> None:
        """Start `python ARGS`, SIGKILL it the moment PATH exists (a checkpoint), and check it was killed, not done.

        SIGKILL rather than SIGTERM: a crash or an out-of-memory kill gives the trainer no chance to clean up.
        ``wait_s`` bounds the wait for PATH (a loaded shared machine can take minutes to start a trainer)."""
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=PACK_ROOT, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + wait_s
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        written = path.exists()
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill:\n{stderr[-3000:]}"
        assert written, f"{path.name} was not written within {wait_s:.0f} s; killed anyway:\n{stderr[-3000:]}"

    def _run(self, cmd: list, check: bool) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=PACK_ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        if check:
            assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-4000:]}"
        return result


@pytest.fixture(scope="session")
def trainer(trainer_env) -> TrainerProcess:
    return TrainerProcess(trainer_env)


@pytest.fixture(scope="session")
def dinov2_files(tiny_cache_dir):
    return tiny_models.build_tiny_dinov2_files(tiny_cache_dir / "dinov2")


@pytest.fixture(scope="session")
def logo_manifest(tmp_path_factory):
    """Four logo-in-scene pairs (32 px scenes, 16 px regions) from bundled material, and their manifest."""
    from standalone import logo_scenes
    from train.prepare_manifest import cli

    folder = tmp_path_factory.mktemp("anylogo_data")
    pairs = logo_scenes.make_pairs(4, scene_size=32, region=16, subjects=range(0, 4), seed=2)
    logo_scenes.write_pairs(folder, pairs, scene_size=32, subject_size=64)
    assert cli([str(folder), "--out", str(folder / "manifest.jsonl"), "--method", "anylogo"]) == 0
    return folder / "manifest.jsonl"


@pytest.fixture(scope="session")
def anylogo_config(model_dirs, logo_manifest, dinov2_files):
    """Write a tiny CPU AnyLogo trainer config (32 px scenes, tiny DINOv2, fp32 export) with overrides."""
    import yaml

    def write(path, **overrides):
        weights, config = dinov2_files
        values = {"base_checkpoint": str(model_dirs["checkpoints"] / "tiny_sd15_inpainting.safetensors"),
                  "manifest": str(logo_manifest), "image_encoder": str(weights), "image_encoder_config": str(config),
                  "resolution": 32, "subject_size": 64, "batch_size": 2, "learning_rate": 1e-3,
                  "train_layers": "attention", "zoom_in": False, "augment_subject": False, "export_dtype": "fp32",
                  "progress": False, "condition_dropout": 0.25, **overrides}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values))
        return path

    return write


class AnyLogoKit:
    """The tiny SD1.5-inpainting model with helpers to apply AnyLogo through its node and sample a region."""

    steps = 3

    def __init__(self, nodes):
        self.nodes = nodes
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(
            "tiny_sd15_inpainting.safetensors")[:3]
        self.subject = torch.ones(1, 40, 72, 3)
        self.subject[:, 10:30, 20:50] = torch.tensor([0.1, 0.2, 0.8])

    def text(self, prompt: str):
        return self.nodes.CLIPTextEncode().encode(self.clip, prompt)[0]

    def apply(self, model=None, subject=None, **kwargs):
        args = dict(positions="decoder", threshold=1.0, strength=1.0, start_percent=0.0, end_percent=1.0, seed=0,
                    subject_size=64)
        args.update(kwargs)
        node = self.nodes.NODE_CLASS_MAPPINGS["SC_AnyLogoApply"]()
        return node.apply(self.model if model is None else model, self.vae,
                          self.subject if subject is None else subject, **args)[0]

    def sample(self, model, positive="a logo", negative="", seed=1, control=None, steps=None):
        """Region insertion on a flat 64x64 scene: InpaintModelConditioning (noise mask on) + KSampler."""
        scene = torch.full((1, 64, 64, 3), 0.6)
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:48, 16:48] = 1
        pos, neg = self.text(positive), self.text(negative)
        if control is not None:
            pos, neg = control(pos, neg)
        pos, neg, latent = self.nodes.InpaintModelConditioning().encode(pos, neg, scene, self.vae, mask, True)
        return self.nodes.common_ksampler(model, seed, steps or self.steps, 5.0, "euler", "normal", pos, neg,
                                          latent)[0]["samples"]

    def subject_passes(self, model, sample=None, **kwargs):
        """(sigma, UNet input) of every UNet call in extraction status (AnyLogo's subject pass) during one
        sampling (``sample(model)``, default this kit's region insertion), and the sampling's output."""
        from model_patches.recycling import STATUS_KEY
        from model_patches.unet_layout import diffusion_model_of

        seen = []

        def hook(module, args, kw):
            options = kw.get("transformer_options", {})
            # by name: the nodes run the pack as ComfyUI's loader imported it, a second copy of its modules
            if type(options.get(STATUS_KEY)).__name__ == "Extraction":
                seen.append((float(options["sigmas"].flatten()[0]), args[0].detach().clone()))

        handle = diffusion_model_of(model).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = (sample or (lambda m: self.sample(m, **kwargs)))(model)
        finally:
            handle.remove()
        return seen, out

    @staticmethod
    def assert_scene_outside(out, scene_latent, base):
        """Every latent cell outside the region (the 8x8 pixel blocks holding no pixel of the mask 16:48) equals
        the encoded scene up to the float32 round trip of process_latent_in/out (x 0.18215, then / 0.18215: a few
        ulp of the latent's scale, measured 1 ulp; one cell the sampler updated differs by orders more); the region
        itself changed against ``base``."""
        outside = torch.ones(out.shape[-2:], dtype=torch.bool)
        outside[2:6, 2:6] = False
        got, want = out[..., outside], scene_latent.detach()[..., outside]
        torch.testing.assert_close(got, want, rtol=0, atol=4 * 2 ** -23 * float(want.abs().max()))
        assert (out[..., ~outside] - base[..., ~outside]).abs().max() > 1e-3


@pytest.fixture(scope="session")
def anylogo_kit(comfy):
    return AnyLogoKit(comfy)
