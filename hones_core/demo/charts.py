"""The app's figures drawn straight with PIL: the plots of `plots`, in milliseconds instead of tenths of a second.

matplotlib spends 0.1-0.25 s per figure on one CPU core (constrained layout measures every
text, then Agg renders it again), which was about 95 % of a toy request. The app draws here
instead: a fixed layout computed from the text sizes, text set once with the DejaVu Sans font
matplotlib ships (so the figures look like the README's), everything drawn at twice the size
and reduced by 2 (anti-aliasing). `plots` stays the home of the matplotlib figures (README,
dataset cards, anyone who wants a `Figure`).

Every function is pure: arrays in, a `Chart` out: the RGB image, a one-line caption, and where
the data went (the plot frame in pixels and the data limits at its edges), so a test can check
the pixels against the values. Bad input raises `ValueError` naming the argument.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from ..plots import as_array, layer_fractions, top_head_pairs
from ..selection import Selection

SCALE = 2                   # drawn at twice the size, reduced by 2: anti-aliased lines and text
DPI = 90                    # pixels per inch of the final image (the app's PNGs were drawn at 90 dpi)
BASE_COLOUR, STEERED_COLOUR, CURRENT_COLOUR = (31, 119, 180), (255, 127, 14), (214, 39, 40)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # tab10
MARKERS = ["o", "s", "^", "D", "v"]
GRID, FRAME, TEXT, GREY = (225, 225, 225), (0, 0, 0), (0, 0, 0), (128, 128, 128)


@dataclass(frozen=True)
class Chart:
    """A drawn figure: the image, a one-line caption, and where data coordinates land on it.

    Attributes:
        image: RGB image.
        caption: what it shows, one line.
        frame: (left, top, right, bottom) pixels of the plot area in `image`.
        xlim: data x at the frame's left and right edge.
        ylim: data y at the frame's bottom and top edge (categorical rows drawn top-down have
            ylim = (n - 0.5, -0.5)).
    """
    image: Image.Image
    caption: str
    frame: tuple[int, int, int, int]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def __post_init__(self):
        if not self.caption.strip() or "\n" in self.caption:
            raise ValueError("caption must be one non-empty line")

    @property
    def pair(self) -> tuple[Image.Image, str]:
        """(image, caption), what the app shows."""
        return self.image, self.caption


# --------------------------------------------------------------------------- checks

# --------------------------------------------------------------------------- drawing

_FONTS = threading.local()     # a FreeType face is not safe to share between threads: one set per thread


def _font(points: float) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (matplotlib's own copy) at `points` for the final `DPI`, scaled by `SCALE`."""
    fonts = getattr(_FONTS, "by_size", None)
    if fonts is None:
        fonts = _FONTS.by_size = {}
    size = round(points * DPI / 72 * SCALE)
    if size not in fonts:
        fonts[size] = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), size)
    return fonts[size]


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    """`[256, 3]` uint8 colours of a matplotlib colormap (shared between calls: read-only)."""
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _colour(cmap: str, fraction: float) -> tuple[int, int, int]:
    return tuple(int(c) for c in _lut(cmap)[int(round(min(max(fraction, 0.0), 1.0) * 255))])


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) inside [lo, hi]."""
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    out = []
    k = first
    while k * step <= hi + step * 1e-9:
        out.append(round(k * step, 12) + 0.0)
        k += 1
    return out


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:])), default=1.0) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals and round(step * 10 ** decimals) % 10 == 5 and abs(step * 10 ** decimals - 2.5) < 1e-6:
        decimals += 1               # a 0.25 step needs two decimals
    text = f"{value:.{decimals}f}"
    return text.replace("-", "\u2212") if value < 0 and text.strip("-0.") else text.lstrip("-")


def _padded(lo: float, hi: float, fraction: float = 0.05) -> tuple[float, float]:
    if hi - lo < 1e-12:
        return lo - 0.5, hi + 0.5
    pad = (hi - lo) * fraction
    return lo - pad, hi + pad


class _Axes:
    """One plot area on a white canvas, drawn at `SCALE` times the final size.

    Coordinates handed to the drawing methods are data coordinates; `px` maps them.
    """

    def __init__(self, width: int, height: int, *, title: str, xlabel: str, ylabel: str,
                 xlim: tuple[float, float], ylim: tuple[float, float], xticks: Sequence[tuple[float, str]],
                 yticks: Sequence[tuple[float, str]], right: int = 12, grid: str = "both", tick_points: float = 8):
        s = SCALE
        self.xlim, self.ylim = (float(xlim[0]), float(xlim[1])), (float(ylim[0]), float(ylim[1]))
        self.image = Image.new("RGB", (width * s, height * s), "white")
        self.draw = ImageDraw.Draw(self.image)
        tick_font, label_font, title_font = _font(tick_points), _font(9), _font(10)
        pad, tick = 6 * s, 4 * s
        ytick_width = max((self.draw.textlength(t, font=tick_font) for _, t in yticks), default=0)
        text_height = lambda font: font.getbbox("Hg")[3] - font.getbbox("Hg")[1]    # noqa: E731
        left = pad + (text_height(label_font) + pad if ylabel else 0) + ytick_width + tick + 3 * s
        bottom = pad + (text_height(label_font) + pad if xlabel else 0) + text_height(tick_font) + tick + 3 * s
        top = pad + text_height(title_font) + pad
        self.box = (int(left), int(top), width * s - right * s, height * s - int(bottom))
        x0, y0, x1, y1 = self.box
        for value, _ in (xticks if grid in ("x", "both") else []):
            px = self.px(value, self.ylim[0])[0]
            self.draw.line([(px, y0), (px, y1)], fill=GRID, width=s)
        for value, _ in (yticks if grid in ("y", "both") else []):
            py = self.px(self.xlim[0], value)[1]
            self.draw.line([(x0, py), (x1, py)], fill=GRID, width=s)
        for value, text in xticks:
            px = self.px(value, self.ylim[0])[0]
            self.draw.line([(px, y1), (px, y1 + tick)], fill=FRAME, width=s)
            self.draw.text((px, y1 + tick + 2 * s), text, fill=TEXT, font=tick_font, anchor="mt")
        for value, text in yticks:
            py = self.px(self.xlim[0], value)[1]
            self.draw.line([(x0 - tick, py), (x0, py)], fill=FRAME, width=s)
            self.draw.text((x0 - tick - 2 * s, py), text, fill=TEXT, font=tick_font, anchor="rm")
        self.draw.text(((x0 + x1) / 2, pad), title, fill=TEXT, font=title_font, anchor="mt")
        if xlabel:
            self.draw.text(((x0 + x1) / 2, height * s - pad), xlabel, fill=TEXT, font=label_font, anchor="md")
        if ylabel:
            self.vertical_text((pad, (y0 + y1) / 2), ylabel, label_font)

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixel (at `SCALE`) of data point (x, y)."""
        x0, y0, x1, y1 = self.box
        return (x0 + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (x1 - x0),
                y1 - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (y1 - y0))

    def vertical_text(self, left_centre: tuple[float, float], text: str, font) -> None:
        """`text` rotated 90° (reading bottom-up), its left edge at x, centred on y."""
        width = int(self.draw.textlength(text, font=font)) + 4
        height = font.getbbox("Hg")[3] + 4
        strip = Image.new("L", (width, height), 0)
        ImageDraw.Draw(strip).text((2, 2), text, fill=255, font=font)
        strip = strip.rotate(90, expand=True)
        x, y = left_centre
        self.image.paste(TEXT, (int(x), int(y - strip.height / 2)), strip)

    def frame(self) -> None:
        self.draw.rectangle(self.box, outline=FRAME, width=SCALE)

    def hline(self, y: float, colour=FRAME, width: float = 0.8) -> None:
        x0, _, x1, _ = self.box
        py = self.px(self.xlim[0], y)[1]
        self.draw.line([(x0, py), (x1, py)], fill=colour, width=max(1, round(width * SCALE)))

    def vline(self, x: float, colour=FRAME, width: float = 0.8, dash: int = 0) -> None:
        _, y0, _, y1 = self.box
        px = self.px(x, self.ylim[0])[0]
        if not dash:
            self.draw.line([(px, y0), (px, y1)], fill=colour, width=max(1, round(width * SCALE)))
            return
        step = dash * SCALE
        for start in range(int(y0), int(y1), 2 * step):
            self.draw.line([(px, start), (px, min(start + step, y1))], fill=colour, width=max(1, round(width * SCALE)))

    def marker(self, centre: tuple[float, float], kind: str, colour, size: float = 4.0) -> None:
        x, y = centre
        r = size * SCALE / 2 + SCALE
        if kind == "s":
            self.draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == "^":
            self.draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        elif kind == "v":
            self.draw.polygon([(x, y + r), (x - r, y - r), (x + r, y - r)], fill=colour)
        elif kind == "D":
            self.draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour)
        elif kind == "*":
            points = [(x + (r * 1.4 if k % 2 == 0 else r * 0.6) * math.sin(k * math.pi / 5),
                       y - (r * 1.4 if k % 2 == 0 else r * 0.6) * math.cos(k * math.pi / 5)) for k in range(10)]
            self.draw.polygon(points, fill=colour)
        else:
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def line(self, xs: Sequence[float], ys: Sequence[float], colour, marker: str | None = "o") -> None:
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=round(1.5 * DPI / 72 * SCALE), joint="curve")
        if marker:
            for point in points:
                self.marker(point, marker, colour)

    def legend(self, entries: Sequence[tuple[str, tuple, str | None]], avoid: Sequence[tuple[float, float]],
               title: str | None = None) -> None:
        """A legend box in the inside corner of the frame that hides the fewest of the `avoid` data points."""
        s, font = SCALE, _font(8)
        row = font.getbbox("Hg")[3] + 3 * s
        swatch = 18 * s
        width = int(max([self.draw.textlength(t, font=font) for t, _, _ in entries]
                        + ([self.draw.textlength(title, font=font)] if title else []))) + swatch + 12 * s
        height = row * (len(entries) + bool(title)) + 6 * s
        x0, y0, x1, y1 = self.box
        inset = 6 * s
        corners = [(x1 - inset - width, y0 + inset), (x0 + inset, y0 + inset),
                   (x1 - inset - width, y1 - inset - height), (x0 + inset, y1 - inset - height)]
        hidden = [sum(cx - 2 * s <= px <= cx + width + 2 * s and cy - 2 * s <= py <= cy + height + 2 * s
                      for px, py in avoid) for cx, cy in corners]
        cx, cy = corners[int(np.argmin(hidden))]
        self.draw.rectangle((cx, cy, cx + width, cy + height), fill="white", outline=(204, 204, 204), width=s)
        y = cy + 3 * s
        if title:
            self.draw.text((cx + width / 2, y), title, fill=TEXT, font=font, anchor="mt")
            y += row
        for text, colour, kind in entries:
            mid = y + row / 2 - s
            if kind == "bar":
                self.draw.rectangle((cx + 5 * s, mid - 4 * s, cx + 5 * s + 12 * s, mid + 4 * s), fill=colour)
            else:
                self.draw.line([(cx + 4 * s, mid), (cx + 4 * s + 14 * s, mid)], fill=colour, width=3 * s // 2 + 1)
                if kind and kind not in ("-", ":", "--"):
                    self.marker((cx + 11 * s, mid), kind, colour)
            self.draw.text((cx + swatch + 4 * s, mid), text, fill=TEXT, font=font, anchor="lm")
            y += row

    def colorbar(self, cmap: str, vmin: float, vmax: float, label: str) -> None:
        """A vertical colour bar right of the frame, with round ticks and `label` rotated."""
        s = SCALE
        x0, y0, x1, y1 = self.box
        left, width = x1 + 10 * s, 12 * s
        strip = Image.fromarray(_lut(cmap)[::-1][:, None, :].repeat(2, axis=1)).resize((width, y1 - y0),
                                                                                       Image.Resampling.BILINEAR)
        self.image.paste(strip, (left, y0))
        self.draw.rectangle((left, y0, left + width, y1), outline=FRAME, width=s)
        ticks = nice_ticks(vmin, vmax, 5)
        font = _font(8)
        right = left + width
        for value in ticks:
            py = y1 - (value - vmin) / (vmax - vmin) * (y1 - y0)
            self.draw.line([(right, py), (right + 3 * s, py)], fill=FRAME, width=s)
            self.draw.text((right + 5 * s, py), _tick_label(value, ticks), fill=TEXT, font=font, anchor="lm")
        widest = max(self.draw.textlength(_tick_label(v, ticks), font=font) for v in ticks)
        self.vertical_text((right + 8 * s + widest, (y0 + y1) / 2), label, _font(9))

    def done(self, caption: str) -> Chart:
        self.frame()
        small = self.image.reduce(SCALE)
        x0, y0, x1, y1 = (round(v / SCALE) for v in self.box)
        return Chart(small, caption, (x0, y0, x1, y1), self.xlim, self.ylim)


def _size(width_in: float, height_in: float) -> tuple[int, int]:
    return round(width_in * DPI), round(height_in * DPI)


def _cells(ax: _Axes, rgb: np.ndarray, *, bottom_up: bool) -> None:
    """Paint `[rows, cols, 3]` colours as cells filling the frame (row 0 at the bottom when `bottom_up`)."""
    x0, y0, x1, y1 = ax.box
    grid = Image.fromarray(np.ascontiguousarray(rgb[::-1] if bottom_up else rgb))
    ax.image.paste(grid.resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST), (x0, y0))


