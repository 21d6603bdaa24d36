"""The rankings schema: selection, the data types' input checks, validation against a model."""

from __future__ import annotations

import math

import pytest
import torch

from hones_core import rankings as R
from hones_core.rankings import RankingsError, RankingsMismatchError, Scales, TaskRanking

from conftest import RANKINGS_SHAPE, fake_arch, make_rankings, make_task

L, H, I = RANKINGS_SHAPE


# --------------------------------------------------------------------------- selection


def hand_made(importance: torch.Tensor) -> TaskRanking:
    layers, width = importance.shape
    return TaskRanking(task="vqa", head_scores=torch.zeros(layers, 2), importance=importance, top_heads=[(0, 0)],
                       baselines={"dvp": -importance})


def test_select_exact_top_ratio():
    importance = torch.zeros(2, 10)
    importance[1, 7], importance[0, 2], importance[1, 0], importance[0, 9], importance[0, 4] = 9, 8, 7, 6, 5
    r = hand_made(importance)
    # 20 pairs: 10 % = 2 neurons, 25 % = 5 neurons, a tiny ratio still picks one.
    assert r.select("hones", 0.1) == {0: [2], 1: [7]}
    assert r.select("hones", 0.25) == {0: [2, 4, 9], 1: [0, 7]}
    assert r.select("hones", 1e-6) == {1: [7]}
    assert r.ranked("hones", 0.25) == [(1, 7, 9.0), (0, 2, 8.0), (1, 0, 7.0), (0, 9, 6.0), (0, 4, 5.0)]
    # the whole budget asked for, but only five neurons have a positive importance: no zeros fill it
    assert r.select("hones", 1.0) == {0: [2, 4, 9], 1: [0, 7]} and r.shortfall("hones", 1.0) == 15
    # A baseline ranks by its own matrix: the most negative importance first (all zeros tie -> low index).
    assert r.select("dvp", 0.1) == {0: [0, 1]}
    assert r.methods() == ["hones", "dvp", "random"]


def test_select_breaks_ties_by_lower_flat_index():
    importance = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 2.0, 0.0]])
    r = hand_made(importance)
    # Four entries tie at 3: flat indices 1, 2, 4, 5. A budget of 3 takes the first three.
    assert r.ranked("hones", 3 / 8) == [(0, 1, 3.0), (0, 2, 3.0), (1, 0, 3.0)]
    assert r.select("hones", 3 / 8) == {0: [1, 2], 1: [0]}


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.01, math.nan])
def test_select_rejects_budgets_outside_0_100_percent(ratio):
    r = make_task()
    for method in ("hones", "random", "dvp"):
        with pytest.raises(ValueError, match="the neuron budget must be between 0 % and 100 %"):
            r.select(method, ratio)
    with pytest.raises(ValueError, match="between 0 % and 100 %"):
        r.ranked("hones", ratio)


def test_unknown_method_lists_what_exists():
    r = make_task()
    with pytest.raises(ValueError, match="available: hones, activation, dvp, random"):
        r.matrix("gradient")
    with pytest.raises(ValueError, match="drawn at selection time"):
        r.matrix("random")
    assert torch.equal(r.matrix("hones"), r.importance) and torch.equal(r.matrix("dvp"), r.baselines["dvp"])


def test_random_selection_matches_hones_layer_counts_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(4, 500, generator=g)
    importance[2] += 1.0            # layer 2 dominates the HONES top
    r = hand_made(importance)
    hones = r.select("hones", 0.05)   # 100 neurons
    counts = {layer: len(v) for layer, v in hones.items()}
    assert sum(counts.values()) == 100 and counts == {2: 100}
    a, b, c = r.select("random", 0.05, seed=1), r.select("random", 0.05, seed=1), r.select("random", 0.05, seed=2)
    assert a == b and a != c
    assert {layer: len(v) for layer, v in a.items()} == counts == {layer: len(v) for layer, v in c.items()}
    expected = sorted(torch.randperm(500, generator=torch.Generator().manual_seed(1))[:100].tolist())
    assert a == {2: expected}
    # Spread over several layers: counts still follow HONES layer by layer.
    spread = hand_made(torch.rand(4, 500, generator=g))
    counts = {layer: len(v) for layer, v in spread.select("hones", 0.02).items()}
    drawn = spread.select("random", 0.02, seed=7)
    assert {layer: len(v) for layer, v in drawn.items()} == counts and len(counts) > 1
    assert all(len(set(v)) == len(v) and 0 <= min(v) and max(v) < 500 for v in drawn.values())


