"""Frequency split (EqDiff Eq. 3/4): exact signed bands, the official magnitude recipe, cutoffs, the node."""
import math

import numpy as np
import pytest
import torch

from image_ops import frequency
from standalone.runner import WorkflowFailed, run_workflow

ATOL = 1e-5  # float32 FFT round trip on images of at most 512 px


def cosine(height, width, cycles_y, cycles_x, *, amplitude=0.3, mean=0.5, channels=3, batch=1):
    """mean + amplitude·cos(2π(ky·y/H + kx·x/W)): all its energy sits on the bins at offset ±(ky, kx)."""
    y = torch.arange(height, dtype=torch.float64).view(-1, 1)
    x = torch.arange(width, dtype=torch.float64).view(1, -1)
    wave = mean + amplitude * torch.cos(2 * math.pi * (cycles_y * y / height + cycles_x * x / width))
    return wave.expand(batch, channels, height, width).float().contiguous()


def official_reference(images01: np.ndarray, low_cutoff: int, high_cutoff: int):
    """EqDiff's official filtering written out with numpy: −1..1 pixels, channel mean, slices on the shifted
    spectrum, abs of the inverse; mapped back to 0..1 for comparison."""
    gray = (images01 * 2 - 1).mean(axis=1, keepdims=True).repeat(images01.shape[1], axis=1)
    shifted = np.fft.fftshift(np.fft.fft2(gray), axes=(-2, -1))
    rows, cols = gray.shape[-2:]
    crow, ccol = rows // 2, cols // 2
    low_mask = np.zeros((rows, cols))
    low_mask[crow - low_cutoff:crow + low_cutoff, ccol - low_cutoff:ccol + low_cutoff] = 1
    high_mask = np.zeros((rows, cols))
    high_mask[:crow - high_cutoff, :] = 1
    high_mask[crow + high_cutoff:, :] = 1
    high_mask[:, :ccol - high_cutoff] = 1
    high_mask[:, ccol + high_cutoff:] = 1
    bands = [np.abs(np.fft.ifft2(np.fft.ifftshift(shifted * m, axes=(-2, -1)))) for m in (low_mask, high_mask)]
    return [(b + 1) / 2 for b in bands]


# ---------------------------------------------------------------- signed split

def numpy_bands(images: np.ndarray, radius: float, window: str):
    """Each band on its own, with numpy: the centred spectrum (fftshift) times an explicit mask of the bins at
    offset (dy, dx) from (H // 2, W // 2) with sqrt(dy² + dx²) <= radius (circle) or max(|dy|, |dx|) <= radius
    (square), inverse transformed; the high band with the complementary mask — never as source − low."""
    rows, cols = images.shape[-2:]
    dy = np.arange(rows)[:, None] - rows // 2
    dx = np.arange(cols)[None, :] - cols // 2
    inside = (np.hypot(dy, dx) if window == "circle" else np.maximum(abs(dy), abs(dx))) <= radius
    shifted = np.fft.fftshift(np.fft.fft2(images.astype(np.float64)), axes=(-2, -1))
    return [np.real(np.fft.ifft2(np.fft.ifftshift(shifted * m, axes=(-2, -1)))) for m in (inside, ~inside)]


@pytest.mark.parametrize("window", frequency.WINDOWS)
@pytest.mark.parametrize("unit, cutoff", [("pixels", 7.0), ("fraction", 0.3)])
def test_signed_bands_each_equal_an_independent_fft_mask(window, unit, cutoff):
    """Each band against numpy's explicit-mask computation on a noise image (odd, non-square), and their sum."""
    images = torch.rand(2, 3, 37, 50)
    low, high = frequency.signed_split(images, cutoff, window=window, unit=unit)
    radius = cutoff if unit == "pixels" else cutoff * 37 / 2
    ref_low, ref_high = numpy_bands(images.numpy(), radius, window)
    assert np.abs(low.numpy() - ref_low).max() < ATOL and np.abs(high.numpy() - ref_high).max() < ATOL
    assert torch.allclose(low + high, images, atol=ATOL)
    assert high.abs().max() > 0.05  # the split did separate something from a noise image


