"""Decoder-prefix sharing (`sharing.share_prefix`): rows that agree up to a layer run it once.

What holds on every CPU, and is asserted here:
- a layer runs once per group of rows whose inputs are bitwise equal and whose plans act alike there,
  and the rows of a group get exact copies (bitwise) of its outputs, cache entries and captures;
- a shared run equals the unshared run up to float32 rounding (`ROUNDING`): the shared layers run on
  fewer rows, and BLAS picks kernels by shape, thread count and CPU. Where nothing is shared both runs
  are the same computation and are compared bitwise.
Which rows enter layer 0 with equal bits is measured, not assumed: rows with the same image and text
do on most CPUs, but the image path runs every row in one GEMM, and kernels whose rounding depends on
the row's position in it (MKL's AVX2 kernels) give duplicates other last bits; such rows then run apart.
"""

import threading
from contextlib import nullcontext

import pytest
import torch

from hones_core.arch import UnsupportedModelError
from hones_core.interventions import Plan, intervene
from hones_core.sharing import _decoder_layers, _fresh_cache, share_images, share_prefix, share_rows

from conftest import top2_gap


def _noisy(seed: int, size: tuple[int, int]):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# Shared and unshared runs compute the shared layers on other row counts: equal up to float32 rounding.
# Hidden states and FFN activations of the tiny fp32 models are O(1); a few ulp (1e-7) per op over 2
# layers stays far below 1e-5, while a wrong row, plan, mask or cache entry moves them by far more.
# Greedy tokens agree while every step's top-2 logit gap exceeds twice the tolerance.
ROUNDING = dict(rtol=1e-5, atol=1e-5)


def _classes(tensor: torch.Tensor) -> list[int]:
    """Per row, the first row bitwise equal to it."""
    return [next(j for j in range(i + 1) if torch.equal(tensor[j], tensor[i])) for i in range(tensor.shape[0])]


def _groups(entry: list[int], keys: list[list[int]]) -> list[int]:
    """Rows each layer must run: distinct (input class at layer 0, plan key up to that layer) pairs."""
    return [len(set(zip(entry, layer_keys))) for layer_keys in keys]


