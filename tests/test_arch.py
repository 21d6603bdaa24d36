import math

import pytest
import torch
from PIL import Image
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


def test_family_names_cover_the_supported_families(family, tiny_vlm):
    expected = {"llava": "llava", "llava-qwen2": "llava", "llava-onevision": "llava-onevision",
                "qwen2-vl": "qwen2-vl", "qwen2.5-vl": "qwen2.5-vl", "idefics3": "idefics3", "smolvlm": "smolvlm"}
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
    expected = vlm.model.model.vision_model if family in ("idefics3", "smolvlm") else vlm.model.model.vision_tower
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


# ----- image-token layout (arch.image_regions) -------------------------------------------------------

def test_tiny_layouts_cover_the_image_and_every_image_token(family, tiny_vlm, images):
    vlm = tiny_vlm(family)
    for image in images:
        inputs = vlm.encode([image], ["Describe the image in one sentence."]).inputs
        regions = vlm.arch.image_regions(inputs, row=0, image_size=image.size, processor=vlm.processor)
        ids = inputs["input_ids"][0]
        image_positions = (ids == vlm.model.config.image_token_id).nonzero()[:, 0].tolist()
        assert sorted(p for r in regions for p in (*r.positions, *r.extra)) == image_positions
        width, height = image.size
        for view in {r.view for r in regions}:
            boxes = [r.box for r in regions if r.view == view]
            if family == "llava":          # CLIP keeps the centred square of the shortest side
                side = min(width, height)
                assert boxes == [pytest.approx(((width - side) / 2, (height - side) / 2,
                                                (width + side) / 2, (height + side) / 2))]
            else:                          # the tiles of one view cover the whole image exactly once
                area = sum((r - l) * (b - t) for l, t, r, b in boxes)
                assert area == pytest.approx(width * height)
                assert min(b[0] for b in boxes) == 0 and max(b[2] for b in boxes) == pytest.approx(width)


def test_onevision_newlines_close_each_high_res_row(tiny_vlm, images):
    vlm = tiny_vlm("llava-onevision")
    image = images[1]                                     # 30 x 50 px
    inputs = vlm.encode([image], ["Describe the image in one sentence."]).inputs
    base, high = vlm.arch.image_regions(inputs, row=0, image_size=image.size, processor=vlm.processor)
    first = base.positions[0]
    assert base.positions == tuple(range(first, first + 16))
    # 30 wide, 50 high -> pinpoint (h, w) = (64, 32), 2 tiles high: 8 x 4 patches; the 4 columns span the
    # 30 px width, so the 50 px height fills int(50 * 4 / 30) = 6 of 8 rows (1 padding row each side)
    assert (high.rows, high.cols) == (6, 4)
    start = first + 16
    for r in range(6):   # each row: 4 cells, then its newline
        assert high.positions[r * 4:(r + 1) * 4] == tuple(range(start + 5 * r, start + 5 * r + 4))
        assert high.extra[r] == start + 5 * r + 4


def _tiny_text(tokenizer, **extra):
    from transformers import LlamaConfig

    from hones_core.testing import text_kwargs

    return LlamaConfig(**text_kwargs(len(tokenizer), layers=1), pad_token_id=tokenizer.pad_token_id, **extra)