@pytest.mark.parametrize("window", frequency.WINDOWS)
def test_signed_bands_of_a_sum_of_cosines_are_known_in_closed_form(window):
    """mean + cosines at offsets (3, 2) and (0, 6) [inside a radius-6.5 window either way], (5, 5) [inside the
    square only: max 5, hypot 7.07] and (9, 1) [outside both]: the low band is exactly the mean and the cosines
    inside, the high band exactly the others."""
    h, w = 36, 45
    waves = {k: cosine(h, w, *k, amplitude=0.1, mean=0.0) for k in [(3, 2), (0, 6), (5, 5), (9, 1)]}
    image = 0.5 + sum(waves.values())
    inside = [(3, 2), (0, 6)] + ([(5, 5)] if window == "square" else [])
    low, high = frequency.signed_split(image, 6.5, window=window)
    expected_low = 0.5 + sum(waves[k] for k in inside)
    expected_high = sum(v for k, v in waves.items() if k not in inside)
    assert (low - expected_low).abs().max() < ATOL and (high - expected_high).abs().max() < ATOL


def test_signed_grayscale_reconstructs_the_channel_mean_and_keeps_float64():
    images = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    low, high = frequency.signed_split(images, 4, grayscale=True)
    gray = images.mean(dim=1, keepdim=True).expand_as(images)
    assert low.dtype == torch.float64
    assert torch.allclose(low + high, gray, atol=1e-12)
    assert torch.equal(low[:, 0], low[:, 2])


def test_constant_image_is_all_low_band():
    images = torch.full((1, 3, 17, 30), 0.3)
    low, high = frequency.signed_split(images, 1, window="square")
    assert torch.allclose(low, images, atol=1e-6) and high.abs().max() < 1e-6


def test_smooth_cosine_inside_the_pass_band_goes_through_unchanged():
    images = cosine(48, 64, cycles_y=2, cycles_x=3)
    low, high = frequency.signed_split(images, 10)
    assert torch.allclose(low, images, atol=ATOL) and high.abs().max() < ATOL


def test_fine_cosine_goes_to_the_high_band():
    images = cosine(48, 64, cycles_y=0, cycles_x=20)
    low, high = frequency.signed_split(images, 10)
    assert torch.allclose(low, torch.full_like(low, 0.5), atol=ATOL)
    assert torch.allclose(high, images - 0.5, atol=ATOL)


@pytest.mark.parametrize("unit, cutoff", [("pixels", 8.0), ("fraction", 0.25)])  # 0.25 · 64/2 = 8 bins
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cutoff_boundary_is_inclusive_as_the_tooltip_says(unit, cutoff, axis):
    def split(cycles):
        ky, kx = (cycles, 0) if axis == "y" else (0, cycles)
        images = cosine(64, 96, ky, kx)
        return images, *frequency.signed_split(images, cutoff, window="circle", unit=unit)

    images, low, high = split(8)  # exactly on the cutoff: kept by the low-pass
    assert torch.allclose(low, images, atol=ATOL) and high.abs().max() < ATOL
    images, low, high = split(9)  # one bin beyond it
    assert torch.allclose(high, images - 0.5, atol=ATOL) and (low - 0.5).abs().max() < ATOL


def test_circle_and_square_windows_differ_on_the_diagonal():
    images = cosine(64, 64, cycles_y=6, cycles_x=6)  # offset (6, 6): 8.49 bins from the centre, max-norm 6
    low_circle, _ = frequency.signed_split(images, 8, window="circle")
    low_square, _ = frequency.signed_split(images, 8, window="square")
    assert torch.allclose(low_circle, torch.full_like(images, 0.5), atol=ATOL)
    assert torch.allclose(low_square, images, atol=ATOL)