def _index_ticks(n: int, max_ticks: int = 16) -> list[tuple[float, str]]:
    step = max(1, math.ceil(n / max_ticks))
    return [(float(i), str(i)) for i in range(0, n, step)]


def _numeric_ticks(lo: float, hi: float, target: int = 6) -> list[tuple[float, str]]:
    ticks = nice_ticks(lo, hi, target)
    return [(t, _tick_label(t, ticks)) for t in ticks]


# --------------------------------------------------------------------------- the app's figures

def head_heatmap(head_scores, top_heads: Sequence[tuple[int, int]], *, task: str) -> Chart:
    """Head scores S(l,h) `[layers, heads]`, layer 0 at the bottom, symmetric red-blue scale, top heads boxed."""
    scores = as_array(head_scores, "head_scores", 2)
    n_layers, n_heads = scores.shape
    heads = top_head_pairs(top_heads, n_layers, n_heads)
    width, height = _size(min(max(2.4 + 0.2 * n_heads, 5.0), 11.0), min(max(1.4 + 0.18 * n_layers, 3.5), 9.0))
    ax = _Axes(width, height, title=f"Head scores S(l,h): {task}", xlabel="head", ylabel="layer (0 = bottom)",
               xlim=(-0.5, n_heads - 0.5), ylim=(-0.5, n_layers - 0.5), xticks=_index_ticks(n_heads),
               yticks=_index_ticks(n_layers), right=78, grid="none")
    vmax = float(np.abs(scores).max()) or 1.0
    _cells(ax, _lut("RdBu_r")[np.rint((scores + vmax) / (2 * vmax) * 255).astype(int)], bottom_up=True)
    for layer, head in heads:
        left, top = ax.px(head - 0.5, layer + 0.5)
        right, bottom = ax.px(head + 0.5, layer - 0.5)
        ax.draw.rectangle((left, top, right, bottom), outline=FRAME, width=round(2 * DPI / 72 * SCALE))
    ax.colorbar("RdBu_r", -vmax, vmax, "score (metric drop)")
    return ax.done(f"Head scores S(l,h) for {task}: drop in task metric when each head is mean-replaced; "
                   f"boxes mark the {len(heads)} heads used for neuron attribution.")