class _RowCounter:
    """Rows each decoder layer's FFN (and attention) really computes, call by call: `calls[layer]`; and
    which rows enter layer 0 bitwise equal, call by call: `entries` (seen before any sharing hook)."""

    def __init__(self, vlm):
        self.calls: dict[int, list[int]] = {layer.index: [] for layer in vlm.arch.layers}
        self.handles = [layer.down_proj.register_forward_pre_hook(
            lambda module, args, i=layer.index: self.calls[i].append(args[0].shape[0])) for layer in vlm.arch.layers]
        self.attention = {layer.index: [] for layer in vlm.arch.layers}
        self.handles += [layer.o_proj.register_forward_pre_hook(
            lambda module, args, i=layer.index: self.attention[i].append(args[0].shape[0]))
            for layer in vlm.arch.layers]
        self.entries: list[list[int]] = []
        self.handles.append(_decoder_layers(vlm.arch)[0].register_forward_pre_hook(
            lambda module, args, kwargs: self.entries.append(_classes(args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True))

    def prefill(self) -> list[int]:
        """Rows of each layer's first call (the prefill pass)."""
        return [calls[0] for _, calls in sorted(self.calls.items())]

    def entry(self) -> list[int]:
        """Classes of bitwise-equal rows entering layer 0 in the first call (the prefill pass)."""
        return self.entries[0]

    def clear(self):
        for calls in (*self.calls.values(), *self.attention.values()):
            calls.clear()
        self.entries.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run(vlm, images, prompts, plans, *, shared: bool, capture: str | None = None, max_new_tokens: int = 6):
    """Generated tokens, final hidden states, captured FFN activations (generate's, the forward's) and the
    smallest top-2 logit gap of the greedy steps, with or without prefix sharing."""
    inputs = vlm.encode(images, prompts).inputs
    kwargs = vlm.generation_kwargs(max_new_tokens)
    sharing = share_rows(vlm.arch) if shared else share_images(vlm.arch)
    with torch.inference_mode(), intervene(vlm.arch, plans, capture=capture) as generated, sharing:
        out = vlm.model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
    sharing = share_rows(vlm.arch) if shared else share_images(vlm.arch)
    with torch.inference_mode(), intervene(vlm.arch, plans, capture=capture) as forward, sharing:
        hidden = vlm.last_hidden(inputs)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return (tokens, hidden, (generated.neurons if capture else {}), (forward.neurons if capture else {}),
            top2_gap(out.logits, tokens, kwargs["eos_token_id"]))


def _assert_same(a, b, *, exact: bool = False):
    """Shared run `a` equals unshared run `b`: bitwise if `exact` (nothing was shared, so the same
    computation), else up to float rounding (and the same greedy tokens, the top-2 gaps being wide)."""
    tokens_a, hidden_a, gen_a, fwd_a, gap_a = a
    tokens_b, hidden_b, gen_b, fwd_b, gap_b = b

    def same(x, y, what):
        if exact:
            assert torch.equal(x, y), what
        else:
            torch.testing.assert_close(x, y, **ROUNDING, msg=lambda m: f"{what}: {m}")

    if not exact:
        assert min(gap_a, gap_b) > 2 * ROUNDING["atol"], "near-tie in greedy decoding: tokens may differ"
    assert torch.equal(tokens_a, tokens_b)
    same(hidden_a, hidden_b, "final hidden states")
    for captured_a, captured_b in ((gen_a, gen_b), (fwd_a, fwd_b)):
        assert captured_a.keys() == captured_b.keys()
        for layer in captured_a:
            same(captured_a[layer], captured_b[layer], f"capture of layer {layer}")


def _assert_copies(result, entry: list[int], keys: list[list[int]]):
    """Rows of one group are exact copies: its layer's capture, and after the last layer the hidden states."""
    _, hidden, gen, fwd, _ = result
    for layer, layer_keys in enumerate(keys):
        group = list(zip(entry, layer_keys))
        for i, j in ((i, j) for i in range(len(group)) for j in range(i) if group[i] == group[j]):
            for captured in (gen, fwd):
                if layer in captured:
                    assert torch.equal(captured[layer][i], captured[layer][j]), f"layer {layer}: rows {j}, {i}"
            if layer == len(keys) - 1:
                assert torch.equal(hidden[i], hidden[j]), f"rows {j} and {i} were shared to the end"


@pytest.mark.parametrize("capture", ["last", "all"])
def test_shared_prefix_matches_unshared_and_runs_only_distinct_rows(family, tiny_vlm, prompts, capture):
    vlm = tiny_vlm(family)
    a, b = _noisy(11, (40, 30)), _noisy(12, (30, 50))
    images = [a, a, b, a, a, b, a]
    texts = [prompts[0], prompts[0], prompts[1], prompts[0], prompts[1], prompts[1], prompts[0]]
    plans = [None, Plan.ablate_heads([(1, 2)]), None, Plan.scale_neurons({1: [1, 2, 3]}, 2.0), None,
             Plan.ablate_heads([(0, 1)]), None]
    # distinct inputs: (a, p0) x4 [rows 0 1 3 6], (b, p1) x2 [rows 2 5], (a, p1) [row 4].
    distinct = [0, 0, 2, 0, 4, 2, 0]
    keys = [[0, 0, 0, 0, 0, 1, 0],      # layer 0: row 5 ablates head (0, 1), so it leaves its group
            [0, 1, 0, 2, 0, 3, 0]]      # layer 1: rows 1 and 3 have their own layer-1 plans, row 5 its own input
    counter = _RowCounter(vlm)
    try:
        unshared = _run(vlm, images, texts, plans, shared=False, capture=capture)
        assert counter.prefill() == [7, 7]
        counter.clear()
        shared = _run(vlm, images, texts, plans, shared=True, capture=capture)
        entry = counter.entry()
        # only rows with the same image and text can enter equal; where all of them do: 4 and 6 groups
        assert all(distinct[i] == distinct[j] for i, j in enumerate(entry))
        expected = _groups(entry, keys)
        assert entry != distinct or expected == [4, 6]
        assert counter.prefill() == expected
        assert counter.attention[0][0] == expected[0] and counter.attention[1][0] == expected[1]
        # generate: prefill shared, then decoding steps on every row; then the plain forward, shared again
        assert all(calls[1:-1] == [7] * (len(calls) - 2) and len(calls) > 2 for calls in counter.calls.values())
        assert [calls[-1] for _, calls in sorted(counter.calls.items())] == expected
    finally:
        counter.remove()
    _assert_copies(shared, entry, keys)
    _assert_same(shared, unshared)
    layers = _decoder_layers(vlm.arch)
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)


def test_one_plan_for_all_rows_shares_every_layer_and_spreads_the_capture(family, tiny_vlm, prompts):
    vlm = tiny_vlm(family)
    image = _noisy(13, (36, 36))
    plan = Plan(heads=((0, 3),), neurons=Plan.scale_neurons({1: list(range(30))}, 0.0).neurons)
    keys = [[0, 0, 0], [0, 0, 0]]
    counter = _RowCounter(vlm)
    try:
        shared = _run(vlm, [image] * 3, [prompts[1]] * 3, plan, shared=True, capture="all")
        entry = counter.entry()
        assert counter.prefill() == _groups(entry, keys)          # [1, 1] where the rows enter equal
        assert entry != [0, 0, 0] or counter.prefill() == [1, 1]
    finally:
        counter.remove()
    _assert_copies(shared, entry, keys)
    _assert_same(shared, _run(vlm, [image] * 3, [prompts[1]] * 3, plan, shared=False, capture="all"),
                 exact=entry == [0, 1, 2])                      # nothing shared: the same computation
    assert all(z.shape[0] == 3 for z in shared[2].values())


def test_rows_whose_plans_differ_early_are_not_merged(tiny_vlm, prompts):
    vlm = tiny_vlm("llava")
    image = _noisy(14, (32, 32))
    cases = [   # (plans, plan keys of the two rows at layers 0 and 1)
        ([None, Plan.scale_neurons({0: [4]}, 0.0)], [[0, 1], [0, 1]]),     # differ at layer 0: nothing shared
        ([None, Plan.ablate_heads([(0, 0)])], [[0, 1], [0, 1]]),
        ([None, Plan.ablate_heads([(1, 0)])], [[0, 0], [0, 1]]),           # differ at layer 1 only
        ([Plan.ablate_heads([(1, 0)]), Plan.ablate_heads([(1, 0)])], [[0, 0], [0, 0]]),   # equal plans, other objects
        ([Plan.scale_neurons({0: [4]}, 1.0), None], [[0, 0], [0, 0]]),     # x * 1.0 is x: the same plan
        ([Plan.scale_neurons({1: [4]}, 2.0), Plan.scale_neurons({1: [4]}, 2.0 + 2 ** -20)], [[0, 0], [0, 1]]),
    ]
    for plans, keys in cases:
        counter = _RowCounter(vlm)
        try:
            shared = _run(vlm, [image] * 2, [prompts[0]] * 2, plans, shared=True, capture="last")
            rows, entry = counter.prefill(), counter.entry()
        finally:
            counter.remove()
        assert rows == _groups(entry, keys), plans     # where both rows enter equal: [2, 2], [1, 2] or [1, 1]
        _assert_copies(shared, entry, keys)
        _assert_same(shared, _run(vlm, [image] * 2, [prompts[0]] * 2, plans, shared=False, capture="last"),
                     exact=rows == [2, 2])             # nothing shared: the same computation, bitwise


def test_rows_with_equal_hidden_states_but_other_masks_are_not_merged(tiny_vlm, prompts):
    """Equal hidden states are not enough: the row's attention mask and positions must match too."""
    vlm = tiny_vlm("llava")
    layers = _decoder_layers(vlm.arch)
    torch.manual_seed(0)
    hidden = torch.randn(1, 5, 64).expand(2, 5, 64).contiguous()
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 0] = False            # row 1 does not see position 0
    mask[1, :, 0, 0] = True
    positions = torch.arange(5)[None].expand(2, 5)
    rotary = vlm.model.model.language_model.rotary_emb(hidden, positions)
    counter = _RowCounter(vlm)
    try:
        with torch.inference_mode():
            plain = layers[0](hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            with share_prefix(vlm.arch):
                shared = layers[0](hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
                same_mask = layers[0](hidden, attention_mask=mask[:1].expand(2, -1, -1, -1), position_ids=positions,
                                      position_embeddings=rotary)
            # what the shared call ran: the kept row alone (BLAS may pick other kernels for other row counts)
            alone = layers[0](hidden[:1], attention_mask=mask[:1], position_ids=positions[:1],
                              position_embeddings=tuple(r[:1] for r in rotary))
    finally:
        counter.remove()
    assert counter.calls[0] == [2, 2, 1, 1]
    # bitwise: `plain` and `shared` both ran 2 rows (not merged), and `alone` is the 1-row call the merged one ran
    assert torch.equal(plain, shared) and not torch.equal(shared[0], shared[1])
    assert torch.equal(same_mask[0], same_mask[1]) and torch.equal(same_mask[0], alone[0])


def test_unknown_layer_arguments_are_refused_not_guessed(tiny_vlm):
    vlm = tiny_vlm("llava")
    layer = _decoder_layers(vlm.arch)[0]
    hidden = torch.zeros(2, 4, 64)
    with torch.inference_mode(), share_prefix(vlm.arch):
        with pytest.raises(UnsupportedModelError, match="'mystery'"):
            layer(hidden, mystery=torch.zeros(2, 4))
        with pytest.raises(UnsupportedModelError, match="position_ids"):
            layer(hidden, position_ids=torch.zeros(3, 2, 4, dtype=torch.long))    # 3-D (mrope-style) positions
    # outside a block the layer is untouched by sharing (the hooks are gone)
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_only_empty_dynamic_cache_layers_are_shared(tiny_vlm):
    from transformers import DynamicCache, StaticCache

    vlm = tiny_vlm("llava")
    config = vlm.model.config.get_text_config()
    assert _fresh_cache(None, 0)
    assert _fresh_cache(DynamicCache(), 1)
    cache = DynamicCache(config=config)
    assert _fresh_cache(cache, 0)
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    assert not _fresh_cache(cache, 0) and _fresh_cache(cache, 1)      # layer 0 holds keys already
    assert not _fresh_cache(StaticCache(config=config, max_cache_len=8), 0)


def test_a_second_chunk_of_prompt_after_a_filled_cache_runs_unshared(tiny_vlm, prompts):
    """A multi-token call on a cache that holds keys (chunked prefill) is not shared, and stays correct."""
    from transformers import DynamicCache

    vlm = tiny_vlm("llava")
    image = _noisy(15, (32, 32))
    inputs = vlm.encode([image] * 2, [prompts[0]] * 2).inputs
    model = vlm.arch.base_model
    results = []
    for shared in (False, True):
        counter = _RowCounter(vlm)
        try:
            cache = DynamicCache(config=vlm.model.config.get_text_config())
            with torch.inference_mode(), (share_rows(vlm.arch) if shared else nullcontext()):
                model(**inputs, cache=cache, use_cache=True)
                more = torch.tensor([[5, 6, 7]] * 2)
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(more)], dim=1)
                out = model(input_ids=more, attention_mask=mask, cache=cache, use_cache=True)
            results.append((out.last_hidden_state, cache.layers[1].keys))
            if shared:
                first = len(set(counter.entry()))       # 1 where the two rows enter equal
                assert counter.calls[0] == [first, 2] and counter.calls[1] == [first, 2]
        finally:
            counter.remove()
    prompt_length = inputs["input_ids"].shape[1]
    keys = results[1][1]
    assert keys.shape[0] == 2
    if first == 1:     # the prompt ran on one row, its keys copied to both; the second chunk ran on both
        assert torch.equal(keys[0, :, :prompt_length], keys[1, :, :prompt_length])
    exact = first == 2  # nothing shared: the same computation
    for plain, with_sharing in zip(results[0], results[1]):
        if exact:
            assert torch.equal(plain, with_sharing)
        else:
            torch.testing.assert_close(with_sharing, plain, **ROUNDING)


