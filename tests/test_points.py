"""Point → mask (P3S Eq. 1/2) without the encoder: point text, the similarity → mask stages, the preview.

The node with a CLIP model built to have known patch features, and the stock-loader graph, are in
test_points_node.py.
"""
import math

import numpy as np
import pytest
import torch

from image_ops.point_mask import (grid_to_pixels, keep_clicked_components, otsu_foreground, patch_of_point,
                                  points_to_mask, selection_score, similarity_to)
from image_ops.point_parsing import FRACTIONS, PIXELS, PointsError, batch_points, parse_points, to_pixels
from image_ops.point_preview import NEGATIVE_RGB, OUTSIDE_BRIGHTNESS, POSITIVE_RGB, TINT_ALPHA, TINT_RGB, draw_preview

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ('[{"x": 120, "y": 80}, {"x": 300.5, "y": 210}]', ((120, 80), (300.5, 210))),  # KJNodes Points Editor
    ('{"x": 7, "y": 9}', ((7, 9),)),
    ("[[120, 80], [300, 210]]", ((120, 80), (300, 210))),
    ("[120, 80]", ((120, 80),)),
    ("120,80; 300,210", ((120, 80), (300, 210))),
    ("120,80\n300,210\n", ((120, 80), (300, 210))),
    ("(120, 80)\n[300 210]; 1e2,.5", ((120, 80), (300, 210), (100, 0.5))),
])
def test_every_shared_format_parses_to_the_same_points(text, expected):
    spec = parse_points(text)
    assert not spec.per_image
    assert spec.for_batch(3, "positive") == [expected] * 3


@pytest.mark.parametrize("text", ["", "   \n", "[]", '""'])  # '""': KJNodes' negatives when none were placed
def test_empty_inputs_mean_no_point(text):
    assert parse_points(text, "negative").for_batch(2, "negative") == [(), ()]


@pytest.mark.parametrize("text", [
    '[[{"x": 1, "y": 2}], [{"x": 3, "y": 4}, {"x": 5, "y": 6}], []]',
    "[[[1, 2]], [[3, 4], [5, 6]], []]",
    "1,2 | 3,4; 5,6 |",
])
def test_per_image_lists_go_to_their_images(text):
    spec = parse_points(text)
    assert spec.per_image
    assert spec.for_batch(3, "positive") == [((1, 2),), ((3, 4), (5, 6)), ()]


def test_per_image_lists_must_match_the_batch():
    with pytest.raises(PointsError, match="positive points give 2 per-image lists, but the batch has 3 images"):
        parse_points("1,2 | 3,4").for_batch(3, "positive")


@pytest.mark.parametrize("text, message", [
    ('[{"x": 1, "y": 2}', "look like JSON but do not parse"),
    ("120;80", r"cannot read the positive point '120' in the list: expected 'x,y'"),
    ("1,2 | 3,x", r"cannot read the positive point '3,x' in image 2's list"),
    ('[{"x": 1}]', r'point 1 of the positive points is \{"x": 1\}: expected \{"x": number, "y": number\}'),
    ('[{"x": "1", "y": 2}]', "expected"),
    ("[[true, 2]]", r"point 1 of image 1 of the positive points is true: expected"),
    ("[[1, 2, 3]]", r"point 1 of image 1 of the positive points is 1: expected"),
    ("[1, NaN]", r"the point of the positive points has a non-finite coordinate \(1.0, nan\)"),
    ("1e999, 2", r"point '1e999, 2' of the positive points has a non-finite coordinate"),
    ("42", r"cannot read the positive point '42'"),
    ('{"x": 1, "y": 2, "z": [}', "do not parse"),
    ('"3"', r"cannot read the positive point '3'"),
])
def test_malformed_text_is_refused_with_what_was_expected(text, message):
    with pytest.raises(PointsError, match=message):
        parse_points(text)


def test_a_json_number_list_that_is_no_point_list_is_refused():
    with pytest.raises(PointsError, match="point 1 of the positive points is 5"):
        parse_points("[5, 6, 7]")


