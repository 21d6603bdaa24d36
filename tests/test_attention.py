"""Where the heads look (`hones_core.demo.attention`): grids, weights, the figure.

The weights are checked two independent ways on a tiny model of every family: against the
model's own eager attention (`output_attentions=True`, a second copy loaded with
`attn_implementation="eager"`), and against attention computed here by hand from the
layer's q_proj / k_proj outputs, the cos/sin the decoder hands the layer, rotate-half
written out, GQA head grouping and a softmax, for one row run alone. Tolerance: 1e-5
absolute (float32; the routes differ in kernel shapes and summation order only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hones_core.demo import attention
from hones_core.demo.request import make_request
from hones_core.errors import DemoInputError
from hones_core.interventions import Plan

HEADS = [(0, 1), (1, 3)]           # 4 query heads, 2 kv heads: head 1 reads kv 0, head 3 reads kv 1
# every layer-0 neuron x 300: random tiny models write little through their FFNs (weights ~0.02), a
# large factor makes the change to layer 1's input, hence its attention, well above the tolerance
STEER = Plan.scale_neurons({0: list(range(96))}, 300.0)
TOL = 1e-5

# image 40 x 30 px; derived by hand from each tiny processor (testing.py):
#   llava: 32 px crop / 8 px patches = 4x4; onevision: base 4x4, high-res 1x2 tiles of 4x4 = 4x8,
#   unpadded to 4x6 (40x30 keeps 5.33 of 8 columns, padding 1 each side) + 4 newlines;
#   qwen: smart-resized to 32x32 -> 4x4 patches, merged 2x2 -> 2x2; idefics3/smolvlm: longest edge
#   64 -> 64x48 -> stretched to 64x64 -> 2x2 tiles of 32 px, 4x4 patches shuffled by 2 -> 2x2, + global
EXPECTED_GRIDS = {
    "llava": [(4, 4)], "llava-qwen2": [(4, 4)], "llava-onevision": [(4, 4), (4, 6)],
    "qwen2-vl": [(2, 2)], "qwen2.5-vl": [(2, 2)],
    "idefics3": [(2, 2)] * 5, "smolvlm": [(2, 2)] * 5,
}


def _request(image):
    return make_request(task="caption", image=image)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_by_hand(vlm, request, plan, layer: int, head: int) -> torch.Tensor:
    """`[seq]` attention of the last position for (layer, head), one row run alone under `plan`."""
    from hones_core.interventions import intervene

    arch = vlm.arch
    decoder_layer = vlm.model.get_decoder().layers[layer]
    seen = {}

    def keep(name, value):             # hooks must return None (a value would replace the module's input)
        seen.setdefault(name, value)

    hooks = [
        decoder_layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: keep("q", out)),
        decoder_layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keep("k", out)),
        decoder_layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: keep("rope", kw["position_embeddings"]), with_kwargs=True),
    ]
    inputs = vlm.encode([request.image], [request.prompts[0]]).inputs
    try:
        with torch.inference_mode(), intervene(arch, plan):
            vlm.last_hidden(inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    d = arch.head_dim
    kv = head // (arch.num_heads // arch.num_kv_heads)
    cos, sin = (t[0] for t in seen["rope"])                      # [seq, d]
    q = seen["q"][0, -1, head * d:(head + 1) * d]
    q = q * cos[-1] + rotate_half(q) * sin[-1]
    k = seen["k"][0, :, kv * d:(kv + 1) * d]                     # [seq, d]
    k = k * cos + rotate_half(k) * sin
    scores = [float(q @ k[j]) / math.sqrt(d) for j in range(k.shape[0])]
    top = max(scores)
    e = [math.exp(s - top) for s in scores]
    return torch.tensor([v / sum(e) for v in e])


@pytest.fixture(scope="module")
def computed(tiny_vlm, images):
    cache = {}

    def get(family):
        if family not in cache:
            vlm = tiny_vlm(family)
            request = _request(images[0])
            cache[family] = (vlm, request, attention.head_attention(vlm, request, heads=HEADS, plans=[Plan(), STEER]))
        return cache[family]
    return get


def test_grids_have_the_family_shape_and_hold_every_image_token(family, computed):
    vlm, request, att = computed(family)
    assert [(r.rows, r.cols) for r in att.regions] == EXPECTED_GRIDS[family]
    assert att.labels == ["base", "steered"] and att.heads == HEADS
    for r in att.regions:
        assert r.weights.shape == (2, len(HEADS), r.rows, r.cols) and r.weights.dtype == np.float32
    total = sum(r.weights.sum(axis=(2, 3)) + r.extra for r in att.regions)
    np.testing.assert_allclose(total, att.image_mass, atol=1e-6)
    assert (att.image_mass <= 1 + 1e-6).all() and (att.image_mass > 0).all()
    if family == "llava-onevision":     # 4 newline tokens closing the high-res rows carry weight, no cell
        assert att.regions[1].extra.shape == (2, len(HEADS)) and (att.regions[1].extra > 0).all()


def test_weights_equal_attention_computed_by_hand_from_q_and_k(family, computed):
    vlm, request, att = computed(family)
    ids = vlm.encode([request.image], [request.prompts[0]]).inputs["input_ids"][0]
    image_positions = (ids == vlm.model.config.image_token_id).nonzero()[:, 0]
    for p, plan in enumerate([Plan(), STEER]):
        for i, (layer, head) in enumerate(HEADS):
            hand = attention_by_hand(vlm, request, plan, layer, head)
            assert abs(float(hand.sum()) - 1) < 1e-6
            assert abs(float(hand[image_positions].sum()) - float(att.image_mass[p, i])) < TOL
            for r in att.regions:
                want = hand[list(r.positions)].reshape(r.rows, r.cols).numpy()
                np.testing.assert_allclose(r.weights[p, i], want, atol=TOL, rtol=0)


def test_weights_equal_the_models_own_eager_attention(family, computed, tiny_dir):
    from transformers import AutoModelForImageTextToText

    vlm, request, att = computed(family)
    eager = AutoModelForImageTextToText.from_pretrained(tiny_dir(family), attn_implementation="eager").eval()
    inputs = vlm.encode([request.image], [request.prompts[0]]).inputs
    with torch.inference_mode():
        out = eager(**inputs, output_attentions=True, use_cache=False)
    for i, (layer, head) in enumerate(HEADS):
        own = out.attentions[layer][0, head, -1]                  # [seq], last query position
        for r in att.regions:
            want = own[list(r.positions)].reshape(r.rows, r.cols).numpy()
            np.testing.assert_allclose(r.weights[0, i], want, atol=TOL, rtol=0)


def test_steering_earlier_neurons_moves_later_attention_only(family, computed):
    vlm, request, att = computed(family)
    for r in att.regions:
        # layer 0's attention runs before its FFN: masking layer-0 neurons cannot reach it
        np.testing.assert_allclose(r.weights[0, 0], r.weights[1, 0], atol=1e-7, rtol=0)
    # layer 1 reads the residual stream the masked neurons wrote to
    change = max(float(np.abs(r.weights[0, 1] - r.weights[1, 1]).max()) for r in att.regions)
    assert change > 20 * TOL          # 4.8e-4 to >1e-2 across the families


def test_bad_heads_are_refused_with_the_model_size(tiny_vlm, images):
    vlm = tiny_vlm("llava")
    with pytest.raises(DemoInputError, match=r"layers 0-1 and heads 0-3"):
        attention.head_attention(vlm, _request(images[0]), heads=[(2, 0)], plans=[Plan()], labels=["base"])
    with pytest.raises(DemoInputError, match="at least one head"):
        attention.head_attention(vlm, _request(images[0]), heads=[], plans=[Plan()], labels=["base"])


def test_figure_draws_base_and_steered_side_by_side(computed):
    vlm, request, att = computed("idefics3")
    picture, caption = attention.figure(att, request.image, head=1, panel=200)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert "layer 1 head 3" in caption and "\n" not in caption and "base" in caption and "steered" in caption
    # two views (tiles, global) x two plans; each panel 200 px wide (40x30 image), gaps of 8 px
    assert picture.width == 2 * 200 + 3 * 8
    assert picture.height == 26 + 2 * (150 + 22) + 3 * 8


def test_overlay_puts_the_brightest_block_on_the_cell_with_the_most_weight():
    from hones_core import plots

    image = Image.new("RGB", (40, 20), (128, 128, 128))
    grid = np.zeros((2, 4))
    grid[1, 2] = 1.0                                    # bottom row, third column
    panel = np.asarray(plots.attention_overlay(image, [grid], [(0, 0, 40, 20)], size=40, alpha=1.0))
    brightness = panel.astype(int).sum(-1)
    # cells are 10x10 px blocks (nearest upsampling): the hot one is x 20-29, y 10-19
    assert brightness[12:18, 22:28].min() > brightness[2:8, 2:8].max()
    assert (panel[12:18, 22:28] == panel[15, 25]).all()


def test_the_pass_stops_after_the_last_layer_asked_for_and_leaves_no_hooks(computed):
    vlm, request, att = computed("llava")
    later = []
    handle = vlm.model.get_decoder().layers[1].register_forward_pre_hook(lambda m, a: later.append(1))
    try:
        early = attention.head_attention(vlm, request, heads=[(0, 1)], plans=[Plan(), STEER])
    finally:
        handle.remove()
    assert later == []                                     # layer 1 never ran
    for r_early, r_full in zip(early.regions, att.regions):
        np.testing.assert_allclose(r_early.weights[:, 0], r_full.weights[:, 0], atol=1e-7, rtol=0)
    assert all(not layer.self_attn._forward_pre_hooks for layer in vlm.arch.layers)    # hooks removed on exit


def test_retrieval_reads_the_candidate_asked_for(tiny_vlm, images):
    vlm = tiny_vlm("qwen2-vl")
    request = make_request(task="retrieval", image=images[0], candidates="a red circle\na green square")
    first, second = (attention.head_attention(vlm, request, heads=[(1, 0)], plans=[Plan()], labels=["base"],
                                              prompt_index=i) for i in (0, 1))
    assert first.prompt == request.prompts[0] and second.prompt == request.prompts[1]
    hand = attention_by_hand(vlm, make_request(task="retrieval", image=images[0],
                                               candidates="a green square\na red circle"), Plan(), 1, 0)
    # the second candidate's prompt, run alone by hand (put first in a request of its own)
    np.testing.assert_allclose(second.regions[0].weights[0, 0].ravel(),
                               hand[list(second.regions[0].positions)].numpy(), atol=TOL, rtol=0)
    with pytest.raises(DemoInputError, match="prompt_index 2 is out of range"):
        attention.head_attention(vlm, request, heads=[(1, 0)], plans=[Plan()], labels=["base"], prompt_index=2)


def test_concurrent_calls_each_get_their_own_heads_and_plans(computed):
    from concurrent.futures import ThreadPoolExecutor

    vlm, request, att = computed("llava-qwen2")
    jobs = [([(0, 1)], [Plan()]), ([(1, 3)], [STEER])] * 4
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: attention.head_attention(vlm, request, heads=job[0], plans=job[1],
                                                                     labels=["row"]), jobs))
    for (heads, plans), result in zip(jobs, results):
        plan_index, head_index = (0, 0) if heads == [(0, 1)] else (1, 1)
        assert result.heads == heads
        np.testing.assert_allclose(result.regions[0].weights[0, 0], att.regions[0].weights[plan_index, head_index],
                                   atol=TOL, rtol=0)


def test_the_toy_vlms_top_heads_through_the_service(demo_service, examples):
    from conftest import demo_request

    example = examples["vqa"][0]
    request = demo_request(demo_service, example)             # x0 on the 2 % HONES neurons
    heads = demo_service.artifact.task("vqa").top_heads[:2]
    att = attention.head_attention(demo_service.vlm, request, heads=heads,
                                   plans=[Plan(), demo_service.plan(request)])
    # the toy: one 96 px image, no splitting; 96 / 16 px patches = 6, pixel-shuffled by 2 -> 3 x 3 tokens
    [region] = att.regions
    assert (region.name, region.rows, region.cols) == ("global image", 3, 3)
    assert region.box == (0, 0, *request.image.size)
    for i, (layer, head) in enumerate(heads):
        hand = attention_by_hand(demo_service.vlm, request, Plan(), layer, head)
        np.testing.assert_allclose(region.weights[0, i].ravel(), hand[list(region.positions)].numpy(),
                                   atol=TOL, rtol=0)
    picture, caption = attention.figure(att, request.image, head=0)
    assert picture.width > picture.height and f"layer {heads[0][0]} head {heads[0][1]}" in caption
