"""HONES Space: base vs steered answers of a vision-language model, side by side.

Layout and wiring only; everything shown is computed by `hones_core.demo`.

    python app.py                       # bundled toy VLM + bundled rankings, offline
    HONES_MODEL=HuggingFaceTB/SmolVLM-256M-Instruct HONES_RANKINGS=you/hones-smolvlm python app.py
    python app.py --help

Start-up checks what it can before anything heavy loads: arguments and environment
variables are parsed (and `--help` answered) before torch and gradio are imported, and the
port and the examples folder are checked before the model loads. Every start-up problem
ends with one paragraph on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:   # ZeroGPU: `spaces` must be imported before anything touches CUDA
    import spaces
except ImportError:
    spaces = None

from hones_core.assets import DEFAULT_EXAMPLES, DEFAULT_MODEL, DEFAULT_RANKINGS
from hones_core.tasks import TASKS

LOG = logging.getLogger("hones.app")
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_CONCURRENCY = "127.0.0.1", 7860, 4

PLOT_TITLES = {"heads": "Head scores", "layers": "Where the selected neurons are",
               "contributions": "Top neuron contributions (this input)", "layer_sums": "Contributions per layer",
               "overlap": "Cross-task overlap", "sweep": "Steering strength"}
TABLE_HEADERS = ["base rank", "steered rank", "candidate", "base margin", "steered margin", "Δ margin"]
TABLE_WIDTHS = ["10%", "11%", "42%", "12%", "13%", "12%"]   # of the table's width: all six fit at 1 400 px
GOLD_LABELS = {"vqa": "Gold answer (optional)", "ocr": "Gold text (optional)",
               "caption": "Reference caption (optional)", "retrieval": "True caption (optional)"}
GOLD_INFO = "Scored against both answers when given. Retrieval: one of the candidates, copied exactly."
STALE = "_Not computed: the last request failed._"
STORED_TITLES = {"budget": "Relative drop against budget (stored)", "cross": "Cross-ablation (stored)"}
INTRO = """# HONES: heads → neurons → steering
Pick a task and an example (or upload an image), choose which FFN neurons to scale and by how much, and press
**Run**. The base model and the steered model (the selected neurons' activations × the factor) answer side by
side; the plots show which heads the task depends on, which neurons were chosen, and what they write towards the
answer for this input."""
CSS = """
#ranking table { table-layout: auto; }
#ranking th, #ranking td { white-space: normal; word-break: normal; overflow-wrap: normal; }
"""


class StartupError(Exception):
    """The app cannot start; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------- configuration


def _port(text: str) -> int:
    try:
        port = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give an integer from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number; give an integer from 1 to 65535")
    return port


def _positive(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} requests at a time cannot serve anyone; give 1 or more")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, else environment variables, else defaults; a bad value exits with code 2 and its name."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        description="Serve the HONES app (base vs steered answers with attribution plots). Every flag can also be "
                    "set by the environment variable named in [].",
)
    p.add_argument("--model", default=env("HONES_MODEL", DEFAULT_MODEL),
                   help=f"[HONES_MODEL] Hub model id or local directory (default: the bundled toy VLM, {DEFAULT_MODEL})")
    p.add_argument("--rankings", default=env("HONES_RANKINGS", DEFAULT_RANKINGS),
                   help=f"[HONES_RANKINGS] Hub dataset repo or local folder with the rankings artifact (default: the "
                        f"bundled toy-VLM rankings, {DEFAULT_RANKINGS})")
    p.add_argument("--revision", default=env("HONES_REVISION"),
                   help="[HONES_REVISION] revision (branch, tag, commit) for both the model and the rankings repo; "
                        "unset: each repo's default branch")
    p.add_argument("--model-revision", default=env("HONES_MODEL_REVISION"),
                   help="[HONES_MODEL_REVISION] model revision (overrides --revision)")
    p.add_argument("--rankings-revision", default=env("HONES_RANKINGS_REVISION"),
                   help="[HONES_RANKINGS_REVISION] rankings revision (overrides --revision)")
    p.add_argument("--allow-other-model", action="store_true",
                   default=env("HONES_ALLOW_OTHER_MODEL", "").strip().lower() in ("1", "true", "yes"),
                   help="[HONES_ALLOW_OTHER_MODEL=1] use rankings computed for another Hub model of the same shapes "
                        "(e.g. the base model of a fine-tune); every result says so (default: refuse)")
    p.add_argument("--examples", default=env("HONES_EXAMPLES", str(DEFAULT_EXAMPLES)),
                   help=f"[HONES_EXAMPLES] folder with examples.json and its images (default: {DEFAULT_EXAMPLES})")
    p.add_argument("--device", default=env("HONES_DEVICE"),
                   help="[HONES_DEVICE] cpu, cuda, cuda:1, ...; unset: CUDA when available, else cpu")
    p.add_argument("--host", default=env("HONES_HOST", env("GRADIO_SERVER_NAME", DEFAULT_HOST)),
                   help=f"[HONES_HOST, GRADIO_SERVER_NAME] address to listen on; 0.0.0.0 for all interfaces "
                        f"(default: {DEFAULT_HOST})")
    p.add_argument("--port", type=_port, default=None,
                   help=f"[HONES_PORT, GRADIO_SERVER_PORT] port (default: {DEFAULT_PORT})")
    p.add_argument("--no-autorun", dest="autorun", action="store_false",
                   default=env("HONES_AUTORUN", "1").strip().lower() not in ("0", "false", "no"),
                   help="[HONES_AUTORUN=0] open the page without running the default example (a share link still "
                        "runs its request); for deployments where every run is costly (default: run it)")
    p.add_argument("--concurrency", type=_positive, default=None,
                   help=f"[HONES_CONCURRENCY] requests processed at the same time (default: {DEFAULT_CONCURRENCY})")
    args = p.parse_args(argv)
    for attr, names, convert, default in (("port", ("HONES_PORT", "GRADIO_SERVER_PORT"), _port, DEFAULT_PORT),
                                          ("concurrency", ("HONES_CONCURRENCY",), _positive, DEFAULT_CONCURRENCY)):
        if getattr(args, attr) is not None:
            continue
        name = next((n for n in names if env(n) not in (None, "")), None)
        if name is None:
            setattr(args, attr, default)
            continue
        try:
            setattr(args, attr, convert(env(name)))
        except argparse.ArgumentTypeError as err:
            p.error(f"{name}={env(name)!r}: {err} (or unset it; --{attr} overrides it)")
    return args


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, before the model loads (gradio would fail only after it)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise StartupError(
            f"port {port} on {host} is not free ({err.strerror or err}): another program (maybe another copy of "
            f"this app) is listening there. Stop it, or pick another port with --port N or HONES_PORT=N.") from None