def test_task_ranking_checks_its_inputs():
    with pytest.raises(ValueError, match="task must be one of"):
        TaskRanking("detection", torch.zeros(L, H), torch.zeros(L, I), [])
    with pytest.raises(ValueError, match="outside head_scores"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [(L, 0)])
    with pytest.raises(ValueError, match="baseline 'dvp' has shape"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [], baselines={"dvp": torch.zeros(L, I + 1)})
    with pytest.raises(ValueError, match="cannot name a baseline"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [], baselines={"random": torch.zeros(L, I)})
    with pytest.raises(ValueError, match="NaN"):
        TaskRanking("vqa", torch.zeros(L, H), torch.full((L, I), math.nan), [])
    converted = TaskRanking("vqa", torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, I, dtype=torch.float16), [])
    assert converted.head_scores.dtype == converted.importance.dtype == torch.float32


def test_rankings_task_names_what_is_available():
    artifact = make_rankings("vqa", "caption")
    assert artifact.task("vqa") is artifact.tasks["vqa"]
    with pytest.raises(RankingsError, match="rankings have no 'ocr' task; available: vqa, caption"):
        artifact.task("ocr")


def test_scales_multipliers_and_selection():
    s = Scales(layers=torch.tensor([2, 0, 2]), neurons=torch.tensor([9, 4, 1]), scale=torch.tensor([0.5, -0.25, 1.0]),
               meta={"method": "learned"})
    assert s.as_selection() == {0: [4], 2: [1, 9]}
    assert s.multipliers() == {0: ([4], [0.75]), 2: ([1, 9], [2.0, 1.5])}
    with pytest.raises(ValueError, match="more than once"):
        Scales(layers=torch.tensor([0, 0]), neurons=torch.tensor([1, 1]), scale=torch.zeros(2))
    with pytest.raises(ValueError, match="one layer and one neuron per scale"):
        Scales(layers=torch.tensor([0]), neurons=torch.tensor([1, 2]), scale=torch.zeros(2))


# --------------------------------------------------------------------------- validation


def test_check_against_names_both_sides():
    artifact = make_rankings("vqa")
    R.check_against(artifact, fake_arch())
    R.validate(artifact, num_layers=L, num_heads=H, intermediate_size=I)
    with pytest.raises(RankingsMismatchError) as e:
        R.check_against(artifact, fake_arch(num_layers=28), model_id="Qwen/Qwen2.5-VL-7B-Instruct")
    msg = str(e.value)
    assert f"rankings were made for {L} layers (llava-hf/llava-1.5-7b-hf@abc123); this model " \
           f"(Qwen/Qwen2.5-VL-7B-Instruct) has 28" in msg
    assert "use rankings computed for Qwen/Qwen2.5-VL-7B-Instruct" in msg
    with pytest.raises(RankingsMismatchError, match=rf"{H} heads per layer .*has 28"):
        R.check_against(artifact, fake_arch(num_heads=28))
    with pytest.raises(RankingsMismatchError, match=rf"{I} FFN neurons per layer .*has 18944"):
        R.validate(artifact, num_layers=L, num_heads=H, intermediate_size=18944)
    with pytest.raises(RankingsMismatchError, match="made for the 'llava' family .* is 'qwen2.5-vl'"):
        R.check_against(artifact, fake_arch(family="qwen2.5-vl"))
    with pytest.raises(RankingsMismatchError) as e:
        R.validate(artifact, num_layers=28, num_heads=28, intermediate_size=18944, model_id="Qwen/x")
    assert all(s in str(e.value) for s in (f"{L} layers", "has 28", f"{H} heads", f"{I} FFN", "has 18944"))


def test_hones_never_fills_its_budget_with_zero_importance():
    """Fewer positive neurons than the budget: fewer neurons, not index-ordered zeros (layer 0 first)."""
    importance = torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, -1.0]])     # two positive of eight
    dvp = torch.tensor([[0.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, -1.0]])
    r = TaskRanking("vqa", torch.zeros(2, 2), importance, [], baselines={"dvp": dvp})
    assert r.select("hones", 0.5) == {0: [2], 1: [1]}           # budget 4, two positive
    assert r.ranked("hones", 0.5) == [(1, 1, 2.0), (0, 2, 0.5)]
    assert r.positive("hones") == 2 and r.shortfall("hones", 0.5) == 2 and r.shortfall("hones", 0.25) == 0
    random = r.select("random", 0.5, seed=3)
    assert {layer: len(v) for layer, v in random.items()} == {0: 1, 1: 1}    # the same per-layer counts
    assert r.shortfall("random", 0.5) == 2
    # a baseline's ranking is its ranking: DVP's budget is filled by value (0 before -1), no shortfall
    assert r.ranked("dvp", 0.5) == [(1, 1, 2.0), (0, 2, 0.5), (0, 0, 0.0), (0, 1, 0.0)]
    assert r.shortfall("dvp", 0.5) == 0


