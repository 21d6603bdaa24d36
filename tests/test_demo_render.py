"""What a computed request is shown as (`hones_core.demo.render`): answers, summary, plots, results JSON."""

from __future__ import annotations

import json

import numpy as np

import pytest

from hones_core.demo import diff_words, write_results
from hones_core.interventions import Plan

from conftest import ASSETS, demo_request as _request


def test_outputs_plots_results_and_metric(demo_service, examples, tmp_path):
    example = examples["vqa"][0]
    out = demo_service.run(_request(demo_service, example, factor=0.0))
    assert set(out.plots) == {"heads", "layers", "contributions", "layer_sums", "overlap"}
    for image, caption in out.plots.values():
        assert image.size[0] > 100 and caption and "\n" not in caption
    assert "VQA accuracy" in out.summary and "log-prob" in out.summary
    results = json.loads(write_results(out.results, tmp_path).read_text())
    assert results["task"] == "vqa" and results["factor"] == 0.0 and results["gold"] == example["answer"]
    selected = {int(k): v for k, v in results["selected_neurons"].items()}
    assert selected == demo_service.selection("vqa", "hones", 2.0)
    # the gold log-probs are the teacher-forced ones of the two rows
    request = _request(demo_service, example, factor=0.0)
    vlm = demo_service.vlm
    lp = vlm.answer_logprobs([request.image] * 2, [request.prompts[0]] * 2, [example["answer"]] * 2,
                             plans=[Plan(), demo_service.plan(request)], reduction="mean")
    assert results["base"]["gold_logprob"] == pytest.approx(float(lp[0]), abs=1e-5)
    assert results["steered"]["gold_logprob"] == pytest.approx(float(lp[1]), abs=1e-5)


def test_diff_words_marks_only_the_differences():
    left, right = diff_words("a red circle", "a blue circle")
    assert left == [("a ", None), ("red ", "removed"), ("circle ", None)]
    assert right == [("a ", None), ("blue ", "added"), ("circle ", None)]
    same_left, same_right = diff_words("yes", "yes")
    assert same_left == same_right == [("yes ", None)]


def test_summary_budget_and_results_provenance(demo_service, examples):
    from hones_core import __version__

    total = demo_service.vlm.arch.num_layers * demo_service.vlm.arch.intermediate_size
    whole = demo_service.run(_request(demo_service, examples["vqa"][0], budget_pct=100.0, factor=1.0,
                                      method="activation"))
    assert f"{total:,} neurons (100 % of {total:,})" in whole.summary and "e+" not in whole.summary
    # HONES takes only neurons with a positive importance, and says how many the budget lacks
    out = demo_service.run(_request(demo_service, examples["vqa"][0], budget_pct=100.0, factor=1.0))
    positive = int((demo_service.artifact.task("vqa").importance > 0).sum())
    assert 0 < positive < total
    assert (f"Only {positive:,} neurons have a positive HONES importance, so the budget's other "
            f"{total - positive:,} are not selected") in out.summary
    assert sum(map(len, out.results["selected_neurons"].values())) == positive
    results = out.results
    assert results["model"] == {"id": str(ASSETS.joinpath("toy-vlm").resolve()), "revision": None, "commit": None}
    assert results["rankings"]["id"] == str(ASSETS.joinpath("rankings", "toy-vlm").resolve())
    assert results["rankings"]["revision"] is None and results["hones_core"] == __version__


@pytest.mark.parametrize("value, shown", [(100, "100"), (12.5, "12.5"), (1.0, "1"), (0.25, "0.25"),
                                          (0.0031, "0.0031"), (33.333, "33.3")])
def test_format_pct(value, shown):
    from hones_core.demo import format_pct

    assert format_pct(value) == shown


def test_figures_show_this_inputs_numbers_and_input_free_ones_are_drawn_once(demo_service, examples):
    from hones_core.demo import charts

    first = demo_service.run(_request(demo_service, examples["vqa"][0], factor=0.0, budget_pct=3.0))
    other = demo_service.run(_request(demo_service, examples["vqa"][1], factor=2.0, budget_pct=3.0))
    # head scores, layer spread and overlap depend on task / neuron set / budget only: the same image object
    for key in ("heads", "layers", "overlap"):
        assert other.plots[key][0] is first.plots[key][0]
    # the per-layer sums figure is the chart of the numbers in this request's results JSON
    for out in (first, other):
        sums = out.results["layer_sums"]
        expected = charts.layer_sums(sums["base"], sums["steered"]).image
        assert np.array_equal(np.asarray(out.plots["layer_sums"][0]), np.asarray(expected))
    assert not np.array_equal(np.asarray(first.plots["contributions"][0]),
                              np.asarray(other.plots["contributions"][0]))
