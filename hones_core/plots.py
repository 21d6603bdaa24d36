"""Figures for the dataset cards and the README (the app draws its own with PIL: `demo.charts`).

Every function is pure: arrays (numpy or torch) and plain lists/dicts in, a `Plot` out,
i.e. a `matplotlib.figure.Figure` plus a one-line caption saying what it shows. Figures
are built with `Figure(...)` directly, never through pyplot, so there is no global state
and they can be drawn concurrently inside a web server. Bad input raises `ValueError`
naming the argument.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .selection import Selection, check_selections


# Colour-blind-friendly categorical palette (matplotlib's tab10) and markers, so lines stay
# distinguishable in greyscale too.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_BASE_COLOUR, _STEERED_COLOUR = _PALETTE[0], _PALETTE[1]
TOP_HEAD_LABEL = "top head"


@dataclass(frozen=True)
class Plot:
    """A figure and a one-line caption saying what it shows."""
    figure: Figure
    caption: str

    def __post_init__(self):
        if not self.caption.strip() or "\n" in self.caption:
            raise ValueError("caption must be one non-empty line")


# --------------------------------------------------------------------------- helpers

def as_array(x, name: str, ndim: int) -> np.ndarray:
    """`x` (numpy, torch or nested lists) as a finite float64 array with `ndim` dimensions (else ValueError)."""
    if hasattr(x, "detach"):                      # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array: {err}") from None
    if arr.ndim != ndim:
        want = {1: "a 1-D array", 2: "a 2-D array"}[ndim]
        raise ValueError(f"{name} must be {want}, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def top_head_pairs(top_heads: Sequence, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """`top_heads` as distinct (layer, head) int pairs inside an `[n_layers, n_heads]` score grid (else ValueError)."""
    heads: list[tuple[int, int]] = []
    for item in top_heads:
        try:
            layer, head = (int(v) for v in item)
        except (TypeError, ValueError):
            raise ValueError(f"top_heads must be (layer, head) pairs, got {item!r}") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"top_heads has ({layer}, {head}) outside head_scores of shape "
                             f"[{n_layers} layers, {n_heads} heads]")
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def layer_fractions(selections: Mapping[str, Selection], num_layers: int) -> list[tuple[str, int, np.ndarray]]:
    """Per task: (task, neurons selected, fraction of them in each of `num_layers` layers); ValueError on bad input."""
    sets = check_selections(selections)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    out = []
    for task, pairs in sets.items():
        bad = sorted({layer for layer, _ in pairs if not 0 <= layer < num_layers})
        if bad:
            raise ValueError(f"selections[{task!r}] has layers {bad} outside 0..{num_layers - 1} (num_layers)")
        counts = np.bincount([layer for layer, _ in pairs], minlength=num_layers).astype(float)
        out.append((task, len(pairs), counts / counts.sum() if counts.sum() else counts))
    return out


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _tick_step(n: int, max_ticks: int = 16) -> int:
    return max(1, math.ceil(n / max_ticks))


def _check_results(results, name: str = "results") -> dict[str, dict[str, float]]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"{name} must be a non-empty dict task -> {{series: value}}")
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        if not isinstance(row, Mapping) or not row:
            raise ValueError(f"{name}[{task!r}] must be a non-empty dict series -> value")
        out[str(task)] = {}
        for series, value in row.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{task!r}][{series!r}] must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{name}[{task!r}][{series!r}] is not finite")
            out[str(task)][str(series)] = value
    return out


def _grouped_bars(ax, results: dict[str, dict[str, float]], series: list[str], colours: list) -> None:
    """Bars at x = task index, one offset bar per series; missing (task, series) pairs are skipped."""
    tasks = list(results)
    width = 0.8 / len(series)
    for j, (name, colour) in enumerate(zip(series, colours)):
        xs = [i for i, t in enumerate(tasks) if name in results[t]]
        heights = [results[tasks[i]][name] for i in xs]
        offsets = np.asarray(xs, dtype=float) - 0.4 + width * (j + 0.5)
        bars = ax.bar(offsets, heights, width, label=name, color=colour, edgecolor="white", linewidth=0.5)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="upper center",
              bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# --------------------------------------------------------------------------- heads

def head_heatmap(head_scores, top_heads: Sequence[tuple[int, int]], *, task: str) -> Plot:
    """Heatmap of head scores S(l,h) `[layers, heads]` with the top heads outlined.

    Layer 0 is at the bottom. The colour scale is symmetric around 0 (red: ablating the
    head hurts the task metric, blue: it helps).
    """
    scores = as_array(head_scores, "head_scores", 2)
    n_layers, n_heads = scores.shape
    heads = top_head_pairs(top_heads, n_layers, n_heads)

    fig = _figure(min(max(2.4 + 0.2 * n_heads, 5.0), 11.0), min(max(1.4 + 0.18 * n_layers, 3.5), 9.0))
    ax = fig.add_subplot()
    vmax = float(np.abs(scores).max()) or 1.0
    image = ax.imshow(scores, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                      interpolation="nearest")
    for layer, head in heads:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black",
                               linewidth=2.0, label=TOP_HEAD_LABEL, clip_on=False))
    ax.set_xticks(range(0, n_heads, _tick_step(n_heads)))
    ax.set_yticks(range(0, n_layers, _tick_step(n_layers)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer (0 = bottom)")
    ax.set_title(f"Head scores S(l,h): {task}")
    fig.colorbar(image, ax=ax, label="score (metric drop)", shrink=0.9)
    caption = (f"Head scores S(l,h) for {task}: drop in task metric when each head is mean-replaced; "
               f"boxes mark the {len(heads)} heads used for neuron attribution.")
    return Plot(fig, caption)


# --------------------------------------------------------------------------- neurons

def layer_distribution(selections: Mapping[str, Selection], num_layers: int) -> Plot:
    """Fraction of each task's selected neurons that lie in each layer, one line per task."""
    series = layer_fractions(selections, num_layers)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    layers = np.arange(num_layers)
    for k, (task, n, fraction) in enumerate(series):
        ax.plot(layers, fraction, marker=_MARKERS[k % len(_MARKERS)], markersize=4,
                color=_PALETTE[k % len(_PALETTE)], label=f"{task} (n={n})")
    ax.set_xticks(range(0, num_layers, _tick_step(num_layers)))
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of selected neurons")
    ax.set_title("Where the selected neurons are")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="task", title_fontsize=8)
    caption = "Fraction of each task's selected FFN neurons that lie in each decoder layer."
    return Plot(fig, caption)