def overlap_matrix(tasks: Sequence[str], jaccard: object) -> Chart:
    """Annotated `[tasks, tasks]` Jaccard overlap of the tasks' neuron sets (viridis, 0..1), row 0 at the top."""
    tasks = [str(t) for t in tasks]
    values = as_array(jaccard, "jaccard", 2)
    n = len(tasks)
    if values.shape != (n, n):
        raise ValueError(f"jaccard must be [{n}, {n}] for {n} tasks, got shape {tuple(values.shape)}")
    if values.min() < 0 or values.max() > 1:
        raise ValueError("jaccard values must lie in [0, 1]")
    width, height = _size(max(2.6 + 1.0 * n, 4.5), max(2.0 + 0.85 * n, 3.8))
    labels = [(float(i), t) for i, t in enumerate(tasks)]
    ax = _Axes(width, height, title="Overlap of top-neuron sets", xlabel="task", ylabel="task",
               xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5), xticks=labels, yticks=labels, right=70, grid="none",
               tick_points=8)
    _cells(ax, _lut("viridis")[np.rint(values * 255).astype(int)], bottom_up=False)
    font = _font(9)
    for i in range(n):
        for j in range(n):
            # viridis is dark below ~0.55 and light above
            ax.draw.text(ax.px(j, i), f"{values[i, j]:.2f}", font=font, anchor="mm",
                         fill="white" if values[i, j] < 0.55 else "black")
    ax.colorbar("viridis", 0.0, 1.0, "Jaccard index")
    return ax.done("Jaccard overlap |A∩B| / |A∪B| between the tasks' selected neuron sets "
                   "(1 = identical, 0 = disjoint).")


