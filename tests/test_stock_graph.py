"""Tiny SD1.5 checkpoints load through the stock loader and run a stock text-to-image graph headless."""
import pytest

from standalone.runner import WorkflowFailed, WorkflowInvalid, run_workflow

TXT2IMG = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red logo on a white mug"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                             "latent_image": ["4", 0], "seed": 7, "steps": 2, "cfg": 5.0,
                                             "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "stock_txt2img"}},
}


@pytest.mark.parametrize("name, in_channels", [("tiny_sd15.safetensors", 4),
                                               ("tiny_sd15_inpainting.safetensors", 9)])
def test_stock_loader_detects_tiny_checkpoints_as_sd15(comfy, name, in_channels):
    from comfy.supported_models import SD15

    model, clip, vae = comfy.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(name)[:3]
    assert type(model.model.model_config) is SD15
    unet = model.model.diffusion_model
    assert unet.input_blocks[0][0].in_channels == in_channels
    assert unet.model_channels == 320 and clip is not None and vae is not None


def test_stock_txt2img_graph_runs_headless_and_writes_an_image(comfy, output_dir):
    before = set(output_dir.glob("stock_txt2img*.png"))
    result = run_workflow(TXT2IMG)
    images = result["outputs"]["7"]["images"]
    assert len(images) == 1
    written = set(output_dir.glob("stock_txt2img*.png")) - before
    assert [p.name for p in written] == [images[0]["filename"]]
    from PIL import Image

    assert Image.open(next(iter(written))).size == (64, 64)


def test_runner_reports_validation_errors_clearly(comfy):
    broken = {**TXT2IMG, "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.safetensors"}}}
    with pytest.raises(WorkflowInvalid, match="absent.safetensors"):
        run_workflow(broken)


def test_runner_reports_node_failures_with_the_node(comfy):
    bad_size = {**TXT2IMG, "4": {"class_type": "EmptyLatentImage",
                                 "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 0]}}}
    with pytest.raises((WorkflowFailed, WorkflowInvalid), match="6|VAE"):
        run_workflow(bad_size)
