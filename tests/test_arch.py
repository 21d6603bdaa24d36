import pytest
import torch
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from hones_core.arch import FAMILIES, Architecture, UnsupportedModelError


def test_every_family_exposes_layers_heads_and_neurons(family, tiny_vlm):
    vlm = tiny_vlm(family)
    arch = vlm.arch
    text = vlm.model.config.get_text_config()
    assert arch.num_layers == text.num_hidden_layers == 2
    assert arch.num_heads == text.num_attention_heads == 4
    assert arch.head_dim == 16 and arch.intermediate_size == 96
    for layer in arch.layers:
        assert layer.o_proj.in_features == arch.num_heads * arch.head_dim
        assert layer.down_proj.in_features == layer.gate_proj.out_features == layer.up_proj.out_features == 96
    assert arch.unembedding().shape == (text.vocab_size, text.hidden_size)
    # the layers we found are the text decoder's, not the vision tower's
    decoder_layers = vlm.model.get_decoder().layers
    assert [l.o_proj for l in arch.layers] == [l.self_attn.o_proj for l in decoder_layers]


def test_family_names_cover_the_six_supported_families(family, tiny_vlm):
    expected = {"llava": "llava", "llava-qwen2": "llava", "llava-onevision": "llava-onevision",
                "qwen2-vl": "qwen2-vl", "qwen2.5-vl": "qwen2.5-vl", "idefics3": "idefics3"}
    assert tiny_vlm(family).arch.family.name == expected[family]
    assert {"smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision"} <= set(FAMILIES)


def test_unsupported_family_is_refused_with_the_supported_list():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError) as err:
        Architecture(model)
    message = str(err.value)
    assert "'llama'" in message and "qwen2.5-vl" in message and "llava-onevision" in message


def test_missing_module_is_named(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("llava"))
    del model.model.language_model.layers[1].mlp.down_proj
    with pytest.raises(UnsupportedModelError, match=r"layer 1 mlp.down_proj.*missing 'down_proj'"):
        Architecture(model)


def test_shape_mismatch_between_config_and_modules_is_refused(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2-vl"))
    model.model.language_model.layers[0].self_attn.o_proj = torch.nn.Linear(48, 64, bias=False)
    with pytest.raises(UnsupportedModelError, match="o_proj takes 48 features"):
        Architecture(model)


def test_vision_tower_is_found_where_the_table_says(family, tiny_vlm):
    vlm = tiny_vlm(family)
    tower = vlm.arch.vision_tower
    if family.startswith("qwen"):       # flattened patches of all images: not batch-first, left unshared
        assert tower is None and vlm.arch.family.vision is None
        return
    expected = vlm.model.model.vision_model if family == "idefics3" else vlm.model.model.vision_tower
    assert tower is expected
    assert all(p.data_ptr() != q.data_ptr() for p in tower.parameters() for l in vlm.arch.layers
               for q in (l.o_proj.weight, l.down_proj.weight))
    assert {f.vision for f in FAMILIES.values()} == {"model.vision_tower", "model.vision_model", None}


def test_batch_first_inputs_says_whether_the_processor_gives_one_row_per_prompt(family, tiny_vlm, images, prompts):
    vlm = tiny_vlm(family)
    expected = family not in ("qwen2-vl", "qwen2.5-vl")     # Qwen-VL: all images' patches in one tensor
    assert vlm.arch.batch_first_inputs is vlm.arch.family.batch_first_inputs is expected
    rows = [images[0], images[1], images[0]]
    texts = [vlm.chat_prompt(p) for p in (prompts[0], prompts[1], prompts[1])]
    loaded = [[img] if vlm.arch.family.nested_images else img for img in rows]
    batch = vlm.processor(text=texts, images=loaded, padding=True, return_tensors="pt")
    assert "pixel_values" in batch and "input_ids" in batch
    one_row_per_prompt = all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(rows) for v in batch.values())
    assert one_row_per_prompt is expected
    assert {f.model_type for f in FAMILIES.values() if not f.batch_first_inputs} == {"qwen2_vl", "qwen2_5_vl"}