def test_vlm_calls_share_the_prefix(tiny_vlm, prompts):
    vlm = tiny_vlm("idefics3")
    image = _noisy(16, (40, 40))
    plans = [None, Plan.ablate_heads([(1, 1)]), Plan.ablate_heads([(1, 2)])]
    counter = _RowCounter(vlm)
    entries = []
    try:
        answers = vlm.generate([image] * 3, [prompts[0]] * 3, plans=plans, max_new_tokens=4)
        generated, _ = counter.prefill(), entries.append(counter.entry())
        counter.clear()
        logits = vlm.next_token_logits([image] * 3, [prompts[0]] * 3, plans=plans)
        forward, _ = counter.prefill(), entries.append(counter.entry())
        counter.clear()
        logp = vlm.answer_logprobs([image] * 3, [prompts[0]] * 3, ["red circle"] * 3, plans=plans)
        teacher_forced, _ = counter.prefill(), entries.append(counter.entry())
    finally:
        counter.remove()
    keys = [[0, 0, 0], [0, 1, 2]]
    assert generated == _groups(entries[0], keys) and forward == _groups(entries[1], keys)
    assert teacher_forced == _groups(entries[2], keys)
    assert any(entry != [0, 0, 0] for entry in entries) or generated == forward == teacher_forced == [1, 3]
    # against each row run alone (other row counts, so other kernels): equal up to float rounding, and the
    # same greedy answer while the top-2 gaps are wide
    for i, plan in enumerate(plans):
        alone = plan or Plan()
        one = _run(vlm, [image], [prompts[0]], alone, shared=False, max_new_tokens=4)
        assert one[-1] > 2 * ROUNDING["atol"]
        assert answers[i] == vlm.generate([image], [prompts[0]], plans=alone, max_new_tokens=4)[0]
        torch.testing.assert_close(logits[i], vlm.next_token_logits([image], [prompts[0]], plans=alone)[0],
                                   **ROUNDING)
        torch.testing.assert_close(logp[i], vlm.answer_logprobs([image], [prompts[0]], ["red circle"],
                                                                plans=alone)[0], **ROUNDING)
    assert (logits[1] - logits[0]).abs().max() > 1e-3 and (logits[2] - logits[1]).abs().max() > 1e-3


