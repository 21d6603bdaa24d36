import pytest
import torch

from hones_core.models import ModelLoadError, load_vlm

from conftest import top2_gap


def test_load_vlm_reads_a_saved_directory(family, tiny_dir):
    vlm = load_vlm(tiny_dir(family), device="cpu")
    assert vlm.model.training is False
    assert vlm.device.type == "cpu" and next(vlm.model.parameters()).dtype == torch.float32
    assert vlm.tokenizer.padding_side == "left"
    assert vlm.name == str(tiny_dir(family))


def test_load_vlm_errors_name_the_source(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-dir"):
        load_vlm(tmp_path / "no-such-dir")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_vlm(file)


def test_batches_are_left_padded_chat_prompts(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    chat = vlm.chat_prompt(prompts[0])
    assert prompts[0] in chat and chat != prompts[0]
    ids = vlm.encode(images, prompts).inputs["input_ids"]
    pad = vlm.tokenizer.pad_token_id
    short = int(torch.argmin((ids != pad).sum(-1)))
    assert ids[short, 0] == pad and ids[short, -1] != pad   # padding on the left, prompt ends at the right edge
    assert (ids[:, -1] != pad).all()


def test_label_mask_covers_exactly_the_answer_tokens(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    answers = ["a red circle and a green square", "Yes"]
    encoded = vlm.encode(images, prompts, answers)
    for row, answer in enumerate(answers):
        labelled = encoded.labels[row][encoded.labels[row] != -100]
        assert vlm.tokenizer.decode(labelled).strip() == answer
    with_stop = vlm.encode(images, prompts, answers, with_stop=True)
    assert (with_stop.labels != -100).sum() == (encoded.labels != -100).sum() + 2
    assert with_stop.labels[0, -1] == vlm.stop_token_id


def test_next_token_logits_agree_with_generate_and_logprobs(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    logits = vlm.next_token_logits(images, prompts)
    assert logits.shape == (2, vlm.arch.unembedding().shape[0])
    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, **vlm.generation_kwargs(1))
    # generate computes the logits in other shapes (a KV cache, the LM head on both rows at once): they
    # agree to rounding, so the argmax is the same while the top-2 gap exceeds twice the tolerance
    best = logits.topk(2, dim=-1).values
    assert (best[:, 0] - best[:, 1]).min() > 2 * ROUNDING["atol"]
    assert out[:, -1].tolist() == logits.argmax(-1).tolist()
    # teacher forcing of a one-token answer equals the log-softmax of the next-token logits
    yes, no = vlm.yes_no_ids()
    assert yes != no
    assert vlm.answer_token_ids(prompts[0], "Yes") == [yes]
    logp = vlm.answer_logprobs(images, prompts, ["Yes", "Yes"])
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[:, yes], rtol=0, atol=1e-5)


def test_generate_is_greedy_and_deterministic(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    first = vlm.generate(images, prompts, max_new_tokens=6)
    assert len(first) == 2 and all(isinstance(a, str) for a in first)
    assert vlm.generate(images, prompts, max_new_tokens=6) == first      # the same batch again: the same tokens


def test_images_can_be_paths_and_missing_paths_are_named(tiny_vlm, images, prompts, tmp_path):
    vlm = tiny_vlm("llava")
    path = tmp_path / "red.png"
    images[0].save(path)
    # the same pixels, the same one-row batch: bitwise
    assert torch.equal(vlm.next_token_logits([path], prompts[:1]), vlm.next_token_logits(images[:1], prompts[:1]))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        vlm.next_token_logits([tmp_path / "nope.png"], prompts[:1])
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        vlm.next_token_logits(images[:1], prompts)


# ----- sharing the vision tower between rows with the same image (models.share_images) -----------------

SHARED = ("llava", "llava-qwen2", "llava-onevision", "idefics3")


def _noisy(seed: int, size: tuple[int, int]):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _count_tower_rows(vlm):
    """Calls of, and rows seen by, the vision tower's embeddings: what the tower really computes."""
    embeddings = next(m for name, m in vlm.arch.vision_tower.named_modules() if name.endswith("embeddings"))
    seen: list[int] = []
    handle = embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    return seen, handle


def _hidden(vlm, images, prompts, plans, *, shared: bool):
    from contextlib import nullcontext

    from hones_core.interventions import intervene
    from hones_core.models import share_images

    from hones_core.interventions import Plan

    inputs = vlm.encode(images, prompts).inputs
    plans = Plan() if plans is None else plans
    with torch.inference_mode(), intervene(vlm.arch, plans), (share_images(vlm.arch) if shared else nullcontext()):
        return vlm.last_hidden(inputs)


def _generate(vlm, images, prompts, plans, *, shared: bool, max_new_tokens: int = 8):
    """Greedy tokens per row, and the smallest top-2 logit gap over every row's steps (up to its stop token)."""
    from contextlib import nullcontext

    from hones_core.interventions import intervene
    from hones_core.models import share_images

    inputs = vlm.encode(images, prompts).inputs
    kwargs = vlm.generation_kwargs(max_new_tokens)
    with torch.inference_mode(), intervene(vlm.arch, plans), (share_images(vlm.arch) if shared else nullcontext()):
        out = vlm.model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return tokens.tolist(), top2_gap(out.logits, tokens, kwargs["eos_token_id"])


def _tower_outputs(vlm, images, prompts) -> list[torch.Tensor]:
    """Every tensor the vision tower hands on to the model (after sharing spread it to the rows), under
    `share_images`; the caller's hook runs after the sharing hooks (registered inside the block)."""
    from hones_core.interventions import Plan, intervene
    from hones_core.models import share_images

    seen: list[torch.Tensor] = []

    def flat(value):
        if torch.is_tensor(value):
            seen.append(value.detach().clone())
        elif isinstance(value, (tuple, list)):
            for v in value:
                flat(v)
        elif hasattr(value, "to_tuple"):
            flat(value.to_tuple())

    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode(), intervene(vlm.arch, Plan()), share_images(vlm.arch):
        handle = vlm.arch.vision_tower.register_forward_hook(lambda module, args, output: flat(output))
        try:
            vlm.last_hidden(inputs)
        finally:
            handle.remove()
    return seen


# Rows computed in batches of other sizes (the vision tower on 1 image instead of 2, the decoder on 1 row
# instead of 2) go through GEMMs of other shapes, and BLAS picks kernels by shape, thread count and CPU
# (e.g. MKL's AVX2 kernels give a row other bits at another position in the batch): they agree to float32
# rounding, not to the bit. Hidden states of the tiny fp32 models are O(1); a few ulp (1e-7) per op over
# 2 layers stays far below 1e-5, while a real error (a wrong row's image, plan or mask) moves them by
# more than 1e-3, which the tests check too. Token ids agree while every greedy step's top-2 logit gap
# exceeds twice the tolerance (the gap can move by at most that much).
ROUNDING = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SHARED)
def test_vision_tower_runs_once_for_rows_with_the_same_image(family, tiny_vlm, prompts):
    from hones_core.interventions import Plan

    vlm = tiny_vlm(family)
    image, prompt = _noisy(1, (44, 36)), prompts[1]
    steer = Plan.scale_neurons({0: list(range(48)), 1: list(range(48))}, 3.0)
    seen, handle = _count_tower_rows(vlm)
    try:
        _hidden(vlm, [image], [prompt], Plan(), shared=False)
        alone = list(seen)
        seen.clear()
        _hidden(vlm, [image] * 2, [prompt] * 2, [None, steer], shared=False)
        unshared = list(seen)
        seen.clear()
        _hidden(vlm, [image] * 2, [prompt] * 2, [None, steer], shared=True)
        shared = list(seen)
        seen.clear()
        vlm.generate([image] * 2, [prompt] * 2, plans=[None, steer], max_new_tokens=4)   # shares by itself
        generated = list(seen)
    finally:
        handle.remove()
    assert len(alone) == 1 and sum(unshared) == 2 * sum(alone)     # one image (its tiles) per row without sharing
    assert shared == alone and generated == alone                   # one call, on one image's rows
    assert not vlm.arch.vision_tower._forward_pre_hooks and not vlm.arch.vision_tower._forward_hooks


@pytest.mark.parametrize("family", SHARED)
def test_shared_rows_equal_the_unshared_batch_and_single_runs(family, tiny_vlm, prompts):
    from hones_core.interventions import Plan

    vlm = tiny_vlm(family)
    image, prompt = _noisy(2, (40, 40)), prompts[0]
    steer = Plan.scale_neurons({0: list(range(48)), 1: list(range(48))}, 3.0)
    plans = [None, steer]
    # bitwise where the computation is the same: the shared tower runs the one image, as a one-image
    # batch does, and both rows get exact copies of its outputs
    alone_tower = _tower_outputs(vlm, [image], [prompt])
    shared_tower = _tower_outputs(vlm, [image] * 2, [prompt] * 2)
    assert len(shared_tower) == len(alone_tower) > 0
    for one, two in zip(alone_tower, shared_tower):
        n = one.shape[0]
        assert two.shape[0] == 2 * n and torch.equal(two[:n], one) and torch.equal(two[n:], one)
    # the tower on 1 image instead of 2, the decoder on 2 rows instead of 1: equal up to float rounding
    shared = _hidden(vlm, [image] * 2, [prompt] * 2, plans, shared=True)
    torch.testing.assert_close(shared, _hidden(vlm, [image] * 2, [prompt] * 2, plans, shared=False), **ROUNDING)
    # the base row is the plain single run, the steered row the steered single run (and far from the base)
    alone = _hidden(vlm, [image], [prompt], Plan(), shared=False)[0]
    torch.testing.assert_close(shared[0], alone, **ROUNDING)
    torch.testing.assert_close(shared[1], _hidden(vlm, [image], [prompt], steer, shared=False)[0], **ROUNDING)
    assert (shared[1] - alone).abs().max() > 1e-3
    tokens, gap = _generate(vlm, [image] * 2, [prompt] * 2, plans, shared=True)
    assert gap > 2 * ROUNDING["atol"]
    assert tokens == _generate(vlm, [image] * 2, [prompt] * 2, plans, shared=False)[0]
    assert tokens[0] == _generate(vlm, [image], [prompt], Plan(), shared=False)[0][0]


@pytest.mark.parametrize("family", SHARED + ("qwen2-vl",))
def test_batches_mixing_images_share_only_exact_duplicates(family, tiny_vlm, images, prompts):
    from hones_core.interventions import Plan

    vlm = tiny_vlm(family)
    a, b = _noisy(3, (40, 30)), _noisy(4, (30, 50))
    almost_a = a.copy()
    centre = (20, 15)       # kept by every processor's resize/crop, unlike a corner
    almost_a.putpixel(centre, tuple(255 - v for v in a.getpixel(centre)))   # one pixel differs
    batch = [a, b, a, images[0], almost_a]
    texts = [prompts[0], prompts[1], prompts[1], prompts[0], prompts[0]]
    plans = [None, Plan.ablate_heads([(0, 1)]), Plan.scale_neurons({1: list(range(20))}, 2.5), None, None]
    shared = _hidden(vlm, batch, texts, plans, shared=True)
    unshared = _hidden(vlm, batch, texts, plans, shared=False)
    tokens, gap = _generate(vlm, batch, texts, plans, shared=True)
    if vlm.arch.vision_tower is None:      # Qwen-VL: left unshared by design, so the very same computation
        assert torch.equal(shared, unshared)
        assert tokens == _generate(vlm, batch, texts, plans, shared=False)[0]
        return
    # the tower ran on 4 images instead of 5 (other shapes): equal up to float rounding
    torch.testing.assert_close(shared, unshared, **ROUNDING)
    assert gap > 2 * ROUNDING["atol"]
    assert tokens == _generate(vlm, batch, texts, plans, shared=False)[0]
    seen, handle = _count_tower_rows(vlm)
    try:
        alone = {}
        for name, image in {"a": a, "b": b, "solid": images[0], "almost_a": almost_a}.items():
            seen.clear()
            _hidden(vlm, [image], texts[:1], Plan(), shared=True)
            alone[name] = sum(seen)
        seen.clear()
        _hidden(vlm, batch, texts, plans, shared=False)
        unshared = sum(seen)
        seen.clear()
        _hidden(vlm, batch, texts, plans, shared=True)
        shared_rows = sum(seen)
    finally:
        handle.remove()
    # only the second `a` is skipped: b, the solid image and the one-pixel change all run (Idefics3 also
    # shares equal tiles inside the solid image, alone or in the batch)
    assert shared_rows == sum(alone.values()) < unshared


def test_vision_sharing_is_off_outside_the_block_and_for_other_threads(tiny_vlm, prompts):
    import threading

    from hones_core.models import share_images

    vlm = tiny_vlm("llava")
    image = _noisy(5, (32, 32))
    seen, handle = _count_tower_rows(vlm)
    other: list[int] = []
    try:
        with share_images(vlm.arch):
            thread = threading.Thread(target=lambda: (_hidden(vlm, [image] * 2, [prompts[0]] * 2, None, shared=False),
                                                      other.extend(seen)))
            thread.start()
            thread.join()
            seen.clear()
            _hidden(vlm, [image] * 3, [prompts[0]] * 3, None, shared=False)   # inside the block: shared
            inside = list(seen)
        seen.clear()
        _hidden(vlm, [image] * 3, [prompts[0]] * 3, None, shared=False)
        after = list(seen)
    finally:
        handle.remove()
    assert other == [2] and inside == [1] and after == [3]
    assert not vlm.arch.vision_tower._forward_pre_hooks and not vlm.arch.vision_tower._forward_hooks
