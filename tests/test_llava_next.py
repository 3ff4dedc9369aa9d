"""LLaVA-NeXT specifics (issue 19, item 2): the processor reserves the LLM safety tokens of each anyres image, the model
puts them in front of each image's packed features, the head judges every crop (a risk in one crop flags its row),
rows hold any number of images of different token counts, and mixed batches select the right crops."""

import pytest
import torch
from bases import BASES
from conftest import chat_prompt
from stock_contract import force_safety_verdicts, text_only_prompt

from modeling_safe_llava import SafeLlavaNextConfig, SafeLlavaNextForConditionalGeneration, SafeLlavaNextProcessor
from modeling_safe_llava.tiny import build_tiny_llava

NEXT = BASES["llava_next"]
SAFE, REFUSE, HINT = (0, 6), (3, 4), (1, 5)


@pytest.fixture
def pair():
    """(stock LLaVA-NeXT, SafeLlava-NeXT with 4 LLM safety tokens, marked trained, its processor)."""
    stock, safe, processor = NEXT.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    return stock, safe, processor


def one_image_inputs(processor, index):
    return processor(images=[NEXT.random_image(index)], text=[chat_prompt(processor)], return_tensors="pt")


def test_processor_reserves_the_llm_safety_tokens_of_each_image():
    stock, stock_processor = NEXT.build_stock(0)
    with_tokens = SafeLlavaNextProcessor.from_base(stock_processor, num_llm_safety_tokens=4)
    without = SafeLlavaNextProcessor.from_base(stock_processor, num_llm_safety_tokens=0)
    image_token = stock.config.image_token_id
    for index in range(3):  # three sizes: 3 and 5 crops, different feature counts
        stock_inputs = one_image_inputs(stock_processor, index)
        assert torch.equal(one_image_inputs(without, index)["input_ids"], stock_inputs["input_ids"])
        stock_count = int((stock_inputs["input_ids"] == image_token).sum())
        inputs = one_image_inputs(with_tokens, index)
        assert int((inputs["input_ids"] == image_token).sum()) == stock_count + 4
        height, width = inputs["image_sizes"][0].tolist()
        counted = with_tokens._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"]
        assert counted == [stock_count + 4], "_get_num_multimodal_tokens must agree with the placeholders"


def test_llm_safety_tokens_sit_in_front_of_each_images_packed_features(pair):
    stock, safe, processor = pair
    inputs = processor(
        images=[NEXT.random_image(i) for i in range(2)],
        text=[chat_prompt(processor), chat_prompt(processor, "Describe the picture.")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        ours = safe.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        theirs = stock.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert len(ours.pooler_output) == len(theirs.pooler_output) == 2
    for features, stock_features in zip(ours.pooler_output, theirs.pooler_output):
        assert torch.equal(features[:4], safe.model.safety_module.llm_tokens)
        assert torch.equal(features[4:], stock_features)
    assert ours.crops_per_image.tolist() == NEXT.judged_units(inputs) == [3, 5]
    out = safe(**inputs)  # the placeholders the processor reserved are exactly filled
    assert out.safety_level_logits.shape == (2, 4)


def test_the_verdict_encodes_with_the_vision_tower_alone(pair):
    """`assess_safety` (and the gate's verdict model, which holds no projector) encodes with the vision tower alone: the
    same crops' hidden states, crop counts and placeholder counts as `get_image_features`, so the same safety logits, and
    the projector never runs."""
    _, safe, processor = pair
    images = [NEXT.random_image(i) for i in range(3)]
    inputs = processor(
        images=images, text=[chat_prompt(processor, images=2), chat_prompt(processor)], return_tensors="pt", padding=True
    )
    calls = []
    handle = safe.model.multi_modal_projector.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        alone = safe.model.encode_images_for_safety(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        handle.remove()
        full = safe.model.encode_images(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        assert calls == []
        assert alone.tokens_per_image.tolist() == full.tokens_per_image.tolist() == [len(f) for f in full.pooler_output]
        assert alone.crops_per_image.tolist() == full.crops_per_image.tolist() == NEXT.judged_units(inputs)
        verdicts = [safe.model.safety_logits(o, inputs["input_ids"], None, inputs["attention_mask"]) for o in (alone, full)]
    for ours, theirs in zip(*verdicts):
        assert torch.equal(ours, theirs)
    assert verdicts[0][2].tolist() == [2, 1]


@pytest.mark.parametrize("risky_crop", [0, 1, 4], ids=["base_image", "first_crop", "last_crop"])
def test_a_risk_seen_in_one_crop_flags_its_row(pair, risky_crop):
    """The head judges every crop: the row's verdict is its riskiest crop, wherever the crop is."""
    _, safe, processor = pair
    inputs = processor(
        images=[NEXT.random_image(0), NEXT.random_image(1)],
        text=[chat_prompt(processor), chat_prompt(processor, "Describe the picture.")],
        return_tensors="pt",
        padding=True,
    )
    crops = NEXT.judged_units(inputs)  # [3, 5]: the second image's crops are units 3..7
    verdicts = [SAFE] * sum(crops)
    verdicts[crops[0] + risky_crop] = REFUSE
    force_safety_verdicts(safe, verdicts)
    assessment = safe.assess_safety(**inputs, safety_threshold=0.5)
    assert assessment.actions == ["allow", "refuse"]


def test_rows_with_several_images_or_none(pair):
    _, safe, processor = pair
    texts = [chat_prompt(processor, "Compare them.", images=2), text_only_prompt(processor), chat_prompt(processor)]
    images = [NEXT.random_image(i) for i in range(3)]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    crops = NEXT.judged_units(inputs)
    verdicts = [SAFE] * sum(crops)
    verdicts[crops[0] + 1] = REFUSE  # a crop of the first row's second image
    force_safety_verdicts(safe, verdicts)
    out = safe(**inputs)
    assert out.safety_level_logits.shape == (3, 4)
    assessment = safe.assess_safety(**inputs, safety_threshold=0.5)
    assert assessment.actions == ["refuse", "allow", "allow"]


def test_mixed_batch_generates_each_allowed_row_as_stock_does_alone(pair):
    """A hinted row, an allowed row and a refused row of different crop counts: the allowed row gets stock's answer
    (the plan re-batches the encoded images of the rows it generates, crops included)."""
    _, safe, processor = pair
    texts = [chat_prompt(processor, q) for q in ("What is shown?", "Describe the picture.", "Read the text.")]
    inputs = processor(images=[NEXT.random_image(i) for i in range(3)], text=texts, return_tensors="pt", padding=True)
    handles = force_safety_verdicts(safe, [HINT, SAFE, REFUSE], NEXT.judged_units(inputs))
    out = safe.generate(**inputs, safety_threshold=0.5, do_sample=False, max_new_tokens=5, return_dict_in_generate=True)
    assert out.safety_assessment.actions == ["hint", "allow", "refuse"]
    for handle in handles:
        handle.remove()
    alone = processor(images=[NEXT.random_image(1)], text=[texts[1]], return_tensors="pt")
    expected = safe.generate(**alone, safety_threshold=1.0, do_sample=False, max_new_tokens=5)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[1, prompt:], expected[0, alone["input_ids"].shape[1] :])


def test_from_base_refuses_another_bases_checkpoint(tmp_path):
    llava, _ = build_tiny_llava()
    llava.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llava_next"):
        SafeLlavaNextForConditionalGeneration.from_base(tmp_path)


def test_config_is_llava_next_plus_the_safety_fields():
    config = SafeLlavaNextConfig(num_llm_safety_tokens=0)
    assert config.model_type == "safe_llava_next"
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert config.auto_map["AutoModel"] == "llava_next_safe_llava.SafeLlavaNextForConditionalGeneration"
    with pytest.raises(ValueError, match="num_safety_tokens"):
        SafeLlavaNextConfig(num_safety_tokens=0)


def test_images_encoded_by_stock_get_a_clear_error(pair):
    """Stock's image outputs lack the crop counts the head needs: a clear error, not a count mismatch."""
    stock, safe, processor = pair
    inputs = one_image_inputs(processor, 0)
    with torch.no_grad():
        features = stock.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], output_hidden_states=True)
    with pytest.raises(ValueError, match="anyres crops"):
        safe.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs={"image": features},
            safety_threshold=0.5,
            max_new_tokens=1,
        )


