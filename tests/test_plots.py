import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hones_core import plots
from hones_core.plots import Plot


def check_plot(plot: Plot) -> object:
    """Common checks; returns the main (first) axes."""
    assert isinstance(plot, Plot) and isinstance(plot.figure, Figure)
    assert plot.caption.strip() and "\n" not in plot.caption
    ax = plot.figure.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    return ax


def bar_heights(ax):
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


# --------------------------------------------------------------------------- heads

def test_head_heatmap_draws_scores_and_boxes_top_heads():
    scores = np.arange(12, dtype=float).reshape(3, 4) - 5.0
    top = [(2, 3), (0, 1)]
    plot = plots.head_heatmap(scores, top, task="vqa")
    ax = check_plot(plot)
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), scores)
    assert image.origin == "lower" and "bottom" in ax.get_ylabel()
    assert image.norm.vmin == -6.0 and image.norm.vmax == 6.0          # symmetric around 0
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_label() == plots.TOP_HEAD_LABEL]
    assert sorted(b.get_xy() for b in boxes) == [(0.5, -0.5), (2.5, 1.5)]   # (head - .5, layer - .5)
    assert all(b.get_width() == 1 and b.get_height() == 1 for b in boxes)
    assert plot.figure.axes[1].get_ylabel() == "score (metric drop)"
    assert "vqa" in plot.caption and "2 heads" in plot.caption


def test_head_heatmap_accepts_torch_and_dedupes_heads():
    scores = torch.randn(4, 8, dtype=torch.bfloat16)
    plot = plots.head_heatmap(scores, [(1, 1), (1, 1)], task="ocr")
    np.testing.assert_array_equal(plot.figure.axes[0].images[0].get_array(), scores.float().numpy())
    assert len([p for p in plot.figure.axes[0].patches if p.get_label() == plots.TOP_HEAD_LABEL]) == 1


def test_head_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="head_scores"):
        plots.head_heatmap(np.zeros(5), [], task="vqa")
    with pytest.raises(ValueError, match="head_scores"):
        plots.head_heatmap(np.full((2, 2), np.nan), [], task="vqa")
    with pytest.raises(ValueError, match="top_heads"):
        plots.head_heatmap(np.zeros((2, 3)), [(2, 0)], task="vqa")
    with pytest.raises(ValueError, match="top_heads"):
        plots.head_heatmap(np.zeros((2, 3)), [(0,)], task="vqa")


# --------------------------------------------------------------------------- neurons

