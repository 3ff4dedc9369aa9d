"""SafeLlavaProcessor: placeholder expansion, padding side, chat template, safety texts, save/load."""

import pytest
from conftest import chat_prompt, random_image

from modeling_safe_llava import SafeLlavaProcessor


def test_each_image_expands_to_llm_safety_tokens_plus_patches(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = processor(images=[random_image(0)], text=[chat_prompt(processor)], return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert placeholders == patches + model.config.num_llm_safety_tokens == model.config.image_seq_length


def test_batches_are_left_padded_for_generation(tiny_safe_llava):
    _, processor = tiny_safe_llava
    texts = [chat_prompt(processor, "Hi"), chat_prompt(processor, "Describe the picture in many many words.")]
    inputs = processor(images=[random_image(0), random_image(1)], text=texts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()


def test_chat_template_is_llava_15(tiny_safe_llava):
    _, processor = tiny_safe_llava
    assert chat_prompt(processor, "What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"


def test_safety_texts_are_encoded_with_the_assistant_marker(tiny_safe_llava):
    model, processor = tiny_safe_llava
    texts = model.config.safety_text_token_ids
    marker = processor.tokenizer.decode(texts["assistant_prefix"])
    assert marker.strip() == "ASSISTANT:"
    hint = processor.tokenizer.decode(texts["hints"]["Privacy"][1])
    assert hint == model.config.safety_hints["Privacy"][1]
    assert processor.tokenizer.decode(texts["refusals"]["Privacy"]) == model.config.safety_refusals["Privacy"]


def test_save_and_reload_keeps_llm_safety_tokens(tiny_safe_llava, tmp_path):
    _, processor = tiny_safe_llava
    processor.save_pretrained(tmp_path)
    reloaded = SafeLlavaProcessor.from_pretrained(tmp_path)
    assert reloaded.num_llm_safety_tokens == processor.num_llm_safety_tokens
    assert reloaded.chat_template == processor.chat_template
    a = processor(images=[random_image(3)], text=[chat_prompt(processor)], return_tensors="pt")
    b = reloaded(images=[random_image(3)], text=[chat_prompt(processor)], return_tensors="pt")
    assert (a["input_ids"] == b["input_ids"]).all() and (a["pixel_values"] == b["pixel_values"]).all()


def test_images_without_text_raise(tiny_safe_llava):
    _, processor = tiny_safe_llava
    with pytest.raises(ValueError, match="needs text with an <image> placeholder"):
        processor(images=[random_image(0)])


def test_negative_safety_token_count_raises(tiny_safe_llava):
    _, processor = tiny_safe_llava
    with pytest.raises(ValueError, match="num_llm_safety_tokens must be an integer >= 0, got -2"):
        SafeLlavaProcessor.from_llava(processor, num_llm_safety_tokens=-2)