def test_prefix_sharing_is_off_outside_the_block_and_for_other_threads(tiny_vlm, prompts):
    vlm = tiny_vlm("qwen2-vl")
    image = _noisy(17, (32, 32))
    counter = _RowCounter(vlm)
    other: list[list[int]] = []

    def plain_forward():
        _run(vlm, [image] * 2, [prompts[0]] * 2, Plan(), shared=False)
        other.append(counter.prefill())

    try:
        with share_prefix(vlm.arch):
            thread = threading.Thread(target=plain_forward)
            thread.start()
            thread.join()
            counter.clear()
            inputs = vlm.encode([image] * 3, [prompts[0]] * 3).inputs
            with torch.inference_mode():
                vlm.last_hidden(inputs)
            inside, entry = counter.prefill(), counter.entry()
        counter.clear()
        with torch.inference_mode():
            vlm.last_hidden(inputs)
        after = counter.prefill()
    finally:
        counter.remove()
    assert other == [[2, 2]] and after == [3, 3]
    assert inside == [len(set(entry))] * 2          # [1, 1] where the three rows enter equal
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in _decoder_layers(vlm.arch))


def test_concurrent_shared_batches_match_sequential_runs(tiny_vlm, prompts):
    vlm = tiny_vlm("llava-qwen2")
    image = _noisy(18, (32, 32))
    batches = [[None, Plan.ablate_heads([(1, h)])] for h in range(4)] + [[Plan.scale_neurons({1: [3]}, 0.0), None]]
    expected = [vlm.next_token_logits([image] * 2, [prompts[1]] * 2, plans=p) for p in batches]
    intra_op = torch.get_num_threads()
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(batches))

    # bitwise: each thread runs the very batches run here (same rows, plans and shapes) with as many
    # intra-op threads, so only another thread's plan or sharing leaking in could change a bit
    def work(i):
        try:
            barrier.wait()
            assert torch.get_num_threads() == intra_op
            for _ in range(3):
                results[i] = vlm.next_token_logits([image] * 2, [prompts[1]] * 2, plans=batches[i])
                assert torch.equal(results[i], expected[i])
        except BaseException as err:      # re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(torch.equal(results[i], expected[i]) for i in range(len(batches)))


