import pytest

from hones_core.masking import drop, evaluate_selections


def test_drop_is_absolute_and_relative():
    assert drop(0.8, 0.6) == pytest.approx({"base": 0.8, "masked": 0.6, "abs_drop": 0.2, "rel_drop": 25.0})
    assert drop(0.0, 0.0)["rel_drop"] == 0.0


def test_masking_hones_neurons_changes_the_metric_and_equal_methods_agree(toy_vlm, toy_items):
    items = toy_items("vqa")[:8]
    every_neuron = {layer: list(range(toy_vlm.arch.intermediate_size)) for layer in range(toy_vlm.arch.num_layers)}
    result = evaluate_selections(toy_vlm, items, {"all": every_neuron, "none-really": {0: [0]},
                                                  "all-again": every_neuron}, batch_size=8)
    assert result["all"]["base"] > 0.2
    assert result["all"]["masked"] < result["all"]["base"]       # masking every FFN neuron breaks the model
    assert result["all"] == result["all-again"]                  # rows with equal plans give equal metrics
    assert result["all"]["neurons"] == toy_vlm.arch.num_layers * toy_vlm.arch.intermediate_size


def test_specificity_is_diagonal_minus_off_diagonal_mean():
    from hones_core.masking import specificity

    matrix = [[30.0, 2.0, 4.0], [0.0, 10.0, 6.0], [-3.0, 3.0, 20.0]]
    assert specificity(matrix) == pytest.approx((30 + 10 + 20) / 3 - (2 + 4 + 0 + 6 - 3 + 3) / 6)
    assert specificity([[5.0]]) is None


def test_budget_curves_and_cross_ablation_match_separate_runs(toy_vlm, toy_items, app_rankings):
    from hones_core import rankings
    from hones_core.masking import budget_curves, cross_ablation

    artifact = rankings.load(app_rankings)
    items = {"vqa": toy_items("vqa")[:6], "ocr": toy_items("ocr")[:6]}
    curves = budget_curves(toy_vlm, items["vqa"], artifact.task("vqa"), ["hones", "random"], [1, 5], batch_size=8)
    for method in ("hones", "random"):
        for pct in (1, 5):
            alone = evaluate_selections(toy_vlm, items["vqa"], {"x": artifact.task("vqa").select(method, pct / 100)},
                                        batch_size=8)["x"]
            assert curves[method][f"{pct}"] == pytest.approx(alone)
    cross = cross_ablation(toy_vlm, items, artifact, "hones", 0.05, batch_size=8)
    assert cross["tasks"] == ["vqa", "ocr"]
    for i, a in enumerate(cross["tasks"]):
        for j, b in enumerate(cross["tasks"]):
            alone = evaluate_selections(toy_vlm, items[b], {"a": artifact.task(a).select("hones", 0.05)}, batch_size=8)
            assert cross["matrix"][i][j] == pytest.approx(alone["a"]["rel_drop"])
    m = cross["matrix"]
    assert cross["specificity"] == pytest.approx((m[0][0] + m[1][1]) / 2 - (m[0][1] + m[1][0]) / 2)