def test_odd_non_square_batch_is_split_per_image():
    images = torch.rand(3, 3, 31, 45)
    images[1] = cosine(31, 45, 0, 5)[0]  # 5 cycles on an odd width still sits on one bin pair
    low, high = frequency.signed_split(images, 5, window="square")
    assert torch.allclose(low + high, images, atol=ATOL)
    assert torch.allclose(low[1], images[1], atol=ATOL)
    for i in range(3):
        one_low, _ = frequency.signed_split(images[i:i + 1], 5, window="square")
        assert torch.allclose(one_low, low[i:i + 1], atol=ATOL)
    _, high_six = frequency.signed_split(cosine(31, 45, 0, 6), 5, window="square")
    assert torch.allclose(high_six, cosine(31, 45, 0, 6) - 0.5, atol=ATOL)


# ---------------------------------------------------------------- magnitude / paper

def test_paper_cutoffs_are_the_official_ones_at_512_and_scale_with_the_shorter_side():
    assert frequency.paper_cutoffs(512, 512) == (50, 5)
    assert frequency.paper_cutoffs(1024, 1024) == (100, 10)
    assert frequency.paper_cutoffs(768, 1024) == (75, 8)  # 7.5 rounds half up
    assert frequency.paper_cutoffs(16, 16) == (2, 1)      # 1.56 -> 2; 0.16 -> at least one bin
    assert frequency.paper_cutoffs(24, 40) == (2, 1)


@pytest.mark.parametrize("height, width", [(16, 16), (24, 40), (15, 21), (512, 512)])
def test_paper_mode_matches_the_official_computation_written_with_numpy(height, width):
    images = torch.rand(2, 3, height, width)
    low_cutoff, high_cutoff = frequency.paper_cutoffs(height, width)
    expected_low, expected_high = official_reference(images.double().numpy(), low_cutoff, high_cutoff)
    low, high = frequency.paper_split(images)
    assert np.allclose(low.numpy(), expected_low, atol=ATOL)
    assert np.allclose(high.numpy(), expected_high, atol=ATOL)
    # the half-open window makes the result differ from a symmetric square: the asymmetry is real
    symmetric_low, _ = frequency.magnitude_split(images, low_cutoff, high_cutoff, window="square")
    assert (symmetric_low - low).abs().max() > 1e-3


def test_paper_mode_on_minus_one_to_one_pixels_is_the_same_computation():
    images = torch.rand(1, 3, 32, 32)
    low01, high01 = frequency.paper_split(images)
    low11, high11 = frequency.paper_split(images * 2 - 1, value_range=(-1.0, 1.0))
    assert torch.allclose(low11, low01 * 2 - 1, atol=ATOL) and torch.allclose(high11, high01 * 2 - 1, atol=ATOL)


def test_magnitude_bands_use_their_own_cutoffs_and_lose_the_sign():
    # On −1..1 pixels a cosine between the two cutoffs is in both bands, as |cos|; one below both only in low.
    between = cosine(32, 32, 0, 8, amplitude=0.4, mean=0.0)
    low, high = frequency.magnitude_split(between, 10, 4, value_range=(-1.0, 1.0), grayscale=False)
    assert torch.allclose(low, between.abs(), atol=ATOL) and torch.allclose(high, between.abs(), atol=ATOL)
    below = cosine(32, 32, 0, 2, amplitude=0.4, mean=0.0)
    low, high = frequency.magnitude_split(below, 10, 4, value_range=(-1.0, 1.0), grayscale=False)
    assert torch.allclose(low, below.abs(), atol=ATOL) and high.abs().max() < ATOL


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, message", [
    (lambda: frequency.signed_split(torch.rand(1, 3, 64, 96), 0), "greater than 0"),
    (lambda: frequency.signed_split(torch.rand(1, 3, 64, 96), 1.5, unit="fraction"), "at most 1"),
    (lambda: frequency.signed_split(torch.rand(1, 3, 64, 96), 49), r"larger than the spectrum of a 64x96 .*48"),
    (lambda: frequency.signed_split(torch.rand(1, 3, 0, 8), 1), "non-empty"),
    (lambda: frequency.signed_split(torch.rand(3, 8, 8), 1), r"\[B, C, H, W\].*\(3, 8, 8\)"),
    (lambda: frequency.signed_split(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 1), "floating-point"),
    (lambda: frequency.signed_split(torch.rand(1, 3, 8, 8), 1, window="hexagon"), "window must be one of"),
    (lambda: frequency.paper_split(torch.rand(1, 3, 8, 8), value_range=(1.0, 0.0)), "high > low"),
])
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(frequency.FrequencySplitError, match=message):
        call()


