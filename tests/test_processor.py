"""SafeLlavaProcessor: placeholder expansion, padding side, chat template, safety texts, save/load."""

import functools
import http.server
import threading

import pytest
import torch
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


# -- images as clients send them: PIL, path, URL, in chat messages (what LlavaProcessor accepts) -----------------


@pytest.fixture
def served_image(tmp_path):
    """A PNG written to disk and served over HTTP on the loopback interface: `(image, path, url)`."""
    image = random_image(3)
    image.save(tmp_path / "picture.png")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield image, str(tmp_path / "picture.png"), f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    server.shutdown()
    thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        """Keep test output clean."""


@pytest.mark.parametrize("source", ["path", "url"])
def test_images_given_as_path_or_url_equal_the_pil_image(tiny_safe_llava, served_image, source):
    _, processor = tiny_safe_llava
    image, path, url = served_image
    prompt = chat_prompt(processor)
    expected = processor(images=image, text=prompt, return_tensors="pt")
    given = processor(images={"path": path, "url": url}[source], text=prompt, return_tensors="pt")
    assert torch.equal(given["input_ids"], expected["input_ids"])
    assert torch.allclose(given["pixel_values"], expected["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("source", ["image", "path", "url"])
def test_chat_messages_with_images_tokenize_like_the_processor_call(tiny_safe_llava, served_image, source):
    _, processor = tiny_safe_llava
    image, path, url = served_image
    value = {"image": {"image": image}, "path": {"path": path}, "url": {"url": url}}[source]
    messages = [{"role": "user", "content": [{"type": "image", **value}, {"type": "text", "text": "What is shown?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(images=image, text=chat_prompt(processor, "What is shown?"), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.allclose(inputs["pixel_values"], expected["pixel_values"], atol=1e-6)