def test_llava_15_geometry_336px_14px_patches_576_tokens():
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from hones_core.arch import image_regions
    from hones_core.testing import train_tokenizer

    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"},
                                bos="<s>", eos="</s>", pad="<pad>")
    # llava-hf/llava-1.5-7b-hf's processor: CLIP, shortest edge 336, centre crop 336, patch 14, CLS dropped
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                  crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=336, patch_size=14,
                                                        projection_dim=32),
                         text_config=_tiny_text(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    image = Image.new("RGB", (640, 480), (10, 20, 30))
    inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[image], return_tensors="pt")
    [region] = image_regions(config, processor, inputs, row=0, image_size=image.size)
    assert (region.rows, region.cols) == (24, 24) and len(region.positions) == 576 and region.extra == ()
    # shortest edge 480 -> 336: the 336 px crop is 480 original px wide, centred
    assert region.box == pytest.approx((80, 0, 560, 480))
    # the model itself fills exactly these positions with its 576 image features (it raises otherwise)
    with torch.inference_mode():
        logits = LlavaForConditionalGeneration(config).eval()(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", ["Idefics3", "SmolVLM"])
def test_smolvlm_256m_geometry_512px_tiles_and_global(name):
    import transformers as tf

    from hones_core.arch import image_regions
    from hones_core.testing import train_tokenizer

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)]
    tokenizer = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                                 "<image>", "<global-img>", "<video>", *grid], {"image_token": "<image>"},
                                bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>", vocab_size=520)
    # HuggingFaceTB/SmolVLM-256M-Instruct: longest edge 2048, 512 px tiles, SigLIP patch 16, scale factor 4:
    # (512 / 16)^2 / 4^2 = 64 tokens per tile
    image_processor = getattr(tf, f"{name}ImageProcessor")(size={"longest_edge": 2048},
                                                           max_image_size={"longest_edge": 512}, do_image_splitting=True)
    extra = {"video_processor": tf.SmolVLMVideoProcessor()} if name == "SmolVLM" else {}
    processor = getattr(tf, f"{name}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                                image_seq_len=64, **extra)
    vision = getattr(tf, f"{name}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=512, patch_size=16)
    config = getattr(tf, f"{name}Config")(vision_config=vision, text_config=_tiny_text(tokenizer), scale_factor=4,
                                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image = Image.new("RGB", (1200, 800), (10, 20, 30))
    inputs = processor(text=["User:<image>What is it?<end_of_utterance>\nAssistant:"], images=[[image]],
                       return_tensors="pt")
    regions = image_regions(config, processor, inputs, row=0, image_size=image.size)
    # longest edge 1200 -> 2048, height 2048 / 1.5 = 1365 -> 1366; stretched to whole tiles: 2048 x 1536
    # = 4 columns x 3 rows of 512 px tiles, then the global image
    tiles = [r for r in regions if r.view == "tiles"]
    assert [r.name for r in tiles] == [f"tile {r},{c}" for r in (1, 2, 3) for c in (1, 2, 3, 4)]
    assert regions[-1].name == "global image" and regions[-1].box == (0, 0, 1200, 800)
    assert all((r.rows, r.cols) == (8, 8) for r in regions) and len(regions) == 13
    assert tiles[6].box == pytest.approx((600, 800 / 3, 900, 1600 / 3))          # row 2, column 3
    with torch.inference_mode():                     # the model fills all 13 x 64 positions
        logits = getattr(tf, f"{name}ForConditionalGeneration")(config).eval()(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 13 * 64


def _smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384):
    """Qwen2-VL's documented resize: sides to multiples of `factor`, pixels within [min, max]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("size,max_pixels,run_model", [((640, 480), 12845056, True), ((2048, 1536), 12845056, False),
                                                       ((2048, 1536), 1280 * 28 * 28, False)])
def test_qwen25_vl_geometry_dynamic_resolution(size, max_pixels, run_model):
    import transformers as tf

    from hones_core.arch import image_regions
    from hones_core.testing import train_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                                bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    # Qwen/Qwen2.5-VL's processor: patch 14, merge 2, min_pixels 3136, max_pixels 12845056 by default
    pixels = {"shortest_edge": 3136, "longest_edge": max_pixels}
    processor = tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, size=pixels),
        video_processor=tf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, size=pixels),
        tokenizer=tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in specials}
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(**_tiny_text(tokenizer).to_dict() | {"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3, fullatt_block_indexes=[0],
                           window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    image = Image.new("RGB", size, (10, 20, 30))
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>What is it?"], images=[image],
                       return_tensors="pt")
    [region] = image_regions(config, processor, inputs, row=0, image_size=image.size)
    h, w = _smart_resize(size[1], size[0], max_pixels=max_pixels)
    assert (region.rows, region.cols) == (h // 28, w // 28)
    assert len(region.positions) == (h // 28) * (w // 28)
    if size == (640, 480) and max_pixels == 12845056:
        assert (region.rows, region.cols) == (17, 23)           # 476 x 644 px: 391 tokens
    if run_model:
        with torch.inference_mode():
            logits = tf.Qwen2_5_VLForConditionalGeneration(config).eval()(**inputs).logits
        assert logits.shape[1] == inputs["input_ids"].shape[1]


def test_a_layout_that_disagrees_with_the_tokens_is_refused(tiny_vlm, images):
    from hones_core.arch import image_regions

    vlm = tiny_vlm("qwen2-vl")
    inputs = dict(vlm.encode([images[0]], ["Describe the image in one sentence."]).inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 8]])        # 16 merged tokens claimed, 4 in the prompt
    with pytest.raises(UnsupportedModelError, match="4 image tokens for grid_thw"):
        image_regions(vlm.model.config, vlm.processor, inputs, row=0, image_size=images[0].size)
