import math
from pathlib import Path

import torch

import pytest
import torch.nn.functional as F

from hones_core.attribution import (activation_statistics, ape_scores, attribute, caption_token_idf,
                                    contribution_sums, head_conditioned, item_contributions, target_directions,
                                    target_weights)
from hones_core.interventions import Plan, intervene, token_sums


def test_dvp_contribution_is_activation_times_projection(toy_vlm, toy_items):
    items = toy_items("vqa")[:3]
    sums = contribution_sums(toy_vlm, items, [None], progress=False)[0]
    # by hand for item 0: z at the last prompt position times <W_down[:, i], u_y>
    item = items[0]
    inputs = toy_vlm.encode([item.load_image()], [item.prompt]).inputs
    with torch.inference_mode(), intervene(toy_vlm.arch, Plan(), capture="last") as cap:
        toy_vlm.last_hidden(inputs)
    u = target_directions(toy_vlm, [item])[0]
    layer = 2
    expected = cap.neurons[layer][0] * (toy_vlm.arch.layers[layer].down_proj.weight.detach().T @ u)
    single = contribution_sums(toy_vlm, [item], [None], progress=False)[0]
    assert single.contributions.dtype == torch.float64      # summed in float64 (exact reductions)
    torch.testing.assert_close(single.contributions[layer].float(), expected, rtol=1e-5, atol=1e-6)
    assert sums.n == 3 and single.n == 1
    one = item_contributions(toy_vlm, item.load_image(), item.prompt, target_weights(toy_vlm, item), [None])
    torch.testing.assert_close(one[0, layer], expected, rtol=1e-5, atol=1e-6)


def test_target_directions_per_task(toy_vlm, toy_items):
    yes = toy_vlm.yes_no_ids()[0]
    retrieval = toy_items("retrieval")[0]
    assert target_weights(toy_vlm, retrieval) == {yes: 1.0}
    vqa = toy_items("vqa")[0]
    assert set(target_weights(toy_vlm, vqa)) == set(toy_vlm.answer_token_ids(vqa.prompt, vqa.answer))
    captions = toy_items("caption")[:6]
    idf = caption_token_idf(toy_vlm, captions)
    common = toy_vlm.answer_token_ids(captions[0].prompt, "a")[0]     # "a" is in every caption
    assert idf[common] == math.log(7 / 7) + 1 == 1.0
    u = target_directions(toy_vlm, captions, idf)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(len(captions)))


def test_head_conditioned_importance_by_hand():
    base = torch.tensor([[1.0, 2.0, 0.0]])
    ablated = {(0, 0): torch.tensor([[0.0, 2.5, -1.0]]), (1, 1): torch.tensor([[1.0, 0.0, 0.0]]),
               (2, 0): torch.tensor([[-5.0, -5.0, -5.0]])}
    scores = torch.zeros(3, 2)
    scores[0, 0], scores[1, 1], scores[2, 0] = 3.0, 1.0, -2.0       # (2, 0) has S <= 0: no weight
    importance, fallback = head_conditioned(base, ablated, scores)
    # (3 * [1, -0.5, 1]+ + 1 * [0, 2, 0]+) / 4 = [3/4, 2/4, 3/4]
    torch.testing.assert_close(importance, torch.tensor([[0.75, 0.5, 0.75]]))
    assert not fallback
    same, fell_back = head_conditioned(base, {(2, 0): ablated[(2, 0)]}, scores)
    assert fell_back and torch.equal(same, base)


def test_attribute_returns_hones_and_baselines(toy_vlm, toy_items):
    items = toy_items("ocr")[:4]
    scores = torch.zeros(toy_vlm.arch.num_layers, toy_vlm.arch.num_heads)
    scores[1, 2], scores[3, 0] = 0.5, 0.25
    result = attribute(toy_vlm, items, [(1, 2), (3, 0), (0, 0)], scores, progress=False)
    shape = (toy_vlm.arch.num_layers, toy_vlm.arch.intermediate_size)
    assert result.importance.shape == result.baselines["dvp"].shape == result.baselines["activation"].shape == shape
    assert result.conditioned_on == [(1, 2), (3, 0)] and not result.fallback
    assert (result.importance >= 0).all() and result.importance.sum() > 0
    assert (result.baselines["activation"] >= 0).all()
    assert set(result.baselines) == {"activation", "dvp", "ap", "ma"}      # APE needs all tasks: the pipeline's
    assert result.baselines["ap"].shape == result.baselines["ma"].shape == shape
    assert (result.baselines["ap"] >= 0).all() and (result.baselines["ap"] <= 1).all()
    assert 0 < float(result.baselines["ap"].mean()) < 1