def test_another_hub_model_of_the_same_shapes_is_refused_unless_allowed(tmp_path):
    """Shapes cannot tell a fine-tune from its base: Hub ids and revisions must agree too."""
    artifact = make_rankings("vqa")                     # made for llava-hf/llava-1.5-7b-hf @ abc123
    arch = fake_arch()
    assert R.check_against(artifact, arch, model_id="llava-hf/llava-1.5-7b-hf", revision="abc123") is None
    assert R.check_against(artifact, arch, model_id="LLaVA-HF/llava-1.5-7b-hf") is None   # ids: case-insensitive
    with pytest.raises(RankingsMismatchError) as e:
        R.check_against(artifact, arch, model_id="you/llava-finetune")
    msg = str(e.value)
    assert "computed for llava-hf/llava-1.5-7b-hf@abc123, and the model loaded is you/llava-finetune" in msg
    assert "--allow-other-model" in msg and "HONES_ALLOW_OTHER_MODEL=1" in msg
    with pytest.raises(RankingsMismatchError, match="the model loaded is llava-hf/llava-1.5-7b-hf@def456"):
        R.check_against(artifact, arch, model_id="llava-hf/llava-1.5-7b-hf", revision="def456")
    note = R.check_against(artifact, arch, model_id="you/llava-finetune", allow_other_model=True)
    assert note.startswith("the rankings were computed for llava-hf/llava-1.5-7b-hf@abc123")
    # a local folder says nothing about which model it holds: shapes only
    local = tmp_path / "my" / "model"
    local.mkdir(parents=True)
    assert R.check_against(artifact, arch, model_id=str(local)) is None
    assert not R.is_hub_id(str(local)) and R.is_hub_id("org/name") and not R.is_hub_id("a/b/c")


def test_magnitude_is_another_name_for_the_activation_baseline():
    r = make_task()
    assert r.has("magnitude") and r.has("activation") and not r.has("nope")
    assert r.select("magnitude", 0.05) == r.select("activation", 0.05)
    assert r.ranked("magnitude", 0.05) == r.ranked("activation", 0.05)


def test_methods_list_the_papers_baselines_first_whatever_order_the_file_had():
    L_, I_ = 2, 4
    baselines = {name: torch.rand(L_, I_) for name in ("zeta", "dvp", "ma", "activation", "ape", "ap")}
    r = TaskRanking("vqa", torch.zeros(L_, 2), torch.rand(L_, I_), [], baselines=baselines)
    assert r.methods() == ["hones", "ap", "ma", "ape", "activation", "dvp", "zeta", "random"]


# --------------------------------------------------------------------------- ranks and statistics


def test_rank_of_is_the_position_in_a_sort_by_hand_ties_by_lower_flat_index():
    g = torch.Generator().manual_seed(4)
    importance = (torch.rand(3, 8, generator=g) * 4).round() / 4         # few distinct values: many ties
    importance[0, 0] = 0.0
    r = hand_made(importance)
    flat = importance.flatten().tolist()
    for method, scores in (("hones", flat), ("dvp", [-s for s in flat])):
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))     # best first, then lower index
        for position, index in enumerate(order, 1):
            assert r.rank_of(method, index // 8, index % 8) == position, (method, index)
    # rank <= budget is exactly what select takes (for HONES: those with importance > 0)
    ratio = 0.25
    chosen = {(l, n) for l, ns in r.select("dvp", ratio).items() for n in ns}
    assert chosen == {(l, n) for l in range(3) for n in range(8) if r.rank_of("dvp", l, n) <= R.budget(ratio, 24)}
    with pytest.raises(ValueError, match="drawn at selection time"):
        r.rank_of("random", 0, 0)
    with pytest.raises(ValueError, match=r"outside the rankings' 3 layers x 8 neurons"):
        r.rank_of("hones", 3, 0)


def test_neuron_stats_check_their_inputs():
    ok = dict(mean=torch.zeros(L, I), std=torch.ones(L, I), mean_abs=torch.ones(L, I), positive=torch.full((L, I), .5),
              items=4)
    assert R.NeuronStats(**ok).shape == (L, I)
    for change, message in ((dict(std=-torch.ones(L, I)), "cannot be negative"),
                            (dict(positive=torch.full((L, I), 1.5)), r"\[0, 1\]"),
                            (dict(items=0), "at least one item"),
                            (dict(mean=torch.zeros(L, I + 1)), "share one"),
                            (dict(mean=torch.full((L, I), math.nan)), "NaN")):
        with pytest.raises(ValueError, match=message):
            R.NeuronStats(**{**ok, **change})
    wrong = R.NeuronStats(**{**ok, **{k: torch.zeros(L, I + 1) for k in ("mean", "std", "mean_abs", "positive")}})
    with pytest.raises(ValueError, match="stats have shape"):
        TaskRanking(task="vqa", head_scores=torch.zeros(L, H), importance=torch.zeros(L, I), top_heads=[],
                    stats=wrong)