def test_points_outside_the_image_name_the_point_and_the_image_size():
    assert to_pixels(((0, 0), (99.5, 49)), 100, 50, PIXELS, "positive", 1) == ((0, 0), (99.5, 49))
    with pytest.raises(PointsError, match=r"negative point 2 \(x=100, y=10\) is outside image 3, which is "
                                          r"100x50 \(width x height\): x must lie in \[0, 100\)"):
        to_pixels(((5, 5), (100, 10)), 100, 50, PIXELS, "negative", 3)
    with pytest.raises(PointsError, match=r"positive point 1 \(x=-1, y=0\)"):
        to_pixels(((-1, 0),), 100, 50, PIXELS, "positive", 1)


def test_fractional_coordinates_scale_to_pixels_and_keep_the_far_edge_inside():
    assert to_pixels(((0.5, 0.25), (1.0, 1.0)), 200, 100, FRACTIONS, "positive", 1) == ((100, 25), (199.5, 99.5))
    with pytest.raises(PointsError, match=r"positive point 1 \(x=1.2, y=0.5\) is outside image 1: fractional"):
        to_pixels(((1.2, 0.5),), 200, 100, FRACTIONS, "positive", 1)


def test_every_image_needs_a_positive_point():
    with pytest.raises(PointsError, match="there is no positive point"):
        batch_points("", "1,1", 2, 64, 64)
    with pytest.raises(PointsError, match="image 2 has no positive point"):
        batch_points("[[[1, 1]], []]", "", 2, 64, 64)
    # negatives may be absent on some images
    assert batch_points("3,4", "[[], [[5, 6]]]", 2, 64, 64) == [(((3, 4),), ()), (((3, 4),), ((5, 6),))]


# ---------------------------------------------------------------- similarity → mask stages


def test_a_point_selects_the_patch_that_contains_it():
    # 336 px on a 16-patch grid: 21 px per patch
    assert patch_of_point(0, 0, 336, 336, 16, 16) == (0, 0)
    assert patch_of_point(20.99, 21.0, 336, 336, 16, 16) == (1, 0)
    assert patch_of_point(335.9, 335.9, 336, 336, 16, 16) == (15, 15)
    # non-square image squashed to the square grid: x and y scale independently
    assert patch_of_point(50, 50, 100, 400, 16, 16) == (2, 8)
    # 6.25 px per patch: pixel 6 spans [6, 7), its centre 6.5 lies in patch 1, and so does any point inside it
    assert patch_of_point(6.0, 0, 100, 100, 16, 16) == patch_of_point(6.9, 0, 100, 100, 16, 16) == (0, 1)


def test_similarity_is_the_clamped_max_cosine_to_the_clicked_patches():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(12, 5, generator=gen)
    cells = [(0, 1), (2, 3)]
    expected = torch.zeros(12)
    for i in range(12):
        cosines = [torch.dot(tokens[i], tokens[r * 4 + c]) / (tokens[i].norm() * tokens[r * 4 + c].norm())
                   for r, c in cells]
        expected[i] = max(0.0, max(cosines).item())
    assert torch.allclose(similarity_to(tokens, (3, 4), cells).flatten(), expected, atol=1e-6)
    assert torch.equal(similarity_to(tokens, (3, 4), []), torch.zeros(3, 4))
    score = selection_score(tokens, (3, 4), [(0, 1)], [(2, 3)])
    assert torch.allclose(score, similarity_to(tokens, (3, 4), [(0, 1)])
                          * (1 - similarity_to(tokens, (3, 4), [(2, 3)])), atol=1e-7)


def _reference_otsu(levels: np.ndarray) -> int:
    """Otsu from its definition: the threshold t maximising the between-class variance of {<=t} and {>t}."""
    values = levels.ravel().astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(255):
        low, high = values[values <= t], values[values > t]
        if len(low) == 0 or len(high) == 0:
            continue
        between = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if between > best + 1e-9:
            best, best_t = between, t
    return best_t


