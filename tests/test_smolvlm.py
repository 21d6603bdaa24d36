"""SmolVLMForConditionalGeneration on its own tiny model: the class the deploy guide recommends
for a CPU Space (HuggingFaceTB/SmolVLM-256M-Instruct's family).

Loaded through `load_vlm` like any Hub model; generation checked against a greedy loop written
here; interventions checked against the same edit made to a copy of the weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import SmolVLMForConditionalGeneration, SmolVLMProcessor

from hones_core.demo import attention
from hones_core.demo.request import make_request
from hones_core.interventions import Plan

PROMPT = "Describe the image in one sentence."


@pytest.fixture(scope="module")
def smol(tiny_vlm):
    return tiny_vlm("smolvlm")


def test_loads_as_smolvlm_with_its_own_classes(smol):
    assert type(smol.model) is SmolVLMForConditionalGeneration
    assert isinstance(smol.processor, SmolVLMProcessor)
    assert smol.arch.family.name == "smolvlm" and smol.arch.family.nested_images
    assert smol.arch.vision_tower is smol.model.model.vision_model
    assert smol.arch.describe() == {"family": "smolvlm", "num_layers": 2, "num_heads": 4, "head_dim": 16,
                                    "intermediate_size": 96}


def test_generate_equals_a_greedy_loop(smol, images):
    [answer] = smol.generate([images[0]], [PROMPT], max_new_tokens=6)
    inputs = smol.encode([images[0]], [PROMPT]).inputs
    ids, tokens = inputs["input_ids"], []
    stops = {smol.stop_token_id, smol.tokenizer.eos_token_id}
    with torch.inference_mode():
        for _ in range(6):            # the whole sequence again each step: no cache, plain argmax
            step = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
            token = int(smol.model(**step).logits[0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert tokens and answer == smol.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_masking_neurons_equals_zeroing_their_down_projection_columns(smol, images):
    neurons = {0: [1, 5, 7, 40], 1: [0, 2, 95]}
    plan = Plan.scale_neurons(neurons, 0.0)
    masked = smol.next_token_logits([images[0]], [PROMPT], plans=plan)
    plain = smol.next_token_logits([images[0]], [PROMPT])
    edited = copy.deepcopy(smol.model)
    with torch.no_grad():
        for layer, ids in neurons.items():
            edited.model.text_model.layers[layer].mlp.down_proj.weight[:, ids] = 0
    inputs = smol.encode([images[0]], [PROMPT]).inputs
    with torch.inference_mode():
        want = edited(**inputs).logits[:, -1].float()
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=0)
    assert float((masked - plain).abs().max()) > 1e-4          # the edit did something


def test_scaling_by_one_changes_nothing_and_rows_keep_their_own_plans(smol, images):
    plain = smol.next_token_logits([images[0]], [PROMPT])
    same = smol.next_token_logits([images[0]], [PROMPT], plans=Plan.scale_neurons({0: list(range(96))}, 1.0))
    assert torch.equal(plain, same)                              # x1 multiplies nothing (bitwise)
    ablate = Plan.ablate_heads([(0, 0), (1, 2)])
    both = smol.next_token_logits([images[0]] * 2, [PROMPT] * 2, plans=[Plan(), ablate])
    alone = smol.next_token_logits([images[0]], [PROMPT], plans=ablate)
    torch.testing.assert_close(both[0:1], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1:2], alone, atol=1e-5, rtol=0)
    assert float((both[1] - both[0]).abs().max()) > 1e-4


def test_attention_grid_over_tiles_and_global_image(smol, images):
    request = make_request(task="caption", image=images[1])         # 30 x 50 px
    att = attention.head_attention(smol, request, heads=[(1, 2)], plans=[Plan()], labels=["base"])
    # longest edge 64: 38 x 64 -> stretched to 64 x 64 = 2 x 2 tiles of 32 px, 2 x 2 tokens each, + global
    assert [r.name for r in att.regions] == ["tile 1,1", "tile 1,2", "tile 2,1", "tile 2,2", "global image"]
    assert [r.box for r in att.regions][1] == (15, 0, 30, 25) and att.regions[-1].box == (0, 0, 30, 50)
    total = sum(float(r.weights.sum()) for r in att.regions)
    assert total == pytest.approx(float(att.image_mass[0, 0]), abs=1e-6) and 0 < total <= 1
    assert all(np.isfinite(r.weights).all() and (r.weights >= 0).all() for r in att.regions)
