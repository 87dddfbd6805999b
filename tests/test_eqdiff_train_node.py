"""EqDiff Train Subject inside ComfyUI: trains under the executor's inference_mode, installs the three files
into the model folders, reports progress, and stops cleanly on ComfyUI's interrupt."""
from __future__ import annotations

import pytest
import torch


def photos():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    images, masks = [], []
    for cy, cx, bg in ((30, 30, 0.2), (24, 38, 0.8)):
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 14 ** 2
        image = torch.full((64, 64, 3), bg)
        image[disc] = torch.tensor([0.9, 0.1, 0.1])
        images.append(image)
        masks.append(disc.float())
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("eqdiff_node_models")
    for kind in ("eqdiff", "embeddings", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    return root


def call(comfy, name, **kwargs):
    images, masks = photos()
    args = dict(ckpt_name="tiny_sd15.safetensors", images=images, class_word="cat", name=name, steps=2,
                learning_rate=1e-3, resolution=64, num_class_images=1, seed=0, masks=masks, class_image_steps=1)
    args.update(kwargs)
    node = comfy.NODE_CLASS_MAPPINGS["SC_EqDiffTrainSubject"]()
    return node.train(**args)


def test_training_under_inference_mode_installs_three_loadable_files(comfy, folders):
    import comfy.utils as cu

    progress = []
    cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            out = call(comfy, "node_disc")
    finally:
        cu.set_progress_bar_global_hook(None)
    assert out["result"] == ("node_disc.safetensors", "node_disc", "node_disc_kv.safetensors")
    assert progress == [(1, 2), (2, 2)]
    names = {p.relative_to(folders).as_posix() for p in folders.rglob("*.safetensors")}
    assert {"eqdiff/node_disc.safetensors", "embeddings/node_disc.safetensors", "embeddings/node_disc_low.safetensors",
            "embeddings/node_disc_high.safetensors", "loras/node_disc_kv.safetensors"} <= names
    weights = comfy.NODE_CLASS_MAPPINGS["SC_EqDiffLoader"]().load("node_disc.safetensors")[0]
    assert weights.metadata["embedding"] == "node_disc" and weights.metadata["trained_steps"] == "2"
    with pytest.raises(ValueError, match="exists; choose another name or turn overwrite on"):
        call(comfy, "node_disc")


def test_the_node_runs_where_comfyuis_temp_folder_does_not_exist_yet(comfy, folders, tmp_path):
    """A server removes its temp folder at start-up and recreates it only when a preview is saved: the node makes
    its own working folder there anyway (measured before the fix: FileNotFoundError on a fresh ComfyUI)."""
    import folder_paths

    before = folder_paths.get_temp_directory()
    missing = tmp_path / "not_yet" / "temp"
    folder_paths.set_temp_directory(str(missing))
    try:
        with torch.inference_mode(), pytest.raises(ValueError, match="tokens in CLIP's tokenizer"):
            call(comfy, "node_no_temp", placeholder="qwertyzxcv")  # several tokens: the trainer's first check
        assert missing.is_dir() and not any(missing.iterdir())  # made, and the run's folder removed again
    finally:
        folder_paths.set_temp_directory(before)


def test_an_interrupt_mid_run_writes_nothing_and_leaves_comfyui_usable(comfy, folders):
    import comfy.model_management as mm
    import comfy.utils as cu

    def hook(value, total, preview, node_id=None):
        if value == 1:
            mm.interrupt_current_processing(True)  # what the UI's Cancel does

    before = sorted(p.name for p in folders.rglob("*"))
    cu.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            call(comfy, "interrupted", steps=3)
    finally:
        cu.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert sorted(p.name for p in folders.rglob("*")) == before  # no file, no temporary left behind
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    model = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[0]
    clip = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[1]
    pos = comfy.CLIPTextEncode().encode(clip, "a cat")[0]
    out = comfy.common_ksampler(model, 0, 1, 1.0, "euler", "normal", pos, pos, {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out[0]["samples"]).all()
