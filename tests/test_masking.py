import pytest
import torch

from hones_core.masking import drop, evaluate_selections

from conftest import ASSETS


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
    cross = cross_ablation(toy_vlm, items, artifact, ["hones"], 0.05, batch_size=8)["hones"]
    assert cross["tasks"] == ["vqa", "ocr"]
    for i, a in enumerate(cross["tasks"]):
        for j, b in enumerate(cross["tasks"]):
            alone = evaluate_selections(toy_vlm, items[b], {"a": artifact.task(a).select("hones", 0.05)}, batch_size=8)
            assert cross["matrix"][i][j] == pytest.approx(alone["a"]["rel_drop"])
    m = cross["matrix"]
    assert cross["specificity"] == pytest.approx((m[0][0] + m[1][1]) / 2 - (m[0][1] + m[1][0]) / 2)


def test_mask_eval_budgets_cross_and_into_rankings(toy_world, app_rankings, tmp_path, capsys):
    """The CLI end to end: budget curves, the 4 x 4 matrix, and evaluation.json stored in the artifact."""
    import json
    import shutil

    from hones_core import cli, rankings
    from hones_core.errors import RankingsError

    artifact_dir = tmp_path / "rankings"
    shutil.copytree(app_rankings, artifact_dir)
    base = ["mask-eval", "--model", str(ASSETS / "toy-vlm"), "--device", "cpu", "--rankings", str(artifact_dir),
            "--task", "all", "--data", str(toy_world / "discovery.json"), "--limit", "4", "--n-negatives", "4",
            "--batch-size", "16"]
    assert cli.main([*base, "--methods", "hones,random", "--budgets", "5,1", "--cross", "--into-rankings"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["budgets_pct"] == [1.0, 5.0]
    assert set(printed["drops"]) == set(printed["tasks"]) == {"vqa", "ocr", "caption", "retrieval"}
    # the 1 % column of the curves is the plain 1 % evaluation (the same rows, another batch)
    for task, by_method in printed["tasks"].items():
        for method, drop in by_method.items():
            assert printed["drops"][task][method]["1"]["rel_drop"] == pytest.approx(drop["rel_drop"])
    matrix = printed["cross_ablation"]["hones"]["matrix"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    diagonal = [printed["tasks"][t]["hones"]["rel_drop"] for t in printed["cross_ablation"]["hones"]["tasks"]]
    assert [matrix[i][i] for i in range(4)] == pytest.approx(diagonal)        # A's set on A = the plain drop
    stored = rankings.load(artifact_dir).evaluation
    assert stored["drops"] == printed["drops"] and stored["cross"] == printed["cross_ablation"]
    assert stored["split"]["items"] == {"vqa": 4, "ocr": 4, "caption": 4, "retrieval": 4}
    assert len(stored["split"]["digest"]) == 16
    assert "## Stored evaluation" in (artifact_dir / "README.md").read_text()
    with pytest.raises(ValueError, match="--budgets: every budget is a percentage above 0 and at most 100"):
        cli.main([*base, "--budgets", "0,1"])
    with pytest.raises(RankingsError, match="--methods nonesuch: not in the 'vqa' rankings; available: hones, ap, ma"):
        cli.main([*base, "--methods", "hones,nonesuch"])


def test_masking_the_hones_set_equals_zeroing_its_down_proj_columns(toy_vlm, toy_items, app_rankings):
    """An independent implementation of masking: W_down[:, i] = 0 in a copy of the model gives the same metric."""
    import copy

    from hones_core import rankings
    from hones_core.evaluation import evaluate
    from hones_core.models import VLM

    # captions: the toy's task that depends on FFN neurons (its VQA answers go through attention)
    items = toy_items("caption")[:12]
    selection = rankings.load(app_rankings).task("caption").select("hones", 0.05)      # 77 of 1 536 neurons
    masked = evaluate_selections(toy_vlm, items, {"hones": selection}, batch_size=12)["hones"]
    edited = copy.deepcopy(toy_vlm.model)
    layers = edited.model.text_model.layers
    with torch.no_grad():
        for layer, neurons in selection.items():
            layers[layer].mlp.down_proj.weight[:, neurons] = 0
    by_hand = evaluate(VLM(edited, toy_vlm.processor, name="zeroed"), items, batch_size=12)
    assert masked["masked"] == pytest.approx(by_hand.metric)
    assert masked["neurons"] == 77 and masked["base"] != masked["masked"]       # this set matters here


def test_masking_holds_at_every_decode_step(toy_vlm, toy_items):
    """The plan is applied to the prefill pass and to every generated token's pass, not only the prompt."""
    from hones_core.interventions import Plan, intervene

    item = toy_items("caption")[0]
    neurons = [3, 17, 101]
    seen = []

    def record(module, args):
        seen.append(args[0][..., neurons].abs().max().item())

    with intervene(toy_vlm.arch, Plan.scale_neurons({1: neurons}, 0.0)):
        # registered after the plan's hook, so it runs after it and sees the masked input, at every pass
        handle = toy_vlm.arch.layers[1].down_proj.register_forward_pre_hook(record)
        try:
            answer = toy_vlm.generate([item.load_image()], [item.prompt], max_new_tokens=8)[0]
        finally:
            handle.remove()
    assert len(answer.split()) >= 3 and len(seen) >= 4
    assert seen == [0.0] * len(seen)
    seen.clear()
    handle = toy_vlm.arch.layers[1].down_proj.register_forward_pre_hook(record)
    try:
        toy_vlm.generate([item.load_image()], [item.prompt], max_new_tokens=8)
    finally:
        handle.remove()
    assert max(seen) > 0          # without the plan those neurons are active


@pytest.mark.parametrize("task", ["caption", "retrieval"])
def test_changed_answers_are_counted_against_each_items_own_base_answer(toy_vlm, toy_items, app_rankings, task):
    """The count of changed answers equals a plain loop over the items, each compared with its own base answer.

    One item per batch (`batch_size` = its 3 rows), and the loop runs the same 3-row batch per item, so
    the model computes literally the same thing on every CPU and only the pairing and counting differ.
    """
    from hones_core import rankings
    from hones_core.evaluation import predict
    from hones_core.interventions import Plan

    items = toy_items(task)[:6]
    ranking = rankings.load(app_rankings).task(task)
    sets = {"hones": ranking.select("hones", 0.05), "everything": {
        layer: list(range(toy_vlm.arch.intermediate_size)) for layer in range(toy_vlm.arch.num_layers)}}
    result = evaluate_selections(toy_vlm, items, sets, batch_size=3)
    plans = [None] + [Plan.scale_neurons(selection, 0.0) for selection in sets.values()]
    expected = dict.fromkeys(sets, 0)
    for item in items:
        base, *masked = predict(toy_vlm, [item] * 3, plans=plans, batch_size=3)
        for name, answer in zip(sets, masked):
            if task == "retrieval":    # the top candidate (first of equal margins)
                top = lambda v: max(range(len(v)), key=lambda i: (v[i], -i))   # noqa: E731
                expected[name] += top(base) != top(answer)
            else:
                expected[name] += base != answer
    for name in sets:
        assert result[name]["changed"] == expected[name]
        assert result[name]["items"] == len(items)
    assert result["everything"]["changed"] >= 1       # masking every neuron changes something