def test_7b_preset_is_the_llava_v1_6_mistral_shape_with_the_papers_safety_modules():
    from modeling_safe_llava.tiny import load_model_preset

    preset = load_model_preset("llava-next-7b.json")
    fields = {k: v for k, v in preset.items() if not k.startswith("_") and k not in ("base_checkpoint", "base_model_type")}
    config = SafeLlavaNextConfig(**fields)
    assert (config.text_config.model_type, config.text_config.num_key_value_heads) == ("mistral", 8)
    assert config.image_grid_pinpoints[2] == [672, 672] and config.num_llm_safety_tokens == 64
    assert config.safety_projector_hidden_size == 1024 + 64  # the paper's C-Abstractor width
    with torch.device("meta"):
        model = SafeLlavaNextForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    safety = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.safety_module."))
    assert 7.4e9 < total < 7.8e9, total  # llava-v1.6-mistral-7b: 7.57B parameters
    assert safety / total < 0.02, safety / total


def test_registry_entry_builds_the_demo_model():
    """`safe-llava demo --base llava-next` builds a tiny random LLaVA-NeXT (configuration/demo-llava-next.json)."""
    from PIL import Image

    from modeling_safe_llava.bases import base_named
    from modeling_safe_llava.tools.demo import build_demo_model

    entry = base_named("llava-next")
    assert entry.model_class is SafeLlavaNextForConditionalGeneration and entry.large_preset == "llava-next-7b.json"
    model, processor = build_demo_model("llava-next")
    assert type(model) is SafeLlavaNextForConditionalGeneration and model.config.num_llm_safety_tokens == 8
    inputs = processor(images=[Image.new("RGB", (48, 48), "red")], text=[chat_prompt(processor)], return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 3  # the base image and two anyres crops
    assert model(**inputs).safety_level_logits.shape == (1, 4)
    with pytest.raises(ValueError, match="tiny"):
        build_demo_model("llava-next", "smollm2")


def test_pixel_values_without_image_sizes_get_a_clear_error(pair):
    """Stock raises a TypeError deep in its anyres code; SafeLlava-NeXT raises the same type, naming what is missing,
    on every route (forward, the verdict alone)."""
    stock, safe, processor = pair
    inputs = one_image_inputs(processor, 0)
    del inputs["image_sizes"]
    with pytest.raises(TypeError):
        stock(**inputs)
    with pytest.raises(TypeError, match="image_sizes"):
        safe(**inputs)
    with pytest.raises(TypeError, match="image_sizes"):
        safe.assess_safety(**inputs)
