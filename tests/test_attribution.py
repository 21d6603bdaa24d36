import math

import torch

from hones_core.attribution import (attribute, caption_token_idf, contribution_sums, head_conditioned,
                                    item_contributions, target_directions, target_weights)
from hones_core.interventions import Plan, intervene


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