# ----- starting a pass at a decoder layer (`trace_layers`, `run_from_layer`) --------------------------

def test_a_pass_started_at_a_layer_equals_the_full_pass(tiny_vlm, family, images, prompts):
    # rows continue trace rows [0, 1, 0, 1] under [none, none, head 1 of `layer`, head 2 of `layer`]; the full
    # passes run the same rows from the embeddings. The started pass computes layers >= `layer` on 4 rows where
    # the full pass runs 2 (other GEMM shapes): equal up to float32 rounding; a wrong row, mask, rotary
    # position or a plan applied at the wrong layer moves the logits by far more than that.
    from hones_core.sharing import run_from_layer, trace_layers

    vlm = tiny_vlm(family)
    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode():
        with trace_layers(vlm.arch) as trace:
            base = vlm.last_hidden(inputs, use_cache=False)
        assert trace.rows == 2 and trace.nbytes() >= vlm.arch.num_layers * base.numel() * base.element_size()
        for layer in range(vlm.arch.num_layers):
            plans = [None, None, Plan.ablate_heads([(layer, 1)]), Plan.ablate_heads([(layer, 2)])]
            with intervene(vlm.arch, plans):
                started = run_from_layer(vlm.arch, trace, layer, torch.tensor([0, 1, 0, 1]))
            with intervene(vlm.arch, plans[2:]):
                ablated = vlm.last_hidden(inputs, use_cache=False)
            torch.testing.assert_close(started[:2], base, **ROUNDING)
            torch.testing.assert_close(started[2:], ablated, **ROUNDING)
            assert (ablated - base).abs().max() > 1e-3      # the plan does act