# ---------------------------------------------------------------- the node

def _node_inputs(mode, **overrides):
    return {"mode": mode, "window": "circle", "cutoff_unit": "fraction", "low_cutoff": 0.2,
            "high_cutoff": 0.02, "channels": "colour", **overrides}


def test_node_returns_exact_signed_bands_and_the_paper_bands(pack_nodes):
    node = pack_nodes["SC_FrequencySplit"]()
    images = torch.rand(2, 33, 48, 3)  # ComfyUI IMAGE: [B, H, W, C]
    low, high, preview = node.split(images, **_node_inputs("signed"))
    assert low.shape == images.shape
    assert torch.allclose(low + high, images, atol=ATOL)
    assert torch.equal(preview, (high + 0.5).clamp(0, 1))

    low, high, preview = node.split(images, **_node_inputs("paper (EqDiff official)", channels="colour"))
    expected_low, expected_high = frequency.paper_split(images.movedim(-1, 1))
    assert torch.allclose(low, expected_low.movedim(1, -1), atol=ATOL)
    assert torch.allclose(high, expected_high.movedim(1, -1), atol=ATOL)
    assert torch.equal(low[..., 0], low[..., 2])  # paper mode is grayscale whatever the widget says
    assert torch.equal(preview, high.clamp(0, 1))

    with pytest.raises(ValueError, match="mode must be one of"):
        node.split(images, **_node_inputs("wavelet"))


def _split_graph(mode, **overrides):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "two_badges.png"}},
        "2": {"class_type": "SC_FrequencySplit", "inputs": {"images": ["1", 0], **_node_inputs(mode, **overrides)}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "frequency_low"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }


def test_node_runs_headless_from_load_image_to_save_image(pack_nodes, output_dir):
    import folder_paths
    import nodes
    from PIL import Image

    from standalone.demo_assets import write_demo_inputs

    write_demo_inputs(folder_paths.get_input_directory())
    result = run_workflow(_split_graph("paper (EqDiff official)"))
    saved = result["outputs"]["3"]["images"]
    assert len(saved) == 1 and result["outputs"]["4"]["images"][0]["type"] == "temp"

    loaded = nodes.LoadImage().load_image("two_badges.png")[0]
    expected_low, _ = frequency.paper_split(loaded.movedim(-1, 1))
    expected = np.clip(255.0 * expected_low.movedim(1, -1)[0].numpy(), 0, 255).astype(np.uint8)
    written = np.asarray(Image.open(output_dir / saved[0]["subfolder"] / saved[0]["filename"]))
    assert written.shape == expected.shape  # (256, 384, 3)
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1  # SaveImage truncates to 8 bits


def test_node_reports_a_cutoff_beyond_the_spectrum_in_a_headless_run(comfy):
    import folder_paths

    from standalone.demo_assets import write_demo_inputs

    write_demo_inputs(folder_paths.get_input_directory())
    graph = _split_graph("signed", cutoff_unit="pixels", low_cutoff=500.0)
    with pytest.raises(WorkflowFailed, match="SC_FrequencySplit.*larger than the spectrum of a 256x384"):
        run_workflow(graph)