def test_layer_distribution_fractions_per_task():
    selections = {"vqa": {0: [1, 2, 3], 2: [5]}, "ocr": {1: [7, 8]}, "empty": {}}
    ax = check_plot(plots.layer_distribution(selections, 3))
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["vqa"].get_ydata(), [0.75, 0.0, 0.25])
    np.testing.assert_allclose(lines["ocr"].get_ydata(), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(lines["empty"].get_ydata(), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(lines["vqa"].get_xdata(), [0, 1, 2])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vqa (n=4)", "ocr (n=2)", "empty (n=0)"]


def test_layer_distribution_rejects_bad_input():
    with pytest.raises(ValueError, match="selections"):
        plots.layer_distribution({"vqa": {3: [1]}}, 3)
    with pytest.raises(ValueError, match="selections"):
        plots.layer_distribution({}, 3)
    with pytest.raises(ValueError, match="num_layers"):
        plots.layer_distribution({"vqa": {0: [1]}}, 0)


def test_masking_bars_heights_in_order_with_labels():
    results = {"vqa": {"hones": 50.0, "activation": 20.0, "random": -1.5},
               "ocr": {"hones": 40.0, "activation": 10.0, "random": 0.5}}
    plot = plots.masking_bars(results, metric_name="VQA accuracy")
    ax = check_plot(plot)
    assert bar_heights(ax) == {"hones": [50.0, 40.0], "activation": [20.0, 10.0], "random": [-1.5, 0.5]}
    hones = ax.containers[0]
    assert hones.patches[0].get_x() < hones.patches[1].get_x()                 # vqa left of ocr
    assert [t.get_text() for t in ax.get_xticklabels()] == ["vqa", "ocr"]
    assert {t.get_text() for t in ax.texts} == {"50.0", "20.0", "-1.5", "40.0", "10.0", "0.5"}
    assert "VQA accuracy" in ax.get_ylabel() and "%" in ax.get_ylabel()


def test_masking_bars_skips_missing_methods():
    ax = plots.masking_bars({"vqa": {"hones": 5.0, "dvp": 3.0}, "ocr": {"hones": 4.0}}).figure.axes[0]
    assert bar_heights(ax) == {"hones": [5.0, 4.0], "dvp": [3.0]}


def test_masking_bars_rejects_bad_input():
    with pytest.raises(ValueError, match="results"):
        plots.masking_bars({})
    with pytest.raises(ValueError, match="results"):
        plots.masking_bars({"vqa": {"hones": "a lot"}})
    with pytest.raises(ValueError, match="results"):
        plots.masking_bars({"vqa": [1.0, 2.0]})


def test_cross_ablation_bars_orders_groups():
    results = {"vqa": {"shared by all 4": 1.0, "shared by 2": 8.0, "task-specific": 30.0, "shared by 3": 4.0},
               "ocr": {"task-specific": 20.0, "shared by 2": 6.0}}
    ax = check_plot(plots.cross_ablation_bars(results))
    assert [c.get_label() for c in ax.containers] == ["task-specific", "shared by 2", "shared by 3",
                                                      "shared by all 4"]
    assert bar_heights(ax) == {"task-specific": [30.0, 20.0], "shared by 2": [8.0, 6.0],
                               "shared by 3": [4.0], "shared by all 4": [1.0]}
    with pytest.raises(ValueError, match="results"):
        plots.cross_ablation_bars({"vqa": {}})


# --------------------------------------------------------------------------- one input

def test_save_writes_png(tmp_path):
    plot = plots.budget_curve({"hones": {1.0: 3.0, 2.0: 5.0}}, task="vqa")
    path = plots.save(plot, tmp_path / "figs" / "curve.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_caption_must_be_one_line():
    with pytest.raises(ValueError, match="caption"):
        Plot(Figure(), "two\nlines")


def test_concurrent_rendering_without_pyplot(tmp_path):
    def render(k):
        plot = plots.head_heatmap(np.full((3, 3), float(k)), [(k % 3, 0)], task=f"t{k}")
        return plots.save(plot, tmp_path / f"{k}.png").stat().st_size

    with ThreadPoolExecutor(4) as pool:
        assert all(size > 0 for size in pool.map(render, range(8)))
    code = "import sys, hones_core.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_curve_draws_one_line_per_method_in_budget_order():
    plot = plots.budget_curve({"hones": {2: 30.0, 0.5: 10.0, 1: 20.0}, "random": {0.5: 1.0, 1: -2.0, 2: 3.0}},
                              task="vqa", metric_name="VQA accuracy")
    ax = check_plot(plot)
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"hones": ([0.5, 1.0, 2.0], [10.0, 20.0, 30.0]), "random": ([0.5, 1.0, 2.0], [1.0, -2.0, 3.0])}
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="positive budgets"):
        plots.budget_curve({"hones": {0: 1.0}}, task="vqa")


def test_cross_ablation_matrix_annotates_every_cell():
    values = np.array([[30.0, 5.0], [-2.0, 12.5]])
    plot = plots.cross_ablation_matrix(["vqa", "ocr"], values, method="hones", specificity=19.0)
    ax = check_plot(plot)
    np.testing.assert_allclose(ax.images[0].get_array(), values)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "30.0", (0, 1): "5.0", (1, 0): "-2.0", (1, 1): "12.5"}
    assert "19.0 points" in plot.caption
    with pytest.raises(ValueError, match="matrix must be"):
        plots.cross_ablation_matrix(["vqa"], values, method="hones")