def test_a_trace_refuses_a_cached_pass(tiny_vlm, images, prompts):
    from hones_core.sharing import trace_layers

    vlm = tiny_vlm("llava")
    inputs = vlm.encode(images, prompts).inputs
    with pytest.raises(UnsupportedModelError, match="use_cache=False"), torch.inference_mode():
        with trace_layers(vlm.arch):
            vlm.last_hidden(inputs, use_cache=True)


def test_extended_inputs_append_tokens_on_the_right_of_each_row(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    inputs = vlm.encode(images, prompts).inputs
    extended = vlm.extend_inputs(inputs, [[5, 6, 7], []])
    ids, mask = extended["input_ids"], extended["attention_mask"]
    real = [inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist() for r in range(2)]
    assert ids.shape[1] == max(len(real[0]) + 3, len(real[1]))
    assert ids[0][mask[0].bool()].tolist() == real[0] + [5, 6, 7] and ids[1][mask[1].bool()].tolist() == real[1]
    assert mask[:, -1].tolist() == [1, 1] and torch.equal(extended["pixel_values"], inputs["pixel_values"])
    again = vlm.extend_inputs(inputs, [[], [9]], rows=[1, 1])           # row 1 twice: its pixels too
    assert torch.equal(again["pixel_values"][0], inputs["pixel_values"][1])


def test_a_trace_can_keep_one_layer_only(tiny_vlm, images, prompts):
    from hones_core.sharing import run_from_layer, trace_layers

    vlm = tiny_vlm("qwen2-vl")
    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode():
        with trace_layers(vlm.arch) as full:
            vlm.last_hidden(inputs, use_cache=False)
        with trace_layers(vlm.arch, keep=(1,)) as one:
            vlm.last_hidden(inputs, use_cache=False)
        assert one.hidden[0] is None and one.nbytes() < full.nbytes()
        rows = torch.tensor([1, 0])
        assert torch.equal(run_from_layer(vlm.arch, one, 1, rows), run_from_layer(vlm.arch, full, 1, rows))
        with pytest.raises(ValueError, match="did not keep the inputs of layer 0"):
            run_from_layer(vlm.arch, one, 0, rows)