# --------------------------------------------------------------------------- masking

def masking_bars(results: Mapping[str, Mapping[str, float]], *, metric_name: str | None = None) -> Plot:
    """Grouped bars: relative drop (%) of each task's metric when each method's neurons are masked.

    `results` is `{task: {method: relative drop in %}}`; methods keep their first-seen order.
    """
    data = _check_results(results)
    methods = list(dict.fromkeys(m for row in data.values() for m in row))
    fig = _figure(max(6.0, 1.2 + 0.45 * len(data) * len(methods)), 4.0)
    ax = fig.add_subplot()
    _grouped_bars(ax, data, methods, [_PALETTE[k % len(_PALETTE)] for k in range(len(methods))])
    metric = metric_name or "task metric"
    ax.set_xlabel("task")
    ax.set_ylabel(f"relative drop in {metric} (%)")
    ax.set_title("Masking the selected neurons")
    caption = (f"Relative drop (%) in the {metric} on held-out data when each method's selected "
               f"neurons are masked (zeroed); higher means the neurons matter more.")
    return Plot(fig, caption)


def _group_order(name: str) -> tuple[int, str]:
    if name == "task-specific":
        return (1, name)
    match = re.fullmatch(r"shared by (?:all )?(\d+)", name)
    return (int(match.group(1)), name) if match else (10**6, name)


def cross_ablation_bars(results: Mapping[str, Mapping[str, float]]) -> Plot:
    """For each task, relative drop (%) when its task-specific or shared neuron groups are masked.

    `results` is `{task: {group: relative drop in %}}` with groups named as in
    `masking.overlap_groups` ("task-specific", "shared by 2", ..., "shared by all 4").
    """
    data = _check_results(results)
    groups = sorted(dict.fromkeys(g for row in data.values() for g in row), key=_group_order)
    # ordinal groups: a sequential palette, from "own" (dark) to "shared by all" (light)
    colours = [colormaps["viridis"](v) for v in np.linspace(0.1, 0.8, len(groups))]
    fig = _figure(max(6.0, 1.2 + 0.45 * len(data) * len(groups)), 4.0)
    ax = fig.add_subplot()
    _grouped_bars(ax, data, groups, colours)
    ax.set_xlabel("task")
    ax.set_ylabel("relative drop in task metric (%)")
    ax.set_title("Masking task-specific vs shared neurons")
    caption = ("Relative drop (%) in each task's metric when its selected neurons are masked group by "
               "group: neurons only this task selects versus neurons shared with other tasks.")
    return Plot(fig, caption)


