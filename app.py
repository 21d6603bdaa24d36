"""HONES Space: base vs steered answers of a vision-language model, side by side.

Layout and wiring only; everything shown is computed by `hones_core.demo`.

    python app.py                       # bundled toy VLM + bundled rankings, offline
    HONES_MODEL=HuggingFaceTB/SmolVLM-256M-Instruct HONES_RANKINGS=you/hones-smolvlm python app.py
    python app.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

try:   # ZeroGPU: `spaces` must be imported before anything touches CUDA
    import spaces
except ImportError:
    spaces = None

import gradio as gr

from hones_core import demo as service_lib
from hones_core.demo import PLOTS, DemoConfigError, DemoInputError, DemoService

PLOT_TITLES = {"heads": "Head scores", "layers": "Where the selected neurons are",
               "contributions": "Top neuron contributions (this input)", "layer_sums": "Contributions per layer",
               "overlap": "Cross-task overlap", "sweep": "Steering strength"}
TABLE_HEADERS = ["base rank", "steered rank", "candidate", "base Yes−No", "steered Yes−No", "Δ"]
INTRO = """# HONES: heads → neurons → steering
Pick a task and an example (or upload an image), choose which FFN neurons to scale and by how much, and press
**Run**. The base model and the steered model (the selected neurons' activations × the factor) answer side by
side; the plots show which heads the task depends on, which neurons were chosen, and what they write towards the
answer for this input."""


def image_path_input(**kwargs) -> gr.Image:
    """A `gr.Image` upload whose handler receives the uploaded file's path unopened.

    `gr.Image` opens every upload with PIL before the handler runs, so a non-image or a
    decompression bomb would fail there with a generic error; `hones_core.demo.open_image`
    opens it with size limits and a clear message instead. (Set on the instance: a subclass
    of a gradio component makes gradio write a .pyi file next to this one.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = lambda payload: None if payload is None else str(payload.path)
    return component


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Serve the HONES app (base vs steered answers with attribution plots). "
                                            "Every flag can also be set by the environment variable named in [].")
    p.add_argument("--model", default=env("HONES_MODEL", service_lib.DEFAULT_MODEL),
                   help="[HONES_MODEL] Hub model id or local directory (default: the bundled toy VLM)")
    p.add_argument("--rankings", default=env("HONES_RANKINGS", service_lib.DEFAULT_RANKINGS),
                   help="[HONES_RANKINGS] Hub dataset repo or local folder with the rankings artifact "
                        "(default: the bundled toy-VLM rankings)")
    p.add_argument("--revision", default=env("HONES_REVISION"),
                   help="[HONES_REVISION] revision (branch, tag, commit) for both the model and the rankings repo")
    p.add_argument("--model-revision", default=env("HONES_MODEL_REVISION"),
                   help="[HONES_MODEL_REVISION] model revision (overrides --revision)")
    p.add_argument("--rankings-revision", default=env("HONES_RANKINGS_REVISION"),
                   help="[HONES_RANKINGS_REVISION] rankings revision (overrides --revision)")
    p.add_argument("--examples", default=env("HONES_EXAMPLES", str(service_lib.DEFAULT_EXAMPLES)),
                   help="[HONES_EXAMPLES] folder with examples.json and its images")
    p.add_argument("--device", default=env("HONES_DEVICE"), help="[HONES_DEVICE] cpu, cuda, ... (default: auto)")
    p.add_argument("--host", default=env("HONES_HOST", env("GRADIO_SERVER_NAME", "127.0.0.1")),
                   help="[HONES_HOST] address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=int(env("HONES_PORT", env("GRADIO_SERVER_PORT", "7860"))),
                   help="[HONES_PORT] port")
    p.add_argument("--concurrency", type=int, default=int(env("HONES_CONCURRENCY", "4")),
                   help="[HONES_CONCURRENCY] requests processed at the same time")
    return p.parse_args(argv)


def load_service(args: argparse.Namespace) -> DemoService:
    return DemoService.load(args.model, args.rankings, model_revision=args.model_revision or args.revision,
                            rankings_revision=args.rankings_revision or args.revision, device=args.device)


def _on_gpu(fn):
    """`spaces.GPU` on ZeroGPU; unchanged everywhere else."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


def _example_row(task: str, entry: dict) -> list:
    """An examples.json entry as the values of [image, task input, gold]."""
    extra = {"vqa": [entry.get("question", "")], "ocr": [", ".join(str(v) for v in entry.get("bbox", []))],
             "caption": [], "retrieval": ["\n".join(entry.get("candidates", []))]}[task]
    return [entry["image"], *extra, entry.get("answer", "")]


def build_app(service: DemoService, examples_dir: str | None = None) -> gr.Blocks:
    examples = service_lib.read_examples(examples_dir or service_lib.DEFAULT_EXAMPLES)
    results_dir = tempfile.mkdtemp(prefix="hones-results-")
    compute = _on_gpu(service.compute)
    compute_sweep = _on_gpu(service.compute_sweep)
    available, unavailable = service.tasks, service.unavailable()
    first = available[0]

    with gr.Blocks(title="HONES: heads → neurons → steering") as app:
        gr.Markdown(INTRO)
        task = gr.Textbox(first, visible=False, elem_id="task")   # the selected tab; an API input too
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                image = image_path_input(label="Image", height=260, sources=["upload", "clipboard"],
                                  elem_id="image")
                gold = gr.Textbox(label="Gold answer (optional; for retrieval the true caption)", elem_id="gold",
                                  render=False)
                boxes = {}
                with gr.Tabs(selected=first):
                    for name in service_lib.TASKS:
                        title = service_lib.TASK_TITLES[name]
                        with gr.Tab(title if name in available else f"{title} (unavailable)", id=name,
                                    interactive=name in available, elem_id=f"tab-{name}") as tab:
                            if name not in available:
                                gr.Markdown(f"Not available: {unavailable[name]}.")
                                continue
                            if name == "vqa":
                                boxes[name] = gr.Textbox(label="Question", max_lines=3, elem_id="question",
                                                         placeholder="What color is the circle?")
                            elif name == "ocr":
                                boxes[name] = gr.Textbox(label="Text box x, y, w, h in pixels (optional; drawn in "
                                                               "blue)", placeholder="42, 64, 41, 21", elem_id="bbox")
                            elif name == "caption":
                                gr.Markdown("Captioning needs no extra input.")
                            else:
                                boxes[name] = gr.Textbox(label="Candidate captions, one per line (2–10)", lines=5,
                                                         elem_id="candidates")
                            tab.select(lambda n=name: n, outputs=task, queue=False, show_progress="hidden",
                                       api_visibility="private")
                            rows = examples.get(name, [])
                            if rows:
                                extra = [boxes[name]] if name in boxes else []
                                gr.Examples([_example_row(name, e) for e in rows], inputs=[image, *extra, gold],
                                            label=f"{service_lib.TASK_TITLES[name]} examples", examples_per_page=8)
                gold.render()
                hidden = {n: boxes.get(n) or gr.Textbox(visible=False) for n in ("vqa", "ocr", "retrieval")}
                question_box, bbox_box, candidates_box = hidden["vqa"], hidden["ocr"], hidden["retrieval"]
                factor = gr.Slider(service_lib.FACTOR_MIN, service_lib.FACTOR_MAX, value=0.0, step=0.05,
                                   label="Scaling factor (1 = unchanged, 0 = neurons masked)", elem_id="factor")
                budget = gr.Number(value=1.0, label="Neuron budget (% of all FFN neurons, top of the ranking)",
                                   elem_id="budget")
                method = gr.Dropdown(choices=service.methods(first), value="hones", label="Neuron set",
                                     elem_id="method")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=3, min_width=420):
                with gr.Row():
                    base_answer = gr.HighlightedText(label="Base model", elem_id="base-answer",
                                                     color_map={"removed": "#f4a6a6"}, show_legend=False)
                    steered_answer = gr.HighlightedText(label="Steered model", elem_id="steered-answer",
                                                        color_map={"added": "#a6e3b8"}, show_legend=False)
                summary = gr.Markdown(elem_id="summary")
                table = gr.Dataframe(headers=TABLE_HEADERS, visible=False, interactive=False, wrap=True,
                                     label="Candidates ranked by Yes−No margin", elem_id="ranking")
                plot_images, plot_captions = {}, {}
                for i in range(0, len(PLOTS), 2):
                    with gr.Row():
                        for key in PLOTS[i:i + 2]:
                            with gr.Column(min_width=260):
                                plot_images[key] = gr.Image(label=PLOT_TITLES[key], type="pil", interactive=False,
                                                            elem_id=f"plot-{key}", buttons=["download"])
                                plot_captions[key] = gr.Markdown(elem_id=f"caption-{key}")
                download = gr.File(label="Download results (JSON)", elem_id="download")
        last = gr.State(None)

        inputs = [task, image, question_box, bbox_box, candidates_box, gold, factor, budget, method]
        outputs = [base_answer, steered_answer, summary, table,
                   *[plot_images[k] for k in PLOTS if k != "sweep"], *[plot_captions[k] for k in PLOTS if k != "sweep"],
                   download, last]

        def request(task_, image_, question_, bbox_, candidates_, gold_, factor_, budget_, method_):
            return service.request(task=task_, image=image_, question=question_, bbox=bbox_, candidates=candidates_,
                                   gold=gold_, factor=factor_, budget_pct=budget_, method=method_)

        def on_run(task, image, question, bbox, candidates, gold, factor, budget, neuron_set):
            try:
                out = service.run(request(task, image, question, bbox, candidates, gold, factor, budget, neuron_set),
                                  compute=compute)
            except DemoInputError as err:
                raise gr.Error(str(err), title="Cannot run this request") from None
            for note in out.warnings:
                gr.Warning(note)
            keys = [k for k in PLOTS if k != "sweep"]
            images = [out.plots[k][0] if k in out.plots else None for k in keys]
            captions = [out.plots[k][1] if k in out.plots else "_Not available for this input._" for k in keys]
            table_update = gr.Dataframe(value=out.table, visible=True) if out.table is not None else \
                gr.Dataframe(value=None, visible=False)
            path = service_lib.write_results(out.results, results_dir)
            return [out.base_answer, out.steered_answer, out.summary, table_update, *images, *captions, str(path),
                    out.results]

        def on_sweep(results, task, image, question, bbox, candidates, gold, factor, budget, neuron_set):
            try:
                image_, caption, factors, curve = service.sweep(
                    request(task, image, question, bbox, candidates, gold, factor, budget, neuron_set),
                    compute_sweep=compute_sweep)
            except DemoInputError as err:
                gr.Warning(str(err))
                return None, f"_{err}_", gr.skip()
            path = service_lib.write_results({**(results or {}), "sweep": {"factors": factors, "values": curve}}, results_dir)
            return image_, caption, str(path)

        def on_task(name):
            return gr.Dropdown(choices=service.methods(name), value="hones")

        task.change(on_task, task, method, queue=False, show_progress="hidden", api_visibility="private")
        sweep_outputs = [plot_images["sweep"], plot_captions["sweep"], download]
        run.click(on_run, inputs, outputs, api_name="run", concurrency_id="model").success(
            on_sweep, [last, *inputs], sweep_outputs, api_name="sweep", concurrency_id="model")
        # moving only the slider re-runs only the steered row (the base result is cached)
        factor.release(lambda res, *v: on_run(*v) if res is not None else [gr.skip()] * len(outputs),
                       [last, *inputs], outputs, api_visibility="private", concurrency_id="model").success(
            on_sweep, [last, *inputs], sweep_outputs, api_visibility="private", concurrency_id="model")
    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        service = load_service(args)
    except DemoConfigError as err:
        print(f"The HONES app cannot start: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    app = build_app(service, args.examples)
    app.queue(default_concurrency_limit=args.concurrency)
    app.launch(server_name=args.host, server_port=args.port, max_file_size="25mb", show_error=False)


if __name__ == "__main__":
    main()
