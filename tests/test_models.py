import pytest
import torch

from hones_core.models import ModelLoadError, load_vlm


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
    assert vlm.generate(images, prompts, max_new_tokens=6) == first


def test_images_can_be_paths_and_missing_paths_are_named(tiny_vlm, images, prompts, tmp_path):
    vlm = tiny_vlm("llava")
    path = tmp_path / "red.png"
    images[0].save(path)
    assert torch.equal(vlm.next_token_logits([path], prompts[:1]), vlm.next_token_logits(images[:1], prompts[:1]))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        vlm.next_token_logits([tmp_path / "nope.png"], prompts[:1])
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        vlm.next_token_logits(images[:1], prompts)
