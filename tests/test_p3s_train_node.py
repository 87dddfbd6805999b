"""P3S Train Subject: the trainer inside ComfyUI (under inference_mode, as the executor runs nodes), writing into
models/p3s; Cancel stops it cleanly; the file it writes loads in P3S Loader."""
import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def p3s_folder(comfy, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("p3s_trained")
    folder_paths.add_model_folder_path("p3s", str(folder), is_default=True)
    return folder


def photo():
    image = torch.full((1, 48, 64, 3), 0.2)
    image[:, 12:36, 6:26] = torch.tensor([0.9, 0.1, 0.1])
    image[:, 12:36, 38:58] = torch.tensor([0.9, 0.15, 0.1])
    return image


def work_folders():
    import folder_paths

    return set(Path(folder_paths.get_temp_directory()).glob("p3s_train_*"))


def run(comfy, **overrides):
    args = dict(ckpt_name="tiny_sd15.safetensors", clip_vision_name="random_clip_vit_l.safetensors", image=photo(),
                positive_points="16,24", negative_points="48,24", class_word="toy", identifier="sks",
                name="trained_subject", epochs=2, learning_rate=1e-3, resolution=64, seed=0)
    args.update(overrides)
    node = comfy.NODE_CLASS_MAPPINGS["SC_P3STrainSubject"]()
    with torch.inference_mode():  # how ComfyUI's executor calls every node
        return node.train(**args)


def test_trains_inside_comfyui_and_writes_a_loadable_file(comfy, p3s_folder, capsys):
    before = work_folders()
    out = run(comfy)
    name, prompt = out["result"]
    assert name == "trained_subject.safetensors" and prompt == "a photo of sks toy"
    weights, loader_prompt = comfy.NODE_CLASS_MAPPINGS["SC_P3SLoader"]().load(name)
    assert weights.metadata["trained_steps"] == "2" and loader_prompt == prompt
    assert json.loads(weights.metadata["negative_points"]) == [[48.0, 24.0]]
    assert weights.metadata["negatives_removal"] == "opencv-telea"
    assert "P3S Train Subject: step 2/2 loss" in capsys.readouterr().err
    assert not work_folders() - before  # the run's work folder is gone (others may come and go)


def test_cancel_stops_before_the_next_step_and_writes_nothing(comfy, p3s_folder):
    import comfy.model_management as model_management  # "as": the fixture is called comfy too
    import comfy.utils as comfy_utils

    before, seen = work_folders(), []

    def hook(value, total, preview, node_id=None):  # what the server's hook does on Cancel
        seen.append(value)
        if value >= 1:
            raise model_management.InterruptProcessingException()

    previous = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            run(comfy, name="cancelled", epochs=5)
    finally:
        comfy_utils.set_progress_bar_global_hook(previous)
    assert seen[-1] == 1  # stopped at the start of the second step
    assert not (p3s_folder / "cancelled.safetensors").exists()
    assert not list(p3s_folder.glob(".cancelled*"))
    assert not work_folders() - before
