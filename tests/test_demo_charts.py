"""The app's PIL figures (`hones_core.demo.charts`): the pixels land where the values say.

Expected pixel positions are computed here from the chart's frame and data limits with the
plain linear map (x: left..right, y: bottom..top), and expected colours from matplotlib's
colormaps directly, so a chart that draws a value in the wrong place or colour fails.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from hones_core.demo import charts

BLUE, ORANGE, RED = charts.BASE_COLOUR, charts.STEERED_COLOUR, charts.CURRENT_COLOUR


def pixel(chart: charts.Chart, x: float, y: float) -> tuple[int, int]:
    """Image pixel of data point (x, y), by hand from frame and limits."""
    left, top, right, bottom = chart.frame
    (x0, x1), (y0, y1) = chart.xlim, chart.ylim
    return (round(left + (x - x0) / (x1 - x0) * (right - left)),
            round(bottom - (y - y0) / (y1 - y0) * (bottom - top)))


def colour_at(chart: charts.Chart, x: float, y: float) -> np.ndarray:
    return np.asarray(chart.image.getpixel(pixel(chart, x, y)), dtype=int)


def close(colour, expected, tol: int = 12) -> bool:
    return bool(np.abs(np.asarray(colour, dtype=int) - np.asarray(expected, dtype=int)).max() <= tol)


def cmap_rgb(name: str, fraction: float) -> np.ndarray:
    return np.round(np.asarray(colormaps[name](fraction)[:3]) * 255).astype(int)


def test_contributions_bars_end_at_their_values():
    base, steered = [0.8, -0.5, 0.3], [-0.2, 1.2, 0.3]
    chart = charts.contributions(["L0·n1", "L1·n2", "L3·n4"], base, steered, title_hint="the gold answer")
    assert chart.image.mode == "RGB" and chart.image.size == (540, 270)
    assert chart.ylim == (2.5, -0.5) and chart.xlim[0] < -0.5 and chart.xlim[1] > 1.2    # first row on top
    for row, (b, s) in enumerate(zip(base, steered)):
        for value, offset, colour in ((b, -0.2, BLUE), (s, 0.2, ORANGE)):
            assert close(colour_at(chart, 0.6 * value, row + offset), colour)      # inside the bar
            span = chart.xlim[1] - chart.xlim[0]
            beyond = value + np.sign(value) * 0.03 * span                           # past its end: background
            assert not close(colour_at(chart, beyond, row + offset), colour, tol=60)
    assert "3 top selected neurons" in chart.caption


def test_layer_sums_markers_sit_on_the_values():
    base, steered = np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.5, 0.5, -0.5, -2.0])
    chart = charts.layer_sums(torch.tensor(base), steered)
    for layer in range(4):
        assert close(colour_at(chart, layer, base[layer]), BLUE, tol=30)
        assert close(colour_at(chart, layer, steered[layer]), ORANGE, tol=30)
    # between two markers, half-way up the line segment, the line colour too (not only markers)
    assert close(colour_at(chart, 0.5, (base[0] + base[1]) / 2), BLUE, tol=40)


def test_layer_distribution_draws_each_tasks_fractions():
    selections = {"vqa": {0: [1, 2, 3], 2: [5]}, "ocr": {1: [7, 8]}}
    chart = charts.layer_distribution(selections, 3)
    assert chart.ylim[0] == 0.0 and chart.ylim[1] >= 1.0 and chart.xlim == (-0.5, 2.5)
    for layer, fraction in ((0, 0.75), (2, 0.25)):     # (1, 0.0) sits on the frame's bottom edge
        assert close(colour_at(chart, layer, fraction), charts.PALETTE[0], tol=30)
    assert close(colour_at(chart, 1, 1.0), charts.PALETTE[1], tol=30)        # ocr: all in layer 1


def test_head_heatmap_cells_take_the_symmetric_red_blue_colour():
    scores = np.array([[0.5, -1.0, 0.0], [2.0, 0.25, -2.0]])      # [layers, heads], max |s| = 2
    chart = charts.head_heatmap(scores, [(1, 0), (1, 0)], task="vqa")
    assert chart.xlim == (-0.5, 2.5) and chart.ylim == (-0.5, 1.5)          # layer 0 at the bottom
    for layer in range(2):
        for head in range(3):
            expected = cmap_rgb("RdBu_r", (scores[layer, head] + 2.0) / 4.0)
            assert close(colour_at(chart, head, layer), expected, tol=3), (layer, head)
    # the top head (layer 1, head 0) is boxed in black; its unboxed neighbour's edge is not black
    x_boxed, edge = pixel(chart, 0.0, 1.5)
    x_plain, _ = pixel(chart, 2.0, 1.5)
    assert close(chart.image.getpixel((x_boxed, edge + 1)), (0, 0, 0), tol=40)
    assert close(chart.image.getpixel((x_plain, edge + 1)), cmap_rgb("RdBu_r", (-2.0 + 2.0) / 4.0), tol=3)
    assert "1 heads" in chart.caption


def test_overlap_matrix_cells_and_annotations():
    values = np.array([[1.0, 0.25], [0.25, 0.8]])
    chart = charts.overlap_matrix(["vqa", "ocr"], values)
    assert chart.ylim == (1.5, -0.5)                                          # row 0 on top
    for i in range(2):
        for j in range(2):
            # a cell's corner area shows its colour; its centre holds the annotation
            assert close(colour_at(chart, j - 0.4, i - 0.4), cmap_rgb("viridis", values[i, j]), tol=3)
    # the dark (0.25) cell's text is white, the light (1.0) cell's black: look for such pixels at its centre
    left, top = pixel(chart, 0.8, -0.1)
    right, bottom = pixel(chart, 1.2, 0.1)
    dark = np.asarray(chart.image.crop((left, top, right, bottom)), dtype=int)
    assert (dark.min(-1) > 200).any()
    left, top = pixel(chart, -0.2, -0.1)
    right, bottom = pixel(chart, 0.2, 0.1)
    light = np.asarray(chart.image.crop((left, top, right, bottom)), dtype=int)
    assert (light.max(-1) < 60).any()


def test_strength_sweep_marks_factor_one_and_the_current_factor():
    factors, values = [2.0, 0.0, 1.0], [-3.0, -1.0, -2.0]                  # drawn sorted by factor
    chart = charts.strength_sweep(factors, values, current=0.5, ylabel="gold answer log-prob")
    for f, v in zip(factors, values):
        assert close(colour_at(chart, f, v), BLUE, tol=30)
    assert close(colour_at(chart, 0.5, -1.5), RED, tol=40)                  # the star on the line at ×0.5
    x, _ = pixel(chart, 1.0, 0.0)                    # the dashed grey line at ×1: grey dashes, white gaps
    _, top, _, bottom = chart.frame
    strip = np.asarray(chart.image.crop((x - 1, top + 2, x + 2, bottom - 2)), dtype=int).min(axis=1)   # [rows, 3]
    grey = (strip.max(-1) - strip.min(-1) < 12) & (strip.max(-1) < 200)
    white = strip.min(-1) > 215          # the gaps show the background (or the light grid line under it)
    assert grey.sum() > 0.3 * len(strip) and white.sum() > 0.2 * len(strip)
    assert "×0.5" in chart.caption and "\n" not in chart.caption


@pytest.mark.parametrize("make, match", [
    (lambda: charts.contributions(["a"], [1.0, 2.0], [1.0, 2.0]), "labels"),
    (lambda: charts.contributions(["a"], [np.nan], [1.0]), "base"),
    (lambda: charts.layer_sums([1.0, 2.0], [1.0]), "steered"),
    (lambda: charts.head_heatmap(np.zeros((2, 3)), [(2, 0)], task="vqa"), "top_heads"),
    (lambda: charts.head_heatmap(np.zeros(3), [], task="vqa"), "head_scores"),
    (lambda: charts.overlap_matrix(["a", "b"], np.full((2, 2), 1.5)), "jaccard"),
    (lambda: charts.layer_distribution({"vqa": {3: [1]}}, 3), "selections"),
    (lambda: charts.layer_distribution({"vqa": {0: [1]}}, 0), "num_layers"),
    (lambda: charts.strength_sweep([0.0, 1.0], [1.0], current=0.0), "values"),
    (lambda: charts.strength_sweep([[0.0, 1.0]], [1.0, 2.0]), "factors"),
    (lambda: charts.overlap_matrix(["a", "b"], np.eye(3)), "jaccard"),
])
def test_bad_input_names_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nice_ticks():
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(-2.3, 1.4) == [-2.0, -1.0, 0.0, 1.0]              # 3.7 / 6 = 0.62 -> step 1
    assert charts.nice_ticks(-2.3, 1.4, 8) == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0]   # 0.46 -> 0.5
    assert charts.nice_ticks(0.0, 0.01, 4) == [0.0, 0.0025, 0.005, 0.0075, 0.01]


def test_concurrent_drawing_matches_serial():
    rng = np.random.default_rng(0)
    inputs = [(rng.normal(size=8), rng.normal(size=8)) for _ in range(6)]
    serial = [np.asarray(charts.layer_sums(b, s).image) for b, s in inputs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: np.asarray(charts.layer_sums(*p).image), inputs))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)