def layer_distribution(selections: Mapping[str, Selection], num_layers: int) -> Chart:
    """Fraction of each task's selected neurons that lie in each layer, one line per task."""
    series = layer_fractions(selections, num_layers)
    top = max(float(max(f.max() for _, _, f in series)), 1e-9) * 1.08
    ax = _Axes(*_size(6.0, 4.0), title="Where the selected neurons are", xlabel="layer",
               ylabel="fraction of selected neurons", xlim=(-0.5, num_layers - 0.5), ylim=(0.0, top),
               xticks=_index_ticks(num_layers), yticks=_numeric_ticks(0.0, top))
    layers = np.arange(num_layers)
    points = []
    for k, (_, _, fraction) in enumerate(series):
        ax.line(layers, fraction, PALETTE[k % len(PALETTE)], MARKERS[k % len(MARKERS)])
        points += [ax.px(x, y) for x, y in zip(layers, fraction)]
    ax.legend([(f"{task} (n={n})", PALETTE[k % len(PALETTE)], MARKERS[k % len(MARKERS)])
               for k, (task, n, _) in enumerate(series)], points, title="task")
    return ax.done("Fraction of each task's selected FFN neurons that lie in each decoder layer.")


def contributions(labels: Sequence[str], base, steered, *, title_hint: str = "") -> Chart:
    """Paired horizontal bars of the write-in contributions `[n]` of the top neurons, base vs steered; first label on top."""
    labels = [str(label) for label in labels]
    base = as_array(base, "base", 1)
    steered = as_array(steered, "steered", 1)
    if len(labels) != len(base):
        raise ValueError(f"labels has {len(labels)} entries but base has {len(base)}")
    if steered.shape != base.shape:
        raise ValueError(f"steered must have the shape of base {tuple(base.shape)}, got {tuple(steered.shape)}")
    n = len(labels)
    both = np.concatenate([base, steered, [0.0]])
    xlim = _padded(float(both.min()), float(both.max()))
    ax = _Axes(*_size(6.0, min(max(1.3 + 0.3 * n, 3.0), 12.0)),
               title="Top neuron contributions" + (f": {title_hint}" if title_hint else ""),
               xlabel="write-in contribution to the answer direction", ylabel="neuron", xlim=xlim,
               ylim=(n - 0.5, -0.5), xticks=_numeric_ticks(*xlim), yticks=list(enumerate(labels)), grid="x",
               tick_points=7 if n > 12 else 8)
    for values, offset, colour in ((base, -0.2, BASE_COLOUR), (steered, 0.2, STEERED_COLOUR)):
        for i, value in enumerate(values):
            left, top = ax.px(min(0.0, value), i + offset - 0.2)
            right, bottom = ax.px(max(0.0, value), i + offset + 0.2)
            ax.draw.rectangle((left, top, right, bottom), fill=colour)
    ax.vline(0.0)
    ends = [ax.px(v, i + o) for values, o in ((base, -0.2), (steered, 0.2)) for i, v in enumerate(values)]
    zero = [ax.px(0.0, i) for i in range(n)]
    ax.legend([("base", BASE_COLOUR, "bar"), ("steered", STEERED_COLOUR, "bar")],
              ends + zero + [((a[0] + b[0]) / 2, a[1]) for a, b in zip(ends, zero * 2)])
    return ax.done(f"Write-in contributions z·⟨W_down, u_y⟩ of the {n} top selected neurons to the answer "
                   f"direction for this input, base vs steered model.")