# ----- by hand: each expected value computed independently, with plain loops ------------------------

def _forward_inputs(vlm, modules, pre: bool):
    """Hooks recording the first input each module gets in a forward pass: (dict layer -> tensor, handles)."""
    seen: dict[int, torch.Tensor] = {}

    def record(layer):
        def pre_hook(module, args):
            seen.setdefault(layer, args[0].detach().clone())

        def hook(module, args, output):       # returns None: the output stays what it was
            seen.setdefault(layer, args[0].detach().clone())
        return pre_hook if pre else hook
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(record(i))
               for i, m in enumerate(modules)]
    return seen, handles


def test_token_sums_and_ap_ma_on_a_hand_made_tensor_leave_padding_out():
    nan, big = float("nan"), 1e6
    # 2 rows x 4 positions x 3 neurons; row 0 is left-padded by 2 (padding holds garbage: NaN, huge values)
    z = torch.tensor([[[nan, big, -big], [big, big, big], [0.5, -1.0, 0.0], [2.0, 3.0, -0.25]],
                      [[1.0, -2.0, 0.0], [-1.0, -1.0, 4.0], [0.0, 0.5, 0.5], [3.0, -0.5, 1.0]]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positive, total, tokens = [0.0] * 3, [0.0] * 3, 0
    for r in range(2):
        for s in range(4):
            if mask[r, s]:
                tokens += 1
                for i in range(3):
                    positive[i] += 1.0 if z[r, s, i].item() > 0 else 0.0
                    total[i] += z[r, s, i].item()
    assert tokens == 6 and positive == [4.0, 2.0, 3.0] and total == [5.5, -1.0, 5.25]   # checked on paper too
    got_positive, got_total = token_sums(z, mask)
    assert got_positive.dtype == got_total.dtype == torch.float64
    assert got_positive.tolist() == positive and got_total.tolist() == total
    stats = activation_statistics(got_positive[None], got_total[None], tokens)
    assert stats["ap"][0].tolist() == [p / tokens for p in positive]
    assert stats["ma"][0].tolist() == pytest.approx([t / tokens for t in total], abs=1e-15)
    # a row that stands for two rows (a shared prefix) counts twice: the same as repeating it
    twice_positive, twice_total = token_sums(z, mask, torch.tensor([2, 1]))
    again = token_sums(torch.cat([z[:1], z]), torch.cat([mask[:1], mask]))
    assert twice_positive.tolist() == again[0].tolist() and twice_total.tolist() == again[1].tolist()
    with pytest.raises(ValueError, match="at least one prompt token"):
        activation_statistics(got_positive, got_total, 0)


def test_ape_by_hand():
    tasks = ["vqa", "ocr", "caption", "retrieval"]
    # one layer, 5 neurons; columns: a tie (vqa = ocr), vqa-specific, never active, mostly caption, ocr only
    ap = {"vqa": torch.tensor([[0.5, 0.9, 0.0, 0.2, 0.0]]), "ocr": torch.tensor([[0.5, 0.1, 0.0, 0.3, 0.7]]),
          "caption": torch.tensor([[0.0, 0.0, 0.0, 0.4, 0.0]]), "retrieval": torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.0]])}
    floor = -(math.log(4) + 1)
    scores = ape_scores(ap)
    for i in range(5):
        column = [float(ap[t][0, i]) for t in tasks]
        total = sum(column)
        entropy = -sum((a / total) * math.log(a / total) for a in column if a > 0) if total > 0 else None
        for t, a in zip(tasks, column):
            expected = -entropy if total > 0 and a == max(column) else floor
            assert float(scores[t][0, i]) == pytest.approx(expected, abs=1e-6), (t, i)
            assert scores[t].dtype == torch.float32 and torch.isfinite(scores[t]).all()
    assert float(scores["vqa"][0, 0]) == pytest.approx(-math.log(2))        # the tie counts for both tasks
    assert float(scores["ocr"][0, 4]) == 0.0                                 # active on one task only: H = 0
    assert float(scores["vqa"][0, 2]) == torch.tensor(floor).item()         # never active: the floor everywhere
    # the floor is below every real score: -H >= -ln 4
    assert all(float(s[s > floor].min()) >= -math.log(4) - 1e-6 for s in scores.values() if (s > floor).any())
    with pytest.raises(ValueError, match="at least two"):
        ape_scores({"vqa": ap["vqa"]})


