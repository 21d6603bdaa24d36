import contextlib
import threading

import pytest
import torch

from hones_core.interventions import LearnedScale, NeuronScale, Plan, intervene

from conftest import top2_gap

HEADS = Plan.ablate_heads([(0, 1), (1, 3)])
NEURONS = Plan.scale_neurons({0: [1, 2, 3], 1: [10, 50]}, 0.0)


def test_head_replacement_and_neuron_scaling_change_the_logits(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    base = vlm.next_token_logits(images, prompts)
    for plan in (HEADS, NEURONS, Plan.scale_neurons({1: list(range(20))}, 2.5)):
        changed = vlm.next_token_logits(images, prompts, plans=plan)
        assert not torch.equal(changed, base)
        assert (changed - base).abs().max() > 1e-4


def test_model_is_bit_identical_after_the_context(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    base = vlm.next_token_logits(images, prompts)
    with intervene(vlm.arch, HEADS):
        inside = vlm.next_token_logits(images, prompts)
    with pytest.raises(RuntimeError, match="boom"), intervene(vlm.arch, NEURONS):
        raise RuntimeError("boom")  # hooks come off on error too
    assert not torch.equal(inside, base)
    assert torch.equal(vlm.next_token_logits(images, prompts), base)    # the same batch again: bitwise
    assert all(not l.o_proj._forward_pre_hooks and not l.down_proj._forward_pre_hooks for l in vlm.arch.layers)


def _rows_per_layer(vlm, call):
    """`call()`'s result and the rows each decoder layer's FFN computed in its first (prefill) call."""
    seen: dict[int, list[int]] = {layer.index: [] for layer in vlm.arch.layers}
    handles = [layer.down_proj.register_forward_pre_hook(
        lambda module, args, i=layer.index: seen[i].append(args[0].shape[0])) for layer in vlm.arch.layers]
    try:
        result = call()
    finally:
        for handle in handles:
            handle.remove()
    return result, [calls[0] for _, calls in sorted(seen.items())]


def _top2_margin(vlm, images, prompts, plans=None, *, max_new_tokens: int) -> float:
    """Smallest gap between the two best logits over every row's greedy steps (up to its stop token)."""
    inputs = vlm.encode(images, prompts).inputs
    kwargs = vlm.generation_kwargs(max_new_tokens)
    with torch.inference_mode(), intervene(vlm.arch, plans if plans is not None else Plan()), vlm.sharing(len(prompts)):
        out = vlm.model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return top2_gap(out.logits, tokens, kwargs["eos_token_id"])


# A row run in a batch of 2 and the same row run alone go through GEMMs of other shapes (Qwen's vision
# tower even runs every image's patches as one sequence), and BLAS picks kernels by shape, thread count
# and CPU: they agree to float32 rounding, not to the bit. Tiny fp32 models: logits of size ~0.1-1, a
# few ulp (1e-7) per op over 2 layers; 1e-5 leaves headroom, and any real leak between rows (a wrong
# row's plan, mask or positions) moves them by more than 1e-3, which the tests check too.
LOGITS = dict(rtol=0, atol=1e-5)
OTHER = Plan.scale_neurons({0: [5, 20], 1: [7]}, 3.0)     # another plan on row 1 (acts at layer 0, like NEURONS)


def test_rows_are_independent(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    image, prompt = [images[0]] * 2, [prompts[1]] * 2
    # Bitwise where the computation is the same: both batches have 2 rows and both plans on row 1 act
    # at layer 0, so no layer is shared and every GEMM has the same shape; only row 1's hooks differ.
    batch, rows = _rows_per_layer(vlm, lambda: vlm.next_token_logits(image, prompt, plans=[None, NEURONS]))
    other, other_rows = _rows_per_layer(vlm, lambda: vlm.next_token_logits(image, prompt, plans=[None, OTHER]))
    assert rows == other_rows == [2] * vlm.arch.num_layers
    assert torch.equal(batch[0], other[0])          # the unsteered row never sees row 1's plan, to the bit
    assert (batch[1] - other[1]).abs().max() > 1e-3
    # against the row run alone (another row count): equal up to float32 rounding
    alone = vlm.next_token_logits(image[:1], prompt[:1])
    torch.testing.assert_close(batch[0], alone[0], **LOGITS)
    assert (batch[1] - alone[0]).abs().max() > 1e-3  # the steered row is steered: far beyond the tolerance
    # two rows with different plans: each row is what it is with the other row's plan removed (same
    # shapes again, bitwise), and what it is run alone (up to rounding)
    both = vlm.next_token_logits(image, prompt, plans=[HEADS, NEURONS])
    assert torch.equal(both[0], vlm.next_token_logits(image, prompt, plans=[HEADS, None])[0])
    assert torch.equal(both[1], vlm.next_token_logits(image, prompt, plans=[None, NEURONS])[1])
    torch.testing.assert_close(both[0], vlm.next_token_logits(image[:1], prompt[:1], plans=HEADS)[0], **LOGITS)
    torch.testing.assert_close(both[1], vlm.next_token_logits(image[:1], prompt[:1], plans=NEURONS)[0], **LOGITS)
    assert (both[0] - alone[0]).abs().max() > 1e-3 and (both[0] - both[1]).abs().max() > 1e-3
    # rows of different lengths (left padding) agree up to float rounding
    mixed = vlm.next_token_logits(images, prompts, plans=[HEADS, None])
    assert torch.equal(mixed[1], vlm.next_token_logits(images, prompts)[1])   # same 2-row batch: bitwise
    torch.testing.assert_close(mixed[0], vlm.next_token_logits(images[:1], prompts[:1], plans=HEADS)[0], **LOGITS)


def test_generate_rows_are_independent(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    steer = Plan.scale_neurons({0: list(range(48)), 1: list(range(48))}, 3.0)
    other = Plan.scale_neurons({0: list(range(48, 96)), 1: [0]}, 0.5)
    image, prompt = [images[0]] * 2, [prompts[0]] * 2
    both = vlm.generate(image, prompt, plans=[None, steer], max_new_tokens=8)
    # same 2-row batch, another plan on row 1 (at layer 0 too: same shapes): row 0 is the same tokens
    assert both[0] == vlm.generate(image, prompt, plans=[None, other], max_new_tokens=8)[0]
    # against the rows run alone, whose logits agree only up to rounding: greedy tokens agree while the
    # top-2 gap at every step exceeds twice the logit tolerance (the gap can move by at most that much)
    alone = vlm.generate(images[:1], prompts[:1], max_new_tokens=8)[0]
    steered = vlm.generate(images[:1], prompts[:1], plans=steer, max_new_tokens=8)[0]
    assert _top2_margin(vlm, images[:1], prompts[:1], max_new_tokens=8) > 2 * LOGITS["atol"]
    assert _top2_margin(vlm, images[:1], prompts[:1], steer, max_new_tokens=8) > 2 * LOGITS["atol"]
    assert both[0] == alone and both[1] == steered and steered != alone


def test_threads_with_different_plans_match_sequential_runs(tiny_vlm, images, prompts):
    vlm = tiny_vlm("qwen2-vl")
    plans = [None, HEADS, NEURONS, Plan.ablate_heads([(1, 0)]), Plan.scale_neurons({0: [5]}, 3.0),
             Plan.scale_neurons({1: list(range(30))}, 0.5), Plan.ablate_heads([(0, 0), (0, 2)]), Plan()]
    # bitwise: each thread runs the very batch (2 rows, same shapes) that was run here, with as many
    # intra-op threads (torch gives every thread the same count), so only a leaked plan could change a bit
    expected = [vlm.next_token_logits(images, prompts, plans=p) for p in plans]
    results: dict[int, list] = {i: [] for i in range(len(plans))}
    threads_used: set[int] = set()
    barrier = threading.Barrier(len(plans))

    def work(i):
        barrier.wait()
        threads_used.add(torch.get_num_threads())
        for _ in range(5):
            results[i].append(vlm.next_token_logits(images, prompts, plans=plans[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert threads_used == {torch.get_num_threads()}
    assert len({tuple(e.flatten()[:8].tolist()) for e in expected}) == len(plans) - 1  # None == Plan()
    for i, outs in results.items():
        assert len(outs) == 5 and all(torch.equal(o, expected[i]) for o in outs), f"thread {i} saw another plan"
    assert all(not l.o_proj._forward_pre_hooks for l in vlm.arch.layers)


def test_capture_records_scaled_activations_at_the_last_position(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode(), intervene(vlm.arch, Plan(), capture="last") as plain:
        vlm.last_hidden(inputs)
    with torch.inference_mode(), intervene(vlm.arch, Plan.scale_neurons({1: [3, 4]}, 2.0), capture="all") as steered:
        vlm.last_hidden(inputs)
    assert plain.neurons[0].shape == (2, 96) and steered.neurons[1].shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(steered.neurons[1][:, -1, 3:5], 2 * plain.neurons[1][:, 3:5])
    torch.testing.assert_close(steered.neurons[0][:, -1], plain.neurons[0])   # layer 0 untouched


def test_mean_replacement_is_exact(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    o_proj = vlm.arch.layers[1].o_proj
    seen = []   # a forward hook sees the input o_proj really received, after our pre-hook
    handle = o_proj.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    try:
        vlm.next_token_logits(images, prompts)
        vlm.next_token_logits(images, prompts, plans=Plan.ablate_heads([(1, 2)]))
    finally:
        handle.remove()
    plain, ablated = (x.view(*x.shape[:2], 4, 16) for x in seen)
    expected = plain.clone()
    expected[:, :, 2] = (plain[:, :, 0] + plain[:, :, 1] + plain[:, :, 3]) / 3
    torch.testing.assert_close(ablated, expected)
    # the same 2-row batch both times (the plan acts only at layer 1): the other heads are untouched, bitwise
    assert torch.equal(ablated[:, :, [0, 1, 3]], plain[:, :, [0, 1, 3]])


def test_learned_scales_carry_gradients_and_factors_compose(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    scale = torch.zeros(3, requires_grad=True)
    plan = Plan(neurons=(LearnedScale(1, (4, 5, 6), scale),))
    encoded = vlm.encode(images, prompts, ["a red circle", "Yes"])
    with intervene(vlm.arch, plan):
        logp, mask = vlm.token_logprobs(encoded)
    (-logp.sum()).backward()
    vlm.model.zero_grad(set_to_none=True)   # the tiny model is shared with later tests
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    # two edits on one neuron multiply: 2 x 1.5 == 3
    twice = Plan(neurons=(NeuronScale(0, (7,), 2.0), NeuronScale(0, (7,), 1.5)))
    torch.testing.assert_close(vlm.next_token_logits(images, prompts, plans=twice),
                               vlm.next_token_logits(images, prompts, plans=Plan.scale_neurons({0: [7]}, 3.0)))


def test_bad_plans_are_refused_with_the_valid_range(tiny_vlm, images, prompts):
    vlm = tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"layer 5 is out of range: this model has 2"):
        vlm.next_token_logits(images, prompts, plans=Plan.ablate_heads([(5, 0)]))
    with pytest.raises(ValueError, match=r"head 4 is out of range"):
        vlm.next_token_logits(images, prompts, plans=Plan.ablate_heads([(0, 4)]))
    with pytest.raises(ValueError, match=r"neuron indices must lie in \[0, 96\)"):
        vlm.next_token_logits(images, prompts, plans=Plan.scale_neurons({0: [96]}, 2.0))
    with pytest.raises(ValueError, match="the batch has 2 rows but 3 per-row plans"):
        vlm.next_token_logits(images, prompts, plans=[None, HEADS, NEURONS])


def test_plan_builders_write_the_edits_by_hand():
    """Every plan builder lives in interventions: one factor, per-neuron multipliers, learned scales."""
    assert Plan.scale_neurons({3: [5, 1], 0: [2], 7: []}, 0.5).neurons == (
        NeuronScale(0, (2,), 0.5), NeuronScale(3, (5, 1), 0.5))          # sorted layers, empty layers dropped
    # stored scales' {layer: (neurons, 1 + s)}, times the slider's factor
    plan = Plan.multiply_neurons({2: ([4, 9], [1.5, 0.25]), 0: ([1], [2.0])}, 2.0)
    assert plan.neurons == (NeuronScale(0, (1,), (4.0,)), NeuronScale(2, (4, 9), (3.0, 0.5)))
    assert Plan.multiply_neurons({1: ([3], [1.25])}).neurons[0].multipliers().tolist() == [1.25]
    # learned: one LearnedScale per layer run, views of the one trained tensor
    scale = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    learned = Plan.learned(torch.tensor([0, 0, 2]), torch.tensor([5, 7, 1]), scale)
    assert [(e.layer, e.neurons) for e in learned.neurons] == [(0, (5, 7)), (2, (1,))]
    assert torch.allclose(learned.neurons[0].multipliers(), torch.tensor([1.1, 0.8]))
    learned.neurons[1].multipliers().sum().backward()
    assert scale.grad.tolist() == [0.0, 0.0, 1.0]


def _down_proj_inputs(vlm, call):
    """`call()`'s result and what each layer's `down_proj` received (after our pre-hook), by layer."""
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module, args, output):      # returns None: the output stays what it was
            seen.setdefault(layer, args[0].detach().clone())
        return hook
    # a forward hook sees the arguments the module really ran on, i.e. after every pre-hook
    handles = [layer.down_proj.register_forward_hook(record(layer.index)) for layer in vlm.arch.layers]
    try:
        result = call()
    finally:
        for handle in handles:
            handle.remove()
    return result, seen


def test_small_scales_act_in_bfloat16_multiplied_in_float32(tiny_dir, images, prompts):
    from hones_core.models import load_vlm

    vlm = load_vlm(tiny_dir("llava"), device="cpu", dtype="bfloat16")
    assert vlm.arch.layers[1].down_proj.weight.dtype == torch.bfloat16
    # why: multiplied in bfloat16, the factor itself rounds to 1 and the scale would do nothing
    assert torch.tensor(1.003, dtype=torch.bfloat16).item() == 1.0
    # two different rows: nothing is shared between them, so the unsteered passes are the same computation
    _, plain = _down_proj_inputs(vlm, lambda: vlm.next_token_logits(images, prompts))
    z = plain[1]                                                           # [2, seq, I] bfloat16
    columns = z[1, -1].float().abs().topk(8).indices.sort().values         # large activations of row 1
    plan = Plan.scale_neurons({1: columns.tolist()}, 1.003)
    _, steered = _down_proj_inputs(vlm, lambda: vlm.next_token_logits(images, prompts, plans=[None, plan]))
    out = steered[1]
    assert out.dtype == torch.bfloat16
    expected = (z[1][:, columns].float() * torch.tensor(1.003, dtype=torch.float32)).to(torch.bfloat16)
    assert torch.equal(out[1][:, columns], expected)
    assert (expected != z[1][:, columns]).any()                            # the scale really moved some values
    assert torch.equal(out[0], z[0])                                       # the unscaled row: bitwise untouched
    others = torch.ones(z.shape[-1], dtype=torch.bool)
    others[columns] = False
    assert torch.equal(out[1][:, others], z[1][:, others])                 # unscaled neurons: bitwise untouched
    assert torch.equal(steered[0], plain[0])                               # layer 0: no plan there


def test_scaling_float32_models_is_unchanged_and_learned_scales_at_zero_keep_their_gradient(tiny_vlm, images,
                                                                                           prompts):
    vlm = tiny_vlm("llava")
    _, plain = _down_proj_inputs(vlm, lambda: vlm.next_token_logits(images, prompts))
    plan = Plan.scale_neurons({1: [3, 40]}, 2.5)
    _, scaled = _down_proj_inputs(vlm, lambda: vlm.next_token_logits(images, prompts, plans=plan))
    expected = plain[1].clone()
    expected[..., [3, 40]] *= 2.5
    assert torch.equal(scaled[1], expected)
    # s = 0 leaves z as it is, yet the gradient reaches s (the edited columns are those listed, not those != 1)
    scale = torch.zeros(2, requires_grad=True)
    encoded = vlm.encode(images, prompts, ["a red circle", "Yes"])
    with intervene(vlm.arch, Plan(neurons=(LearnedScale(1, (3, 40), scale),))):
        logp, _ = vlm.token_logprobs(encoded)
    (-logp.sum()).backward()
    vlm.model.zero_grad(set_to_none=True)
    assert scale.grad is not None and (scale.grad != 0).all()


def test_token_stats_of_a_shared_prefix_count_every_row(tiny_vlm, images, prompts):
    """With rows sharing a layer (the same input), each kept row counts once per row it stands for."""
    vlm = tiny_vlm("llava")
    rows_images, rows_prompts = [images[0], images[0], images[1]], [prompts[0], prompts[0], prompts[1]]
    inputs = vlm.encode(rows_images, rows_prompts).inputs
    mask = inputs["attention_mask"]
    assert (mask == 0).any()                                  # left padding: some positions must not count

    def run(shared: bool):
        with torch.inference_mode(), intervene(vlm.arch, Plan(), capture="all", token_mask=mask) as cap, \
                (vlm.sharing(3) if shared else contextlib.nullcontext()):
            vlm.last_hidden(inputs)
        return cap
    shared, rows = _rows_per_layer(vlm, lambda: run(True))
    assert rows == [2] * vlm.arch.num_layers                  # rows 0 and 1 ran once
    alone = run(False)
    assert shared.stats.tokens == alone.stats.tokens == int(mask.sum())
    for layer in range(vlm.arch.num_layers):
        # by hand from the full capture: every row, only where the mask is 1
        z = alone.neurons[layer].double()
        keep = mask.bool()[:, :, None]
        positive = (keep & (z > 0)).sum((0, 1)).double()
        total = torch.where(keep, z, 0.0).sum((0, 1))
        torch.testing.assert_close(alone.stats.positive[layer], positive, rtol=0, atol=0)
        torch.testing.assert_close(alone.stats.total[layer], total, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(shared.stats.positive[layer], positive, rtol=0, atol=2)   # rounding at z ~ 0
        torch.testing.assert_close(shared.stats.total[layer], total, rtol=1e-5, atol=1e-4)


def test_a_one_head_model_refuses_head_ablation_clearly():
    """Mean replacement divides by num_heads - 1: with one head it is refused before any hook is installed."""
    from types import SimpleNamespace

    from hones_core.errors import UnsupportedModelError

    one_head = SimpleNamespace(num_layers=2, num_heads=1, head_dim=4, intermediate_size=8)
    with pytest.raises(UnsupportedModelError, match="1 attention head per layer; mean-replacing a head needs at "
                                                    "least two"):
        with intervene(one_head, Plan.ablate_heads([(0, 0)])):
            pass
