import pytest
import torch
from PIL import Image

from hones_core.interventions import Plan, intervene
from hones_core.models import ModelLoadError, load_vlm


# Rows computed in batches of other sizes (the vision tower on 1 image instead of 2, the decoder on 1 row
# instead of 2) go through GEMMs of other shapes, and BLAS picks kernels by shape, thread count and CPU
# (e.g. MKL's AVX2 kernels give a row other bits at another position in the batch): they agree to float32
# rounding, not to the bit. Hidden states of the tiny fp32 models are O(1); a few ulp (1e-7) per op over
# 2 layers stays far below 1e-5, while a real error (a wrong row's image, plan or mask) moves them by
# more than 1e-3, which the tests check too. Token ids agree while every greedy step's top-2 logit gap
# exceeds twice the tolerance (the gap can move by at most that much).
ROUNDING = dict(rtol=1e-5, atol=1e-5)


def _noisy(seed: int, size: tuple[int, int]):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


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


def test_encoding_processes_repeated_rows_once_and_equals_processing_all(family, tiny_vlm, prompts, tmp_path):
    vlm = tiny_vlm(family)
    a, b = _noisy(19, (40, 30)), _noisy(20, (30, 50))
    path = tmp_path / "b.png"
    b.save(path)
    images = [a, path, a, b, a, path]
    texts = [prompts[0], prompts[1], prompts[0], prompts[1], prompts[1], prompts[1]]
    calls: list[int] = []
    processor = vlm.processor
    original = type(processor).__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["text"]))
        return original(self, *args, **kwargs)

    type(processor).__call__ = counting
    try:
        inputs = vlm.encode(images, texts).inputs
    finally:
        type(processor).__call__ = original
    chats = [vlm.chat_prompt(t) for t in texts]
    loaded = [[img] if vlm.arch.family.nested_images else img
              for img in (a, b.copy(), a, b, a, b.copy())]
    direct = processor(text=chats, images=loaded, padding=True, return_tensors="pt")
    assert calls == ([6] if vlm.arch.vision_tower is None else [4])   # (a,p0) (path,p1) (b,p1) (a,p1)
    assert inputs.keys() == direct.keys()
    for key in direct:      # the processor works image by image: the same pixels, bitwise
        assert torch.equal(inputs[key], direct[key]), key


def test_generate_from_prepared_inputs_is_generate_before_stripping(family, tiny_vlm, images, prompts, monkeypatch):
    vlm = tiny_vlm(family)
    plans = [None, Plan.scale_neurons({0: list(range(48)), 1: list(range(48))}, 3.0)]
    inputs = vlm.encode(images, prompts).inputs
    with torch.inference_mode(), intervene(vlm.arch, plans, capture="last") as capture:
        raw = vlm.generate_from(inputs, max_new_tokens=6)
    # the same batch, plans and sharing called by hand: the same computation, so the same tokens and capture
    with torch.inference_mode(), intervene(vlm.arch, plans, capture="last") as by_hand, vlm.sharing(2):
        out = vlm.model.generate(**inputs, **vlm.generation_kwargs(6))
    assert raw == vlm.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert capture.neurons.keys() == by_hand.neurons.keys() == {0, 1}
    for layer, z in capture.neurons.items():
        assert z.shape == (2, vlm.arch.intermediate_size) and torch.equal(z, by_hand.neurons[layer])
    # generate is generate_from on the encoded batch, stripped; and it has no other way to the model
    calls = []
    original = vlm.generate_from
    monkeypatch.setattr(vlm, "generate_from", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert vlm.generate(images, prompts, plans=plans, max_new_tokens=6) == [t.strip() for t in raw]
    assert calls == [1]


def test_yes_no_margins_are_logit_yes_minus_logit_no(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    yes, no = vlm.yes_no_ids()
    assert vlm.yes_no_ids() is vlm.yes_no_ids()       # computed once
    vocab = vlm.arch.unembedding().shape[0]
    other = next(t for t in range(vocab) if t not in (yes, no))
    logits = torch.zeros(3, vocab)
    logits[0, yes], logits[0, no] = 2.5, -1.0
    logits[1, no] = 4.0
    logits[2, yes] = logits[2, no] = 7.0
    logits[:, other] = 100.0                            # other tokens do not count
    assert vlm.yes_no_margins(logits).tolist() == [3.5, -4.0, 0.0]
    real = vlm.next_token_logits(images, prompts)
    margins = vlm.yes_no_margins(real)
    assert margins.shape == (2,)
    assert torch.equal(margins, torch.stack([real[r, yes] - real[r, no] for r in range(2)]))


def test_official_compat_mode_uses_the_official_prompt_and_bare_targets(tiny_vlm):
    """--compat official: LLaVA's hand-written prompt and targets encoded bare; other families refused."""
    from hones_core.models import VLM, check_compat

    ours = tiny_vlm("llava")
    official = VLM(ours.model, ours.processor, name="tiny-llava", compat="official")
    prompt = "Question: What color?\nAnswer the question with a short phrase."
    image_token = ours.processor.image_token
    assert official.chat_prompt(prompt) == f"USER: {image_token}\n{prompt}\nASSISTANT:"
    assert ours.chat_prompt(prompt) != official.chat_prompt(prompt)          # ours: the chat template
    tok = ours.tokenizer
    bare = [i for i in tok.encode("red circle", add_special_tokens=False) if i not in set(tok.all_special_ids)]
    assert official.target_token_ids(prompt, "red circle") == bare
    assert ours.target_token_ids(prompt, "red circle") == ours.answer_token_ids(prompt, "red circle")
    assert (official.answer_separator, official.stop_token_id) == (ours.answer_separator, ours.stop_token_id)
    # the official prompt goes through the processor like ours: generation and teacher forcing run
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert isinstance(official.generate([image], [prompt], max_new_tokens=3)[0], str)
    assert torch.isfinite(official.answer_logprobs([image], [prompt], ["red"])).all()
    with pytest.raises(ValueError, match="runs only llava and qwen2.5-vl; x is 'idefics3'"):
        check_compat("official", "idefics3", "x")
    with pytest.raises(ValueError, match="compat must be one of ours, official"):
        check_compat("paper", "llava")
