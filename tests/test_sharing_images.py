"""Vision-tower sharing (`sharing.share_images`): rows with the same image run the tower once."""

import pytest
import torch

from conftest import top2_gap


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
    from hones_core.sharing import share_images

    from hones_core.interventions import Plan

    inputs = vlm.encode(images, prompts).inputs
    plans = Plan() if plans is None else plans
    with torch.inference_mode(), intervene(vlm.arch, plans), (share_images(vlm.arch) if shared else nullcontext()):
        return vlm.last_hidden(inputs)


def _generate(vlm, images, prompts, plans, *, shared: bool, max_new_tokens: int = 8):
    """Greedy tokens per row, and the smallest top-2 logit gap over every row's steps (up to its stop token)."""
    from contextlib import nullcontext

    from hones_core.interventions import intervene
    from hones_core.sharing import share_images

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
    from hones_core.sharing import share_images

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

    from hones_core.sharing import share_images

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