def test_otsu_runs_on_the_min_max_stretched_map_and_ignores_affine_changes():
    gen = np.random.default_rng(0)
    score = np.where(np.arange(64).reshape(8, 8) % 8 < 3, 0.62, 0.55) + gen.normal(0, 0.01, (8, 8))
    levels = np.round((score - score.min()) * 255 / (score.max() - score.min()))
    expected = levels > _reference_otsu(levels)
    assert np.array_equal(otsu_foreground(score, blur_sigma=0), expected)
    assert expected[:, :3].all() and not expected[:, 3:].any()
    assert np.array_equal(otsu_foreground(3.0 * score - 1.0, blur_sigma=0), expected)
    assert otsu_foreground(np.full((4, 4), 0.3), blur_sigma=1.0).all(), "a flat map has no two classes"


def _blob_tokens(grid, blobs):
    """Tokens on a grid: background along e0, each blob (rows, cols, feature vector) its own feature."""
    tokens = torch.zeros(grid[0], grid[1], 4)
    tokens[..., 0] = 1.0
    for rows, cols, feature in blobs:
        tokens[rows, cols] = torch.tensor(feature)
    return tokens.reshape(-1, 4)


def _box(grid, rows, cols):
    mask = np.zeros(grid, dtype=bool)
    mask[rows, cols] = True
    return mask


def _grid_mask(tokens, grid, positives, negatives=(), blur_sigma=0.0):
    """points_to_mask on a 10-px-per-patch image, read back on the grid; points given as (row, col) cells."""
    to_xy = lambda cells: tuple((c * 10 + 5, r * 10 + 5) for r, c in cells)  # noqa: E731
    mask = points_to_mask(tokens, grid, grid[0] * 10, grid[1] * 10, to_xy(positives), to_xy(negatives),
                          blur_sigma=blur_sigma)
    return mask[5::10, 5::10].numpy().astype(bool)


GRID = (12, 12)
A = (slice(2, 6), slice(1, 5))
B = (slice(6, 10), slice(7, 11))    # A's twin: identical features, not touching A
B_TOUCH = (slice(2, 6), slice(5, 9))  # a twin right beside A


def test_connected_component_rule_keeps_the_clicked_blob_and_drops_its_twin():
    tokens = _blob_tokens(GRID, [(*A, [0, 1, 0, 0]), (*B, [0, 1, 0, 0])])
    for sigma in (0.0, 1.0):
        mask = _grid_mask(tokens, GRID, [(3, 2)], blur_sigma=sigma)
        assert not (mask & _box(GRID, *B)).any(), f"twin kept at sigma {sigma}"
        assert mask[3:5, 2:4].all(), f"clicked blob lost at sigma {sigma}"
    assert np.array_equal(_grid_mask(tokens, GRID, [(3, 2)]), _box(GRID, *A))
    # positives combine by max: one click on each blob keeps both
    assert np.array_equal(_grid_mask(tokens, GRID, [(3, 2), (8, 9)]), _box(GRID, *A) | _box(GRID, *B))


def test_a_negative_point_removes_a_touching_look_alike():
    # B differs slightly: cos(A, B) = 1/sqrt(1.09) ~ 0.958
    tokens = _blob_tokens(GRID, [(*A, [0, 1, 0, 0]), (*B_TOUCH, [0, 1, 0.3, 0])])
    both = _box(GRID, *A) | _box(GRID, *B_TOUCH)
    assert np.array_equal(_grid_mask(tokens, GRID, [(3, 2)]), both), "touching twins form one component"
    score = selection_score(tokens, GRID, [(3, 2)], [(3, 7)])
    cos_ab = 1 / math.sqrt(1.09)
    assert score[3, 2].item() == pytest.approx(1 - cos_ab, abs=1e-6)      # A: like the positive, a bit unlike B
    assert score[3, 7].item() == pytest.approx(0.0, abs=1e-6)             # B: exactly the negative
    assert score[0, 0].item() == pytest.approx(0.0, abs=1e-6)             # background: unlike the positive
    assert np.array_equal(_grid_mask(tokens, GRID, [(3, 2)], [(3, 7)]), _box(GRID, *A))
    assert np.array_equal(_grid_mask(tokens, GRID, [(3, 2)], [(3, 7)], blur_sigma=0.5), _box(GRID, *A))


