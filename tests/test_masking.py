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