def budget_curve(drops: Mapping[str, Mapping[float, float]], *, task: str, metric_name: str | None = None) -> Plot:
    """Relative drop (%) against the neuron budget (%), one line per method, for one task.

    `drops` is `{method: {budget in %: relative drop in %}}`.
    """
    if not isinstance(drops, Mapping) or not drops:
        raise ValueError("drops must be a non-empty dict method -> {budget %: relative drop %}")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for k, (method, curve) in enumerate(drops.items()):
        points = sorted((float(b), float(v)) for b, v in curve.items())
        if not points or not all(math.isfinite(b) and math.isfinite(v) and b > 0 for b, v in points):
            raise ValueError(f"drops[{method!r}] must map positive budgets to finite drops, got {dict(curve)!r}")
        ax.plot([b for b, _ in points], [v for _, v in points], marker=_MARKERS[k % len(_MARKERS)],
                color=_PALETTE[k % len(_PALETTE)], label=str(method))
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.8)
    metric = metric_name or "task metric"
    ax.set_xlabel("neuron budget (% of all FFN neurons, log scale)")
    ax.set_ylabel(f"relative drop in {metric} (%)")
    ax.set_title(f"Masking at growing budgets: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="method", title_fontsize=8)
    caption = (f"Relative drop (%) of the {task} {metric} on held-out data when each method's top neurons are "
               f"masked, at each budget; a method whose curve lies higher finds neurons that matter more.")
    return Plot(fig, caption)


def cross_ablation_matrix(tasks: Sequence[str], matrix: object, *, method: str,
                          specificity: float | None = None) -> Plot:
    """Annotated heatmap: row task A's top set masked, relative drop (%) on column task B."""
    tasks = [str(t) for t in tasks]
    values = as_array(matrix, "matrix", 2)
    n = len(tasks)
    if values.shape != (n, n):
        raise ValueError(f"matrix must be [{n}, {n}] for {n} tasks, got shape {tuple(values.shape)}")
    fig = _figure(5.2, 4.4)
    ax = fig.add_subplot()
    limit = max(1.0, float(np.abs(values).max()))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)      # drops red, gains blue
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(values[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(n), tasks)
    ax.set_yticks(range(n), tasks)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("task whose neurons are masked")
    ax.set_title(f"Cross-task ablation ({method})")
    fig.colorbar(image, ax=ax, label="relative drop (%)", shrink=0.9)
    spec = f" Specificity (diagonal minus off-diagonal mean): {specificity:.1f} points." if specificity is not None \
        else ""
    caption = (f"Relative drop (%) of each column task's metric when the row task's top {method} neurons are "
               f"masked; a strong diagonal means task-specific neurons.{spec}")
    return Plot(fig, caption)



def save(plot: Plot | Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write the plot as a PNG at `path` (parent folders are created); returns the path."""
    figure = plot.figure if isinstance(plot, Plot) else plot
    if not isinstance(figure, Figure):
        raise ValueError(f"plot must be a Plot or a Figure, got {type(plot).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path


# --------------------------------------------------------------------------- dataset card

def card_figures(artifact, *, ratio: float = 0.01) -> dict[str, Plot]:
    """The figures of a rankings artifact's dataset card, keyed by PNG path inside the folder.

    One head-score heatmap per task (`figures/heads-<task>.png`) and the layer distribution
    of every task's HONES selection at `ratio` (`figures/layers.png`).
    """
    plots = {f"figures/heads-{task}.png": head_heatmap(r.head_scores, r.top_heads, task=task)
             for task, r in artifact.tasks.items()}
    selections = {task: r.select("hones", ratio) for task, r in artifact.tasks.items()}
    plots["figures/layers.png"] = layer_distribution(selections, artifact.model.num_layers)
    return plots


def write_card_figures(directory: str | Path, *, ratio: float = 0.01) -> dict[str, str]:
    """Draw `card_figures` into a local artifact folder and relink its dataset card to them.

    Returns:
        {PNG path relative to the folder: caption}.
    """
    from . import rankings

    directory = Path(directory)
    artifact = rankings.load(directory)
    figures = {}
    for relative, plot in card_figures(artifact, ratio=ratio).items():
        save(plot, directory / relative)
        figures[relative] = plot.caption
    rankings.save(artifact, directory, figures=figures)
    return figures


def neuron_vocabulary(promoted: Sequence[tuple[str, float]], suppressed: Sequence[tuple[str, float]], *,
                      neuron: str) -> Plot:
    """Two bar panels: the tokens a neuron's write-in promotes most (left) and suppresses most (right).

    Args:
        promoted, suppressed: (token text, W_U[t] · W_down[:, i]) pairs, strongest first (drawn at the top).
        neuron: how the neuron is named in the title, e.g. "L3·n120".
    """
    panels = []
    for name, pairs in (("promoted", promoted), ("suppressed", suppressed)):
        pairs = list(pairs)
        values = as_array([v for _, v in pairs], name, 1)
        panels.append(([repr(str(t))[1:-1] or "∅" for t, _ in pairs], values))
    n = max(len(labels) for labels, _ in panels)
    fig = _figure(7.0, min(max(1.2 + 0.28 * n, 2.6), 8.0))
    for k, ((labels, values), title, colour) in enumerate(zip(panels, ("promotes", "suppresses"),
                                                              (_PALETTE[2], _PALETTE[3]))):
        ax = fig.add_subplot(1, 2, k + 1)
        y = np.arange(len(labels))
        ax.barh(y, values, color=colour)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("W_U · W_down[:, i] (logit per unit z)")
        ax.set_title(f"{neuron} {title}")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    caption = (f"Vocabulary tokens whose logits neuron {neuron}'s write-in raises (left) and lowers (right) most "
               f"per unit of activation (direct path, before the final norm).")
    return Plot(fig, caption)


# --------------------------------------------------------------------------- attention over an image
# PIL, not matplotlib: these are drawn per request and per head, and composing a few small
# images is ~100x cheaper than creating a figure.

_HEAT = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)   # [256, 3] LUT


def attention_overlay(image, grids: Sequence, boxes: Sequence[tuple[float, float, float, float]], *,
                      vmin: float = 0.0, vmax: float | None = None, size: int = 320, alpha: float = 0.6,
                      title: str = ""):
    """One heatmap panel: `image` scaled to `size` px on its longest side, each grid drawn over its box.

    Args:
        image: a PIL image.
        grids: `[rows, cols]` arrays of non-negative weights, one per box.
        boxes: (left, top, right, bottom) in pixels of `image` that each grid covers (may reach outside it).
        vmin, vmax: the weights drawn darkest and brightest (vmax default: the largest in `grids`);
            vmax <= vmin draws every cell dark.
        size: the panel's longest side, px.
        alpha: opacity of the heatmap over the image.
        title: a line drawn above the panel.

    Returns:
        A PIL RGB image: cells upsampled nearest-neighbour (each token stays one visible block).

    Raises:
        ValueError: grids and boxes differ in number, a grid is not 2-D or has a negative weight.
    """
    from PIL import Image, ImageDraw

    if len(grids) != len(boxes) or not grids:
        raise ValueError(f"grids and boxes must be as many and at least one ({len(grids)} vs {len(boxes)})")
    arrays = [as_array(g, "grid", 2) for g in grids]
    if any((a < 0).any() for a in arrays):
        raise ValueError("attention weights must be non-negative")
    top = max(float(a.max()) for a in arrays) if vmax is None else float(vmax)
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    heat = base.copy()
    for a, (left, upper, right, lower) in zip(arrays, boxes):
        x0, y0, x1, y1 = (round(v * scale) for v in (left, upper, right, lower))
        if x1 <= x0 or y1 <= y0:
            continue
        levels = np.zeros(a.shape, dtype=np.uint8) if top <= vmin else \
            np.clip((a - vmin) / (top - vmin) * 255, 0, 255).astype(np.uint8)
        cells = Image.fromarray(_HEAT[levels]).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST)
        # the part of the box inside the panel (LLaVA's padded square reaches outside the image)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx1 > cx0 and cy1 > cy0:
            heat.paste(cells.crop((cx0 - x0, cy0 - y0, cx1 - x0, cy1 - y0)), (cx0, cy0))
    panel = Image.blend(base, heat, alpha)
    draw = ImageDraw.Draw(panel)
    for left, upper, right, lower in boxes:          # region outlines (tiles), clipped to the panel
        draw.rectangle([max(0, round(left * scale)), max(0, round(upper * scale)),
                        min(width - 1, round(right * scale) - 1), min(height - 1, round(lower * scale) - 1)],
                       outline=(255, 255, 255))
    if not title:
        return panel
    band = 22
    out = Image.new("RGB", (width, height + band), (255, 255, 255))
    out.paste(panel, (0, band))
    ImageDraw.Draw(out).text((4, 4), title, fill=(0, 0, 0), font=_font(14))
    return out


def image_grid(rows: Sequence[Sequence], *, title: str = "", gap: int = 8):
    """PIL images laid out in rows (each row left to right), white gaps, an optional title line on top."""
    from PIL import Image, ImageDraw

    if not rows or not all(rows):
        raise ValueError("image_grid needs at least one non-empty row")
    col_w = [max(row[i].width for row in rows if i < len(row)) for i in range(max(len(r) for r in rows))]
    row_h = [max(img.height for img in row) for row in rows]
    band = 26 if title else 0
    out = Image.new("RGB", (sum(col_w) + gap * (len(col_w) + 1), band + sum(row_h) + gap * (len(rows) + 1)),
                    (255, 255, 255))
    y = band + gap
    for row, h in zip(rows, row_h):
        x = gap
        for img, w in zip(row, col_w):
            out.paste(img, (x, y))
            x += w + gap
        y += h + gap
    if title:
        ImageDraw.Draw(out).text((gap, 6), title, fill=(0, 0, 0), font=_font(16))
    return out


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)