def layer_sums(base, steered) -> Chart:
    """Per-layer sums `[layers]` of the selected neurons' contributions, base vs steered."""
    base = as_array(base, "base", 1)
    steered = as_array(steered, "steered", 1)
    if steered.shape != base.shape:
        raise ValueError(f"steered must have the shape of base {tuple(base.shape)}, got {tuple(steered.shape)}")
    n = len(base)
    both = np.concatenate([base, steered, [0.0]])
    ylim = _padded(float(both.min()), float(both.max()))
    xlim = _padded(0.0, n - 1.0)
    ax = _Axes(*_size(6.0, 4.0), title="Contributions per layer", xlabel="layer", ylabel="sum of contributions",
               xlim=xlim, ylim=ylim, xticks=_index_ticks(n), yticks=_numeric_ticks(*ylim))
    ax.hline(0.0)
    layers = np.arange(n)
    ax.line(layers, base, BASE_COLOUR, "o")
    ax.line(layers, steered, STEERED_COLOUR, "s")
    ax.legend([("base", BASE_COLOUR, "o"), ("steered", STEERED_COLOUR, "s")],
              [ax.px(x, y) for values in (base, steered) for x, y in zip(layers, values)])
    return ax.done("Sum over each layer of the selected neurons' write-in contributions to the answer, base vs "
                   "steered model.")


