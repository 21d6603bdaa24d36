"""The stored evaluation the app shows: the evidence line and the figures, from evaluation.json."""

import pytest

from hones_core.demo.stored import budget_figure, cross_figure, evidence_line, stored

EVALUATION = {
    "split": {"file": "runs/eval/test.json", "items": {"caption": 40, "vqa": 40}},
    "budgets_pct": [1.0, 5.0],
    "drops": {"caption": {
        "hones": {"1": {"base": 0.8, "masked": 0.6, "abs_drop": 0.2, "rel_drop": 25.0, "neurons": 15, "changed": 11,
                        "items": 40},
                  "5": {"base": 0.8, "masked": 0.4, "abs_drop": 0.4, "rel_drop": 50.0, "neurons": 77, "changed": 30,
                        "items": 40}},
        "random": {"1": {"base": 0.8, "masked": 0.79, "abs_drop": 0.01, "rel_drop": 1.25, "neurons": 15,
                         "changed": 2, "items": 40},
                   "5": {"base": 0.8, "masked": 0.7, "abs_drop": 0.1, "rel_drop": 12.5, "neurons": 77, "changed": 9,
                         "items": 40}}}},
    "cross": {"hones": {"tasks": ["vqa", "caption"], "matrix": [[3.0, 1.0], [0.5, 25.0]], "specificity": 13.25}},
}


def test_the_line_counts_changed_answers_for_the_set_and_for_random_neurons():
    view = stored(EVALUATION, "caption")
    line = evidence_line(view, "hones", 1.0)
    assert "On 40 held-out items (runs/eval/test.json)" in line
    assert "masking these 15 neurons (HONES, 1 %) changed 11 answers" in line
    assert "random neurons changed 2" in line
    assert "changed 30 answers" in evidence_line(view, "hones", 5)
    assert "not 2 %" in evidence_line(view, "hones", 2.0)            # a budget that was not evaluated
    assert "no results for" in evidence_line(view, "ap", 1.0)
    assert stored(EVALUATION, "ocr") is None and "No stored evaluation" in evidence_line(None, "hones", 1)


def test_older_evaluations_without_counts_fall_back_to_the_metric_drop():
    old = {**EVALUATION, "drops": {"caption": {m: {b: {k: v for k, v in d.items() if k not in ("changed", "items")}
                                                   for b, d in by.items()}
                                               for m, by in EVALUATION["drops"]["caption"].items()}}}
    line = evidence_line(stored(old, "caption"), "hones", 1)
    assert "dropped BLEU-4 by 25.0 %" in line and "1.2 % for random" in line and "no counts" in line


def test_the_figures_draw_every_stored_method_and_the_hones_matrix():
    view = stored(EVALUATION, "caption")
    curve = budget_figure(view)
    lines = curve.figure.axes[0].get_lines()
    drawn = sorted(tuple(float(y) for y in line.get_ydata()) for line in lines
                   if [float(x) for x in line.get_xdata()] == [1.0, 5.0])      # the methods' lines, not the 0 rule
    assert drawn == [(1.25, 12.5), (25.0, 50.0)]
    matrix = cross_figure(view)
    assert matrix is not None and "hones" in matrix.caption.lower()
    assert cross_figure(stored({**EVALUATION, "cross": {}}, "caption")) is None


def test_the_bundled_artifact_has_a_line_for_every_task():
    from hones_core import rankings
    from hones_core.assets import DEFAULT_RANKINGS

    evaluation = rankings.load(DEFAULT_RANKINGS).evaluation
    for task in ("vqa", "ocr", "caption", "retrieval"):
        line = evidence_line(stored(evaluation, task), "hones", 1)
        assert line.startswith("**On ") and "held-out items" in line
        assert "answers" in line and "random neurons changed" in line      # the stored change counts