def check_examples(folder: str | Path):
    """The examples of a folder, read before the model loads.

    Raises:
        StartupError: the folder is missing, unreadable, or its examples.json is malformed.
    """
    from hones_core.data import DataFormatError
    from hones_core.demo.examples import read_gallery

    path = Path(folder).expanduser()
    where = "set --examples / HONES_EXAMPLES to a folder holding examples.json and its images"
    if not path.is_dir():
        raise StartupError(f"the examples folder {path} does not exist (or is not a folder): {where}, "
                           f"or leave it unset for the bundled examples.")
    try:
        return read_gallery(path)
    except PermissionError as err:
        raise StartupError(f"the examples folder {path} cannot be read ({err.strerror}: {err.filename}): make it "
                           f"readable by this user, or {where}.") from None
    except DataFormatError as err:
        raise StartupError(f"the examples file is malformed: {err}. Fix it (format in README, 'Examples gallery') "
                           f"or {where}.") from None


def load_service(args: argparse.Namespace):
    from hones_core.demo import DemoService

    return DemoService.load(args.model, args.rankings, model_revision=args.model_revision or args.revision,
                            rankings_revision=args.rankings_revision or args.revision, device=args.device,
                            allow_other_model=args.allow_other_model)


# --------------------------------------------------------------------------- the page


