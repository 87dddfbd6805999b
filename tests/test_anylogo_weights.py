"""The AnyLogo weight file: round trip, and a clear refusal of every kind of wrong file."""
import pytest
import torch

from model_patches.anylogo_weights import (FORMAT_VERSION, check_fits_model, load_anylogo_weights,
                                           save_anylogo_weights)
from model_patches.image_context import ImageProjection
from model_patches.weight_files import WeightFileError, save_weights


def _projection(seed=0):
    torch.manual_seed(seed)
    return ImageProjection(1024, 768)


def _metadata(**overrides):
    return {"base_architecture": "sd15-inpainting", "image_layers": [6, 12, 18, 24], "image_resolution": 224,
            **overrides}


def test_round_trip_keeps_keys_values_and_metadata(tmp_path):
    unet = {"output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(640, 768)}
    projection = _projection()
    path = tmp_path / "w.safetensors"
    save_anylogo_weights(path, unet, projection, _metadata(config={"lr": 1e-5}))
    loaded = load_anylogo_weights(path)
    assert loaded.unet.keys() == unet.keys()
    assert torch.equal(loaded.unet[next(iter(unet))], next(iter(unet.values())))
    assert torch.equal(loaded.projection.proj.weight, projection.proj.weight)
    assert loaded.image_layers == [6, 12, 18, 24] and loaded.image_resolution == 224
    assert loaded.metadata["method"] == "anylogo" and loaded.metadata["format_version"] == str(FORMAT_VERSION)
    assert loaded.model_patches() == {"diffusion_model." + k: ("set", (loaded.unet[k],)) for k in unet}
    assert not list(tmp_path.glob("*.tmp")), "the atomic write left a temporary file"


def test_another_methods_file_is_refused(tmp_path):
    path = save_weights(tmp_path / "eq.safetensors", {"x": torch.zeros(1)}, {"method": "eqdiff",
                                                                            "format_version": "1"})
    with pytest.raises(WeightFileError, match="'eqdiff' file; expected 'anylogo'"):
        load_anylogo_weights(path)


def test_a_file_without_our_metadata_is_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(WeightFileError, match="without the pack's metadata"):
        load_anylogo_weights(path)


def test_a_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.safetensors"
    save_anylogo_weights(path, {}, _projection(), _metadata())
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    save_weights(path, tensors, {**_metadata(), "method": "anylogo", "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(WeightFileError, match="format version 2; this pack reads versions 1..1"):
        load_anylogo_weights(path)


def test_a_corrupt_or_missing_file_is_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_anylogo_weights(path, {}, _projection(), _metadata())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightFileError, match="cut.safetensors"):
        load_anylogo_weights(path)
    with pytest.raises(WeightFileError, match="not found"):
        load_anylogo_weights(tmp_path / "absent.safetensors")


def test_missing_projection_is_refused(tmp_path):
    path = save_weights(tmp_path / "np.safetensors", {"unet.a": torch.zeros(1)},
                        {"method": "anylogo", "format_version": "1", **_metadata()})
    with pytest.raises(WeightFileError, match="lacks 2 required tensors"):
        load_anylogo_weights(path)


@pytest.fixture(scope="module")
def models(comfy):
    load = comfy.CheckpointLoaderSimple().load_checkpoint
    return load("tiny_sd15.safetensors")[0], load("tiny_sd15_inpainting.safetensors")[0]


def test_weights_for_another_architecture_are_refused(tmp_path, models):
    plain, inpainting = models
    path = tmp_path / "w.safetensors"
    save_anylogo_weights(path, {}, _projection(), _metadata())
    weights = load_anylogo_weights(path)
    check_fits_model(weights, inpainting)
    with pytest.raises(WeightFileError, match="for sd15-inpainting models, but this MODEL is sd15"):
        check_fits_model(weights, plain)


def test_weights_for_another_unet_layout_are_refused(tmp_path, models):
    _, inpainting = models
    path = tmp_path / "w.safetensors"
    save_anylogo_weights(path, {"output_blocks.9.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
                                "input_blocks.1.1.proj_in.weight": torch.zeros(16, 16, 1, 1)},
                         _projection(), _metadata())
    with pytest.raises(WeightFileError, match="this model lacks, e.g. \\['output_blocks.9"):
        check_fits_model(load_anylogo_weights(path), inpainting)
    save_anylogo_weights(path, {"input_blocks.1.1.proj_in.weight": torch.zeros(16, 16, 1, 1)}, _projection(),
                         _metadata())
    with pytest.raises(WeightFileError, match="shape mismatches"):
        check_fits_model(load_anylogo_weights(path), inpainting)