def test_ap_and_ma_from_the_pipeline_match_a_plain_recomputation_over_the_attention_mask(toy_vlm, toy_items):
    vlm, arch = toy_vlm, toy_vlm.arch
    items = toy_items("vqa")[:5]
    sums = contribution_sums(vlm, items, [None], batch_size=3, token_stats=(0,), progress=False)[0]
    L, I = arch.num_layers, arch.intermediate_size
    positive = torch.zeros(L, I, dtype=torch.float64)
    total = torch.zeros(L, I, dtype=torch.float64)
    tokens, padded = 0, False
    for start in range(0, len(items), 3):                    # the pipeline's batches
        chunk = items[start:start + 3]
        inputs = vlm.encode([i.load_image() for i in chunk], [i.prompt for i in chunk]).inputs
        mask = inputs["attention_mask"]
        padded |= bool((mask == 0).any())
        seen, handles = _forward_inputs(vlm, [layer.down_proj for layer in arch.layers], pre=False)
        try:
            with torch.inference_mode():
                vlm.last_hidden(inputs)           # no intervene block: none of our hooks run
        finally:
            for handle in handles:
                handle.remove()
        for layer in range(L):
            for r in range(mask.shape[0]):
                for s in range(mask.shape[1]):
                    if mask[r, s]:
                        positive[layer] += (seen[layer][r, s] > 0).double()
                        total[layer] += seen[layer][r, s].double()
        tokens += int(mask.sum())
    assert padded, "the test needs a left-padded batch"
    assert sums.tokens == tokens and sums.n == len(items)
    assert torch.equal(sums.positive, positive)
    torch.testing.assert_close(sums.activation_sum, total, rtol=1e-6, atol=1e-5)
    stats = activation_statistics(sums.positive, sums.activation_sum, sums.tokens)
    torch.testing.assert_close(stats["ap"], positive / tokens, rtol=0, atol=0)
    torch.testing.assert_close(stats["ma"], total / tokens, rtol=1e-6, atol=1e-6)
    # only plans asked for get token statistics; the DVP sums are the same either way
    plain = contribution_sums(vlm, items, [None], batch_size=3, progress=False)[0]
    assert plain.positive is None and torch.equal(plain.contributions, sums.contributions)