def _on_gpu(fn):
    """`spaces.GPU` on ZeroGPU; unchanged everywhere else."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


# What each task asks for beside the image (`TASKS[task].input`): the textbox, and how an
# examples.json entry fills it. Tasks whose input is None (captioning) get no textbox.
INPUT_WIDGETS = {
    "question": dict(label="Question", max_lines=3, elem_id="question", placeholder="What color is the circle?"),
    "box": dict(label="Text box x, y, w, h in pixels (optional; drawn in blue)", placeholder="42, 64, 41, 21",
                elem_id="bbox"),
    "candidates": dict(label="Candidate captions, one per line (2–10)", lines=5, elem_id="candidates"),
}
EXAMPLE_FIELDS = {
    "question": lambda entry: entry.get("question", ""),
    "box": lambda entry: ", ".join(str(v) for v in entry.get("bbox", [])),
    "candidates": lambda entry: "\n".join(entry.get("candidates", [])),
}


def _example_row(task: str, entry: dict) -> list:
    """An examples.json entry as the values of [image, task input (if the task has one), gold]."""
    kind = TASKS[task].input
    extra = [EXAMPLE_FIELDS[kind](entry)] if kind in EXAMPLE_FIELDS else []
    return [entry["image"], *extra, entry.get("answer", "")]


def _raw(component):
    """Hand the component's raw payload to the handler: `hones_core.demo` validates it with our messages.

    `gr.Image` would open every upload with PIL first (a non-image or a decompression bomb would
    fail there with PIL's text); `gr.Slider` / `gr.Number` would reject a non-number with an
    empty message. (Set on the instance: a subclass of a gradio component makes gradio write a
    .pyi file next to this one.)
    """
    component.preprocess = lambda payload: payload
    return component


def image_path_input(**kwargs):
    """A `gr.Image` upload whose handler receives the uploaded file's path unopened."""
    import gradio as gr

    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = lambda payload: None if payload is None else str(payload.path)
    return component


@dataclass
class Page:
    """The components `build_app` wires: the request's inputs and everything a result fills."""
    task: Any
    image: Any
    task_inputs: dict                 # TASKS[...].input kind -> textbox (hidden where the task is unavailable)
    gold: Any
    factor: Any
    budget: Any
    method: Any
    run: Any
    tabs: dict                        # available task -> its tab
    base_answer: Any = None
    steered_answer: Any = None
    summary: Any = None
    table: Any = None
    plot_images: dict = field(default_factory=dict)
    plot_captions: dict = field(default_factory=dict)
    download: Any = None
    last: Any = None
    app: Any = None
    tabs_box: Any = None              # the gr.Tabs holding the task tabs
    evidence: Any = None              # the stored evaluation's line for this set and budget
    stored_images: dict = field(default_factory=dict)     # "budget" / "cross" -> gr.Image
    stored_captions: dict = field(default_factory=dict)
    share: Any = None
    share_link: Any = None
    share_note: Any = None
    page_url: Any = None
    task_default: str = ""
    views: dict = field(default_factory=dict)        # "heads" / "neuron" / "tokens" -> their components

    @property
    def inputs(self) -> list:
        return [self.task, self.image, *[self.task_inputs[k] for k in INPUT_WIDGETS], self.gold, self.factor,
                self.budget, self.method]

    def outputs(self, keys: list[str]) -> list:
        return [self.base_answer, self.steered_answer, self.summary, self.table, *[self.plot_images[k] for k in keys],
                *[self.plot_captions[k] for k in keys], self.download, self.last, self.evidence]

    @property
    def stored_outputs(self) -> list:
        return [*self.stored_images.values(), *self.stored_captions.values()]


def _task_tabs(service, gallery, image, gold, first: str) -> tuple[dict, dict, Any]:
    """One tab per task (greyed out with the reason where the rankings lack it), its input box and examples.

    A chosen gallery's badge says how often masking changed the task's answers on its fresh split.
    """
    import gradio as gr

    from hones_core.demo.examples import gallery_badge

    examples = gallery.examples
    available, unavailable = service.tasks, service.unavailable()
    boxes, tabs = {}, {}
    with gr.Tabs(selected=first) as tabs_box:
        for name, spec in TASKS.items():
            with gr.Tab(spec.title if name in available else f"{spec.title} (unavailable)", id=name,
                        interactive=name in available, elem_id=f"tab-{name}") as tab:
                if name not in available:
                    gr.Markdown(f"Not available: {unavailable[name]}.")
                    continue
                tabs[name] = tab
                if spec.input in INPUT_WIDGETS:
                    boxes[spec.input] = gr.Textbox(**INPUT_WIDGETS[spec.input])
                else:
                    gr.Markdown(f"{spec.title} needs no extra input.")
                rows = examples.get(name, [])
                badge = gallery_badge(name, gallery)
                if badge:
                    gr.Markdown(f"_{badge}_", elem_id=f"badge-{name}")
                if rows:
                    extra = [boxes[spec.input]] if spec.input in boxes else []
                    gallery_rows = gr.Examples([_example_row(name, e) for e in rows], inputs=[image, *extra, gold],
                                               label=f"{spec.title} examples", examples_per_page=8)
                    # the gold box is shared by the tabs (its label follows the tab): name this task's column
                    gallery_rows.dataset.headers = [*gallery_rows.dataset.headers[:-1], GOLD_LABELS[name]]
    return boxes, tabs, tabs_box


def _input_column(service, gallery) -> Page:
    """The left column: image, task tabs, gold answer, factor, budget, neuron set, Run."""
    import gradio as gr

    from hones_core.demo import FACTOR_MAX, FACTOR_MIN

    first = default_task(service, gallery)
    image = image_path_input(label="Image", height=260, sources=["upload", "clipboard"], elem_id="image")
    gold = gr.Textbox(label=GOLD_LABELS[first], info=GOLD_INFO, elem_id="gold", render=False)
    boxes, tabs, tabs_box = _task_tabs(service, gallery, image, gold, first)
    gold.render()
    owner = {spec.input: name for name, spec in TASKS.items()}    # a hidden box keeps the API's parameter names
    task_inputs = {kind: boxes.get(kind) or gr.Textbox(visible=False, label=f"{owner[kind]} input")
                   for kind in INPUT_WIDGETS}
    factor = _raw(gr.Slider(FACTOR_MIN, FACTOR_MAX, value=0.0, step=0.05,
                            label="Scaling factor (1 = unchanged, 0 = neurons masked)", elem_id="factor"))
    budget = _raw(gr.Number(value=1.0, label="Neuron budget (% of all FFN neurons, top of the ranking)",
                            elem_id="budget"))
    method = gr.Dropdown(choices=service.methods(first), value="hones", label="Neuron set", elem_id="method")
    run = gr.Button("Run", variant="primary", elem_id="run")
    page = Page(None, image, task_inputs, gold, factor, budget, method, run, tabs, tabs_box=tabs_box,
                task_default=first)
    with gr.Row(equal_height=True):
        page.share = gr.Button("Share link", size="sm", elem_id="share", scale=0, min_width=120)
        page.share_link = gr.Textbox(show_label=False, placeholder="press Share link for a URL reproducing this "
                                     "request", elem_id="share-link", buttons=["copy"], scale=4, interactive=False)
    page.share_note = gr.Markdown(elem_id="share-note")
    page.page_url = gr.Textbox(visible=False, label="page url")
    return page


def _output_column(page: Page, service) -> None:
    """The right column: both answers, the summary, the retrieval table, the plots, the download."""
    import gradio as gr

    from hones_core.demo import PLOTS

    with gr.Row():
        page.base_answer = gr.HighlightedText(label="Base model", elem_id="base-answer",
                                              color_map={"removed": "#f4a6a6"}, show_legend=False)
        page.steered_answer = gr.HighlightedText(label="Steered model", elem_id="steered-answer",
                                                 color_map={"added": "#a6e3b8"}, show_legend=False)
    page.summary = gr.Markdown(label="Summary", elem_id="summary")
    page.evidence = gr.Markdown(label="Held-out evidence", elem_id="evidence")
    page.table = gr.Dataframe(headers=TABLE_HEADERS, visible=False, interactive=False, wrap=True,
                              column_widths=TABLE_WIDTHS, label="Candidates ranked by Yes−No margin",
                              elem_id="ranking")
    for i in range(0, len(PLOTS), 2):
        with gr.Row():
            for key in PLOTS[i:i + 2]:
                with gr.Column(min_width=260):
                    # no label badge or buttons: they would cover the figure's title and legend
                    page.plot_images[key] = gr.Image(label=PLOT_TITLES[key], show_label=False, type="pil",
                                                     interactive=False, elem_id=f"plot-{key}", buttons=[])
                    page.plot_captions[key] = gr.Markdown(label=f"{PLOT_TITLES[key]} (caption)",
                                                          elem_id=f"caption-{key}")
    with gr.Accordion("Stored evaluation: masking on held-out items, every method and budget", open=False,
                      elem_id="stored"):
        with gr.Row():
            for key, title in STORED_TITLES.items():
                with gr.Column(min_width=260):
                    page.stored_images[key] = gr.Image(label=title, show_label=False, type="pil", interactive=False,
                                                       elem_id=f"stored-{key}", buttons=[])
                    page.stored_captions[key] = gr.Markdown(label=f"{title} (caption)", elem_id=f"stored-{key}-caption")
    _view_accordions(page, service)
    page.download = gr.File(label="Download results (JSON)", elem_id="download")


def _view_accordions(page: Page, service) -> None:
    """The views computed only when opened: where the heads look, a neuron's card, every answer token."""
    import gradio as gr

    first = page.task_default
    with gr.Accordion("Where the heads look: attention of the last prompt position over the image", open=False,
                      elem_id="view-heads") as box:
        pick = gr.Dropdown(choices=service.head_choices(first), value=None, allow_custom_value=True,
                           label="Head: the task's top heads, best first (or type layer, head)", elem_id="head-pick")
        image = gr.Image(show_label=False, type="pil", interactive=False, elem_id="head-image", buttons=[],
                         label="Where the head looks")
        caption = gr.Markdown(elem_id="head-caption", label="Where the head looks (caption)")
    page.views["heads"] = dict(box=box, pick=pick, outputs=[image, caption])
    with gr.Accordion("Neuron card: what one neuron writes, how active it is, its ranks, masking it alone",
                      open=False, elem_id="view-neuron") as box:
        pick = gr.Dropdown(choices=[], value=None, allow_custom_value=True, elem_id="neuron-pick",
                           label="Neuron: this request's largest contributions among the selected (or type L3·n120)")
        card = gr.Markdown(elem_id="neuron-card", label="Neuron card")
    page.views["neuron"] = dict(box=box, pick=pick, outputs=[card, pick])
    with gr.Accordion("Every answer token: log-probs under the base and the steered model", open=False,
                      elem_id="view-tokens") as box:
        table = gr.Markdown(elem_id="answer-tokens", label="Answer tokens")
    page.views["tokens"] = dict(box=box, pick=None, outputs=[table])


def build_app(service, examples_dir: str | None = None, examples=None, *, autorun: bool = True):
    """The page: layout (`_input_column`, `_output_column`), then the events (`_wire`).

    Opening the page fills in the default tab's first example and runs it (`autorun`), or the
    request of a share link's query parameters (`hones_core.demo.share`).
    """
    import gradio as gr

    from hones_core.demo.examples import Gallery, read_gallery

    gallery = examples if isinstance(examples, Gallery) else \
        read_gallery(examples_dir or DEFAULT_EXAMPLES) if examples is None else Gallery(examples)
    examples = gallery.examples
    with gr.Blocks(title="HONES: heads → neurons → steering") as app:
        gr.Markdown(INTRO)
        task = gr.Textbox(default_task(service, gallery), visible=False, label="task",
                          elem_id="task")   # the tab; an API input
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                page = _input_column(service, gallery)
            with gr.Column(scale=3, min_width=420):
                _output_column(page, service)
        page.task, page.last, page.app = task, gr.State(None), app
        _wire(service, page, gallery, autorun=autorun)
    return app


def default_task(service, gallery) -> str:
    """The tab the page opens on: the gallery's `default_task`, else the first task whose first example changes.

    (A chosen gallery's `examples.json` names the task with the most changed answers beyond random,
    and marks each example with `"changes"`: whether masking the HONES neurons at the default budget
    changes its answer; see `hones_core.toy.examples`.) Else the first task.
    """
    if gallery.default_task in service.tasks:
        return gallery.default_task
    for task in service.tasks:
        rows = gallery.examples.get(task) or []
        if rows and rows[0].get("changes"):
            return task
    return service.tasks[0]


def _example_values(task: str, entry: dict) -> dict:
    """The page's input values an examples.json entry fills: image, the task's typed input, gold."""
    kind = TASKS[task].input
    values = {"image": entry["image"], "gold": entry.get("answer", "")}
    if kind in EXAMPLE_FIELDS:
        values[kind] = EXAMPLE_FIELDS[kind](entry)
    return values


def _wire(service, page: Page, gallery, *, autorun: bool = True) -> None:
    """Every event of the page, each with an api_name: run, sweep, slider moves, tab changes, share, page load."""
    import gradio as gr

    from hones_core.demo import PLOTS, DemoInputError, write_results
    from hones_core.demo.share import INPUT_PARAM, ShareIndex, make_link, parse_link

    results_dir = tempfile.mkdtemp(prefix="hones-results-")
    compute, compute_sweep = _on_gpu(service.compute), _on_gpu(service.compute_sweep)
    examples = gallery.examples
    index = ShareIndex(examples)
    keys = [k for k in PLOTS if k != "sweep"]
    inputs, outputs = page.inputs, page.outputs(keys)
    sweep_outputs = [page.plot_images["sweep"], page.plot_captions["sweep"], page.download]
    cleared_outputs = [*outputs, page.plot_images["sweep"], page.plot_captions["sweep"]]

    def request(task_, image_, question_, bbox_, candidates_, gold_, factor_, budget_, method_):
        return service.request(task=task_, image=image_, question=question_, bbox=bbox_, candidates=candidates_,
                               gold=gold_, factor=factor_, budget_pct=budget_, method=method_)

    def on_run(*values):
        try:
            req = request(*values)
            out = service.run(req, compute=compute)
        except DemoInputError as err:
            LOG.info("rejected input: %s", str(err).replace("\n", " "))   # one line; no traceback for bad input
            raise gr.Error(str(err), title="Cannot run this request", print_exception=False) from None
        for note in out.warnings:
            gr.Warning(note)
        images = [out.plots[k][0] if k in out.plots else None for k in keys]
        captions = [out.plots[k][1] if k in out.plots else "_Not available for this input._" for k in keys]
        table_update = gr.Dataframe(value=out.table, visible=True) if out.table is not None else \
            gr.Dataframe(value=None, visible=False)
        path = write_results(out.results, results_dir)
        evidence = service.evidence_line(req.task, req.method, req.budget_pct)
        return [out.base_answer, out.steered_answer, out.summary, table_update, *images, *captions, str(path),
                out.results, evidence]

    def on_sweep(results, *values):
        try:
            image_, caption, factors, curve = service.sweep(request(*values), compute=compute,
                                                            compute_sweep=compute_sweep)
        except DemoInputError as err:
            LOG.info("sweep not drawn: %s", str(err).replace("\n", " "))
            return None, f"_{err}_", gr.skip()
        path = write_results({**(results or {}), "sweep": {"factors": factors, "values": curve}}, results_dir)
        return image_, caption, str(path)

    def on_slider(results, *values):
        """A slider move re-runs a request already shown; before the first Run it does nothing."""
        return [gr.skip()] * len(outputs) if results is None else on_run(*values)

    def on_slider_sweep(results, *values):
        """Before any Run there is nothing to sweep either."""
        return [gr.skip()] * len(sweep_outputs) if results is None else on_sweep(results, *values)

    def cleared(note: str) -> list:
        """Values for `cleared_outputs`: nothing from an earlier request stays on screen."""
        return [None, None, note, gr.Dataframe(value=None, visible=False), *[None] * len(keys),
                *[note] * len(keys), None, None, "", None, note]

    def on_failure():
        """An error leaves nothing from the previous request on screen that looks current."""
        return cleared(STALE)

    def stored_values(name: str) -> list:
        """The stored evaluation's figures for task `name` (drawn once per task), images then captions."""
        figures = service.evidence_figures(name)
        none = "_This artifact stores no held-out evaluation for this task._"
        return [*[f[0] if f else None for f in figures.values()], *[f[1] if f else none for f in figures.values()]]

    for name in service.tasks:       # drawn now, once: a tab change must answer at once (a slow one loses clicks)
        service.evidence_figures(name)

    def on_task(name):
        """A new tab starts clean: its own gold answer, neuron sets, and no result of another task."""
        return [name, gr.Dropdown(choices=service.methods(name), value="hones"),
                gr.Textbox(value="", label=GOLD_LABELS.get(name, GOLD_LABELS["vqa"])), *cleared(""),
                *stored_values(name), gr.Dropdown(choices=service.head_choices(name), value=None), None, "",
                "", gr.Dropdown(choices=[], value=None), ""]

    def on_share(task_, image_, question_, bbox_, candidates_, gold_, factor_, budget_, method_, url_):
        """A URL reproducing the inputs on the page (`hones_core.demo.share`), and what it does not carry."""
        try:
            link = make_link(index, task=task_, image=image_,
                             texts={"question": question_, "bbox": bbox_, "candidates": candidates_, "gold": gold_},
                             method=method_, budget=budget_, factor=factor_)
        except (TypeError, ValueError) as err:
            return "", f"_No link: {err}. Fix the inputs first._"
        return (url_ or "") + link.query, f"_{link.note}_"

    def on_load(req):
        """Open on a share link's request, else on the default tab's first example; then run it."""
        params = dict(req.query_params) if req is not None else {}
        first = default_task(service, gallery)
        skip = [gr.skip()] * (len(load_outputs) - 1 - len(page.stored_outputs))
        try:
            shared = parse_link(params, index, service.tasks)
        except DemoInputError as err:
            return [*skip, *stored_values(first), f"_This link cannot be opened: {err}_"]
        if shared is None:
            task_ = first
            rows = examples.get(task_) or []
            if not rows or not autorun:
                return [*skip, *stored_values(first), ""]
            values = _example_values(task_, rows[0])
            factor_, budget_, method_ = 0.0, 1.0, "hones"
            note = ""
        else:
            task_ = shared.task
            values = {}
            if shared.example:
                ex_task, entry = index.by_id[shared.example]
                values = _example_values(ex_task, entry) if ex_task == task_ else {"image": entry["image"]}
            for kind, param in INPUT_PARAM.items():
                if param in shared.texts:
                    values[kind] = shared.texts[param]
            if "gold" in shared.texts:
                values["gold"] = shared.texts["gold"]
            factor_, budget_ = shared.factor or 0.0, shared.budget or 1.0
            method_ = shared.method or "hones"
            note = "" if shared.example else "_This link carries no image: upload one, then press Run._"
        methods = [k for _, k in service.methods(task_)]
        return [gr.Tabs(selected=task_), task_, values.get("image"),
                *[values.get(kind, "") for kind in INPUT_WIDGETS],
                gr.Textbox(value=values.get("gold", ""), label=GOLD_LABELS.get(task_, GOLD_LABELS["vqa"])),
                factor_, budget_,
                gr.Dropdown(choices=service.methods(task_), value=method_ if method_ in methods else "hones"),
                *stored_values(task_), note]

    on_load.__annotations__["req"] = gr.Request     # gradio passes the request by this hint (a class, not a string)

    tab_outputs = [page.task, page.method, page.gold, *cleared_outputs, *page.stored_outputs,
                   page.views["heads"]["pick"], *page.views["heads"]["outputs"], *page.views["neuron"]["outputs"],
                   *page.views["tokens"]["outputs"]]
    for name, tab in page.tabs.items():
        # a tab selected by the page itself (opening a share link sets the task first) keeps what was filled in
        tab.select(lambda current, n=name: [gr.skip()] * len(tab_outputs) if current == n else on_task(n),
                   inputs=page.task, outputs=tab_outputs, queue=False, show_progress="hidden",
                   api_name=f"select_{name}", api_visibility="private")
    run_event = page.run.click(on_run, inputs, outputs, api_name="run", concurrency_id="model")
    run_event.success(on_sweep, [page.last, *inputs], sweep_outputs, api_name="sweep", concurrency_id="model")
    run_event.failure(on_failure, None, cleared_outputs, api_name="clear_after_error", api_visibility="private",
                      queue=False, show_progress="hidden")
    # moving only the slider re-runs only the steered row (the base result is cached)
    slider_event = page.factor.release(on_slider, [page.last, *inputs], outputs, api_name="slider",
                                       api_visibility="private", concurrency_id="model", trigger_mode="always_last")
    slider_event.success(on_slider_sweep, [page.last, *inputs], sweep_outputs, api_name="slider_sweep",
                         api_visibility="private", concurrency_id="model")
    slider_event.failure(on_failure, None, cleared_outputs, api_name="clear_after_slider_error",
                         api_visibility="private", queue=False, show_progress="hidden")
    # the page URL comes from the browser (the server cannot know the address a proxy serves it at)
    page.share.click(on_share, [*inputs, page.page_url], [page.share_link, page.share_note], api_name="share",
                     queue=False, js="(...args) => [...args.slice(0, -1), window.location.origin + "
                                     "window.location.pathname]")
    # ----- the views computed only when opened: an accordion's state says whether it is open
    head_view, neuron_view, tokens_view = (_on_gpu(service.head_view), _on_gpu(service.neuron_view),
                                           _on_gpu(service.tokens_view))
    open_state = {name: gr.State(False) for name in page.views}
    picks = [page.views["heads"]["pick"], page.views["neuron"]["pick"]]
    view_outputs = [o for name in page.views for o in page.views[name]["outputs"]]

    def view_values(name: str, values: list, pick) -> list:
        """One view's output values for the page's inputs (a message in the view for bad input)."""
        try:
            req = request(*values)
            if name == "heads":
                return list(head_view(req, pick or None))
            if name == "neuron":
                card, shown = neuron_view(req, pick or None)      # no pick: the plot's first neuron
                return [card, gr.Dropdown(choices=service.neuron_choices(req), value=shown)]
            return [tokens_view(req)]
        except DemoInputError as err:
            LOG.info("%s view not drawn: %s", name, str(err).replace("\n", " "))
            note = f"_Not computed: {err}_"
            return {"heads": [None, note], "neuron": [note, gr.skip()], "tokens": [note]}[name]

    def on_views(heads_open, neuron_open, tokens_open, *values):
        """After a run: recompute the open views for the new request; closed ones stay closed and cost nothing."""
        *values, head_pick, neuron_pick = values
        out = []
        for name, is_open, pick in (("heads", heads_open, head_pick), ("neuron", neuron_open, neuron_pick),
                                    ("tokens", tokens_open, None)):
            size = len(page.views[name]["outputs"])
            out += view_values(name, values, pick) if is_open else [gr.skip()] * size
        return out

    for name, view in page.views.items():
        outputs_ = view["outputs"]
        extra = [view["pick"]] if view["pick"] is not None else []

        def on_open(*values, name=name, has_pick=bool(extra)):
            *values, pick = values if has_pick else (*values, None)
            return [True, *view_values(name, values, pick)]

        view["box"].expand(on_open, [*inputs, *extra], [open_state[name], *outputs_], api_name=f"{name}_view",
                           concurrency_id="model")
        view["box"].collapse(lambda: False, None, open_state[name], api_name=f"{name}_close",
                             api_visibility="private", queue=False, show_progress="hidden")
        if extra:
            view["pick"].input(lambda *v, name=name: view_values(name, list(v[:-1]), v[-1]), [*inputs, *extra],
                               outputs_, api_name=f"{name}_pick", api_visibility="private", concurrency_id="model")
    for i, event in enumerate((run_event, slider_event)):
        event.success(on_views, [*open_state.values(), *inputs, *picks], view_outputs,
                      api_name="views" if i == 0 else "slider_views", api_visibility="private",
                      concurrency_id="model")

    load_outputs = [page.tabs_box, page.task, page.image, *[page.task_inputs[k] for k in INPUT_WIDGETS], page.gold,
                    page.factor, page.budget, page.method, *page.stored_outputs, page.share_note]
    loaded = page.app.load(on_load, None, load_outputs, api_name="open", api_visibility="private", queue=False,
                           show_progress="hidden")
    # then Run, as if clicked (the same events as a click: answers, sweep, open views) when an image is there
    loaded.then(None, [page.image], None, js="(image) => { if (image) document.querySelector('#run').click(); }",
                api_name="open_run", api_visibility="private", queue=False)


# --------------------------------------------------------------------------- start-up


def start(args: argparse.Namespace):
    """Check, load and launch; every start-up problem raises `StartupError`."""
    check_port(args.host, args.port)
    examples = check_examples(args.examples)
    from hones_core.demo import DemoConfigError, check_device

    try:
        check_device(args.device)
        import gradio as gr  # noqa: F401  (after the cheap checks: gradio takes seconds to import)

        service = load_service(args)
    except DemoConfigError as err:
        raise StartupError(str(err)) from None
    app = build_app(service, args.examples, examples=examples, autorun=args.autorun)
    app.queue(default_concurrency_limit=args.concurrency)
    try:
        app.launch(server_name=args.host, server_port=args.port, max_file_size="25mb", show_error=False, css=CSS,
                   allowed_paths=[str(Path(args.examples).expanduser().resolve())])
    except OSError as err:   # the port was taken while the model loaded
        raise StartupError(f"could not listen on {args.host}:{args.port} ({err}); pick another port with --port N "
                           f"or HONES_PORT=N.") from None
    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        start(args)
    except StartupError as err:
        print(f"The HONES app cannot start: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