def strength_sweep(factors, values, *, current: float | None = None, ylabel: str = "gold answer log-prob") -> Chart:
    """`values [k]` against the scaling `factors [k]` (sorted by factor), factor 1 dashed, `current` dotted and starred."""
    factors = as_array(factors, "factors", 1)
    values = as_array(values, "values", 1)
    if values.shape != factors.shape:
        raise ValueError(f"values must have one entry per factor ({len(factors)}), got {len(values)}")
    if current is not None and not math.isfinite(float(current)):
        raise ValueError(f"current must be a finite number, got {current!r}")
    order = np.argsort(factors, kind="stable")
    xs, ys = factors[order], values[order]
    xlim = _padded(min(float(xs[0]), 1.0, current if current is not None else 1.0),
                   max(float(xs[-1]), 1.0, current if current is not None else 1.0))
    ylim = _padded(float(ys.min()), float(ys.max()), 0.08)
    ax = _Axes(*_size(6.0, 4.0), title="Steering strength", xlabel="scaling factor on the selected neurons",
               ylabel=ylabel, xlim=xlim, ylim=ylim, xticks=_numeric_ticks(*xlim), yticks=_numeric_ticks(*ylim))
    ax.vline(1.0, GREY, 1.0, dash=5)
    entries = [(ylabel, BASE_COLOUR, "o"), ("unchanged (×1)", GREY, "--")]
    points = [ax.px(x, y) for x, y in zip(xs, ys)]
    if current is not None:
        current = float(current)
        ax.vline(current, CURRENT_COLOUR, 1.5, dash=2)
        entries.append((f"current (×{current:g})", CURRENT_COLOUR, ":"))
    ax.line(xs, ys, BASE_COLOUR, "o")
    if current is not None and xs[0] <= current <= xs[-1]:
        ax.marker(ax.px(current, float(np.interp(current, xs, ys))), "*", CURRENT_COLOUR, size=9)
    ax.legend(entries, points)
    caption = (f"{ylabel[:1].upper()}{ylabel[1:]} as the selected neurons are scaled by each factor; "
               f"the dashed line marks factor 1 (unchanged)"
               + (f", the dotted line the current factor ×{current:g}." if current is not None else "."))
    return ax.done(caption)


__all__ = ["Chart", "head_heatmap", "overlap_matrix", "layer_distribution", "contributions", "layer_sums",
           "strength_sweep", "nice_ticks"]