def test_captured_z_is_act_of_gate_times_up_of_the_mlp_input(toy_vlm, toy_items):
    arch = toy_vlm.arch
    assert toy_vlm.model.config.get_text_config().hidden_act == "silu"
    items = toy_items("ocr")[:2]
    inputs = toy_vlm.encode([i.load_image() for i in items], [i.prompt for i in items]).inputs
    mlp_inputs, handles = _forward_inputs(toy_vlm, [layer.gate_proj for layer in arch.layers], pre=True)
    try:
        with torch.inference_mode(), intervene(arch, Plan(), capture="all") as capture:
            toy_vlm.last_hidden(inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer in arch.layers:
        assert layer.gate_proj.bias is None and layer.up_proj.bias is None
        x = mlp_inputs[layer.index].double()                                  # [b, seq, hidden]
        gate = x @ layer.gate_proj.weight.detach().double().T
        up = x @ layer.up_proj.weight.detach().double().T
        torch.testing.assert_close(capture.neurons[layer.index].double(), F.silu(gate) * up, rtol=1e-4, atol=1e-5)


def test_dvp_contribution_by_a_loop_over_neurons(toy_vlm, toy_items):
    arch = toy_vlm.arch
    item = toy_items("vqa")[1]
    weights = target_weights(toy_vlm, item)
    unembedding = arch.unembedding().detach().double()
    u = sum(w * unembedding[token] for token, w in weights.items())
    u = u / u.norm()                                                          # u_y by hand
    inputs = toy_vlm.encode([item.load_image()], [item.prompt]).inputs
    seen, handles = _forward_inputs(toy_vlm, [layer.down_proj for layer in arch.layers], pre=False)
    try:
        with torch.inference_mode():
            toy_vlm.last_hidden(inputs)
    finally:
        for handle in handles:
            handle.remove()
    sums = contribution_sums(toy_vlm, [item], [None], progress=False)[0]
    for layer in (0, arch.num_layers - 1):
        z = seen[layer][0, -1].double()                                       # the last prompt position
        down = arch.layers[layer].down_proj.weight.detach().double()          # [hidden, I]
        expected = torch.tensor([float(z[i]) * float(torch.dot(down[:, i], u)) for i in range(z.numel())],
                                dtype=torch.float64)
        torch.testing.assert_close(sums.contributions[layer], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums.abs_activation[layer], z.abs(), rtol=1e-6, atol=1e-7)


def test_attribute_is_the_formula_on_item_means(toy_vlm, toy_items):
    """I = Σ_{S_h>0} S_h [c̄(θ) - c̄(θ_h)]₊ / Σ S_h, c̄ the mean over items of c run one item at a time."""
    arch = toy_vlm.arch
    items = toy_items("vqa")[:3]
    scores = torch.zeros(arch.num_layers, arch.num_heads)
    scores[1, 2], scores[2, 0], scores[0, 1] = 0.75, 0.25, -0.5                # (0, 1): S <= 0, not used
    result = attribute(toy_vlm, items, [(1, 2), (2, 0), (0, 1)], scores, batch_size=2, progress=False)

    def mean_c(plan):
        total = torch.zeros(arch.num_layers, arch.intermediate_size, dtype=torch.float64)
        for item in items:
            u = target_directions(toy_vlm, [item])[0].double()
            inputs = toy_vlm.encode([item.load_image()], [item.prompt]).inputs
            with torch.inference_mode(), intervene(arch, plan, capture="last") as cap:
                toy_vlm.last_hidden(inputs)
            for layer in arch.layers:
                total[layer.index] += cap.neurons[layer.index][0].double() * (
                    layer.down_proj.weight.detach().double().T @ u)
        return total / len(items)
    base = mean_c(Plan())
    expected = (0.75 * (base - mean_c(Plan.ablate_heads([(1, 2)]))).clamp_min(0)
                + 0.25 * (base - mean_c(Plan.ablate_heads([(2, 0)]))).clamp_min(0)) / (0.75 + 0.25)
    assert result.conditioned_on == [(1, 2), (2, 0)] and not result.fallback
    torch.testing.assert_close(result.importance.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.baselines["dvp"].double(), base, rtol=1e-4, atol=1e-5)


def test_official_mode_targets_are_the_text_encoded_bare(tiny_vlm):
    """--compat official: u_y's tokens are `tokenizer.encode(text, add_special_tokens=False)`, references joined."""
    from hones_core.attribution import target_weights
    from hones_core.models import VLM
    from hones_core.tasks import TaskItem, caption_prompt, vqa_prompt

    ours = tiny_vlm("llava")
    official = VLM(ours.model, ours.processor, name="tiny-llava", compat="official")
    tok = ours.tokenizer
    special = set(tok.all_special_ids)

    def bare(text):
        return [i for i in tok.encode(text, add_special_tokens=False) if i not in special]

    vqa = TaskItem("vqa", Path("x.png"), vqa_prompt("What color?"), ("red circle",), "red circle", 0)
    expected: dict[int, float] = {}
    for token in bare("red circle"):
        expected[token] = expected.get(token, 0.0) + 1.0
    assert target_weights(official, vqa) == expected
    caption = TaskItem("caption", Path("x.png"), caption_prompt(), ("a red circle", "the circle"), "a red circle", 0)
    idf = {token: 2.0 for token in bare("circle")}
    joined: dict[int, float] = {}
    for token in bare("a red circle the circle"):
        joined[token] = joined.get(token, 0.0) + idf.get(token, 1.0)
    assert target_weights(official, caption, idf) == joined
    assert target_weights(official, TaskItem("retrieval", Path("x.png"), "p", ("Yes",), "Yes", 0,
                                             candidates=("a", "b"), positive=0)) == {t: 1.0 for t in bare("Yes")}
