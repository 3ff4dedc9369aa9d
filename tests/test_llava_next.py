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