def test_clicked_patches_decide_for_themselves():
    # a one-patch subject blurred below Otsu's threshold by a large region of the same look
    tokens = _blob_tokens(GRID, [(slice(0, 1), slice(11, 12), [0, 1, 0, 0]),
                                 (slice(4, 12), slice(0, 8), [0, 1, 0, 0])])
    assert not otsu_foreground(selection_score(tokens, GRID, [(0, 11)], []).numpy(), 2.0)[0, 11]
    mask = _grid_mask(tokens, GRID, [(0, 11)], blur_sigma=2.0)
    assert mask[0, 11] and not mask[4:, :8].any()
    # a negative patch is background even when the rest of its region is kept
    kept = keep_clicked_components(np.ones(GRID, dtype=bool), [(0, 0)], [(5, 5)])
    assert kept.sum() == GRID[0] * GRID[1] - 1 and not kept[5, 5]


def test_a_positive_and_a_negative_in_one_patch_is_an_error():
    tokens = _blob_tokens(GRID, [])
    with pytest.raises(PointsError, match=r"positive point 1 \(x=12, y=13\) and negative point 2 \(x=18, y=19\) "
                                          r"fall in the same encoder patch \(row 1, column 1 of the 12x12 grid"):
        points_to_mask(tokens, GRID, 120, 120, ((12, 13),), ((100, 100), (18, 19)))


def test_pixels_take_their_patch_decision_and_dilation_grows_by_a_disc():
    grid_mask = np.zeros((16, 16), dtype=bool)
    grid_mask[3, 5] = grid_mask[10, 12] = True
    height, width = 70, 100  # not multiples of the grid
    mask = grid_to_pixels(grid_mask, height, width).numpy()
    for y in range(height):
        for x in range(width):
            cell = ((2 * y + 1) * 16 // (2 * height), (2 * x + 1) * 16 // (2 * width))  # patch of the centre
            assert mask[y, x] == grid_mask[cell] == grid_mask[patch_of_point(x + 0.7, y + 0.2, width, height,
                                                                              16, 16)]
    square = np.zeros((16, 16), dtype=bool)
    square[4:12, 4:12] = True
    plain = grid_to_pixels(square, 160, 160).numpy()
    grown = grid_to_pixels(square, 160, 160, dilation_px=5).numpy()
    rows, cols = np.nonzero(grown)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (35, 124, 35, 124)  # 40..119 grown by 5
    assert grown[36, 36] == 0 and grown[37, 37] == 1  # the corner is rounded: a disc, not a square
    assert (grown >= plain).all()


# ---------------------------------------------------------------- preview


def test_preview_dims_outside_tints_inside_and_draws_the_points():
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(60, 80)
    mask[:, :40] = 1
    out = draw_preview(image, mask, positives=((10, 30),), negatives=((70, 30),))
    assert out.shape == image.shape
    assert torch.allclose(out[:, 30, 10], torch.tensor(POSITIVE_RGB))
    assert torch.allclose(out[:, 30, 70], torch.tensor(NEGATIVE_RGB))
    tint = torch.tensor(TINT_RGB).view(3, 1)
    inside = (1 - TINT_ALPHA) * image[:, 5, 20:30] + TINT_ALPHA * tint
    assert torch.allclose(out[:, 5, 20:30], inside, atol=1e-6)
    assert torch.allclose(out[:, 5, 50:60], OUTSIDE_BRIGHTNESS * image[:, 5, 50:60], atol=1e-6)
