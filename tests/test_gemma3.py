"""Safe Gemma 3 against stock Gemma 3 (same weights, same inputs): what is specific to this base.

- the processor: each image's block is `<start_of_image>`, N + mm_tokens_per_image image tokens, `<end_of_image>`,
  and `token_type_ids` marks exactly those N + mm_tokens_per_image positions; with N = 0 it is stock's output;
- the attention masks: with N > 0 every (safety + image) block is bidirectional within itself and causal
  elsewhere, also on sliding-window layers; with N = 0 the masks, logits and tokens are stock's, bit for bit;
- the plan's rebuilt rows (a hinted row beside an allowed one) keep their token types, so each row gets what it
  would get alone; the vision tower runs once per `generate`;
- the head reads SigLIP's last hidden state pooled to the grid the language model reads.
"""

import copy

import pytest
import torch
from conftest import chat_prompt, random_image
from transformers import Gemma3Processor

from modeling_safe_llava.gemma3_safe_llava import SafeGemma3ForConditionalGeneration, SafeGemma3Processor
from modeling_safe_llava.presets import load_safety_policy
from modeling_safe_llava.tiny import safety_fields
from modeling_safe_llava.tiny_gemma3 import build_tiny_gemma3

PRESET = "tiny-gemma3.json"
QUESTIONS = ("What is shown in this image?", "Describe the picture. Read the text in the image.")


def build_pair(num_llm_safety_tokens: int, attn_implementation: str = "eager"):
    """`(stock, safe, processor)`: tiny random stock Gemma 3 and a Safe Gemma 3 of a deep copy of its weights."""
    stock, stock_processor = build_tiny_gemma3(seed=0)
    processor = SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=num_llm_safety_tokens)
    fields = {**safety_fields(PRESET), **load_safety_policy(), "num_llm_safety_tokens": num_llm_safety_tokens}
    torch.manual_seed(1)
    safe = SafeGemma3ForConditionalGeneration.from_base(copy.deepcopy(stock), processor=processor, **fields)
    for model in (stock, safe):
        model.eval().set_attn_implementation(attn_implementation)
    return stock, safe, processor


def image_inputs(processor, images_per_row=(1, 1)):
    texts = [chat_prompt(processor, question, images=n) for question, n in zip(QUESTIONS, images_per_row)]
    images = [[random_image(10 * row + i) for i in range(n)] for row, n in enumerate(images_per_row)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def image_blocks(input_ids, processor):
    """Per row, the `(start, end)` positions (end exclusive) strictly between `<start_of_image>` and `<end_of_image>`."""
    tokenizer = processor.tokenizer
    boi, eoi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token), tokenizer.convert_tokens_to_ids(tokenizer.eoi_token)
    blocks = []
    for row in input_ids.tolist():
        starts = [i + 1 for i, token in enumerate(row) if token == boi]
        ends = [i for i, token in enumerate(row) if token == eoi]
        blocks.append(list(zip(starts, ends)))
    return blocks


def expected_mask(attention_mask, blocks, sliding_window=None):
    """`(batch, 1, q, k)` bool: causal (or in the same image block), key not padding, within the window if given."""
    batch, length = attention_mask.shape
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    masks = []
    for row in range(batch):
        allowed = k <= q
        for start, end in blocks[row]:
            inside_q = (q >= start) & (q < end)
            inside_k = (k >= start) & (k < end)
            allowed = allowed | (inside_q & inside_k)
        if sliding_window is not None:
            allowed = allowed & ((q - k) < sliding_window)
        masks.append(allowed & attention_mask[row].bool()[None, :])
    return torch.stack(masks)[:, None]


def model_masks(model, inputs):
    """The masks the model's language model gets, as `create_masks_for_generate` builds them (sdpa: bool masks)."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    length = inputs["input_ids"].shape[1]
    position_ids = torch.arange(length)[None].expand(inputs["input_ids"].shape[0], -1)
    return type(model).create_masks_for_generate(
        model.config, embeds, inputs["attention_mask"], None, position_ids, token_type_ids=inputs["token_type_ids"]
    )


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_llm_safety_tokens", [0, 3])
def test_each_image_block_holds_safety_and_image_placeholders_marked_as_image(num_llm_safety_tokens):
    _, safe, processor = build_pair(num_llm_safety_tokens)
    inputs = image_inputs(processor, images_per_row=(2, 1))
    per_image = num_llm_safety_tokens + safe.config.mm_tokens_per_image
    assert safe.config.image_seq_length == per_image
    for row, blocks in enumerate(image_blocks(inputs["input_ids"], processor)):
        assert len(blocks) == (2, 1)[row]
        marked = inputs["token_type_ids"][row].nonzero().flatten().tolist()
        assert marked == [i for start, end in blocks for i in range(start, end)]
        for start, end in blocks:
            assert end - start == per_image
            assert (inputs["input_ids"][row, start:end] == safe.config.image_token_id).all()


def test_processor_without_safety_tokens_is_stock():
    stock, stock_processor = build_tiny_gemma3(seed=0)
    processor = SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=0)
    stock_processor.tokenizer.padding_side = "left"
    texts = [chat_prompt(processor, q) for q in QUESTIONS]
    images = [[random_image(0)], [random_image(1)]]  # Gemma 3 takes images nested per row
    expected = Gemma3Processor.__call__(stock_processor, images=images, text=texts, return_tensors="pt", padding=True)
    actual = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_processor_refuses_images_without_text_and_bad_safety_token_counts():
    _, stock_processor = build_tiny_gemma3(seed=0)
    processor = SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=2)
    with pytest.raises(ValueError, match="needs text"):
        processor(images=random_image(0))
    with pytest.raises(ValueError, match="num_llm_safety_tokens must be an integer >= 0"):
        SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=-1)


def test_processor_round_trips_through_save_and_auto_processor(tmp_path):
    from transformers import AutoProcessor

    _, stock_processor = build_tiny_gemma3(seed=0)
    processor = SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=3)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is SafeGemma3Processor and reloaded.num_llm_safety_tokens == 3
    text = chat_prompt(processor)
    for name, value in processor(images=random_image(0), text=text, return_tensors="pt").items():
        assert torch.equal(reloaded(images=random_image(0), text=text, return_tensors="pt")[name], value), name


# ----------------------------------------------------------------------------------------------------------------
# Attention masks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_llm_safety_tokens", [0, 3])
def test_masks_are_bidirectional_over_each_safety_plus_image_block_and_causal_elsewhere(num_llm_safety_tokens):
    _, safe, processor = build_pair(num_llm_safety_tokens, attn_implementation="sdpa")
    inputs = image_inputs(processor, images_per_row=(2, 1))
    blocks = image_blocks(inputs["input_ids"], processor)
    masks = model_masks(safe, inputs)
    window = safe.config.text_config.sliding_window
    assert inputs["input_ids"].shape[1] > window  # the sliding window really cuts something
    assert torch.equal(masks["full_attention"], expected_mask(inputs["attention_mask"], blocks))
    assert torch.equal(masks["sliding_attention"], expected_mask(inputs["attention_mask"], blocks, window))


def test_safety_tokens_attend_to_the_image_after_them_in_the_language_model():
    """Eager attention weights: the first safety token of each block attends to the block's last image token (and
    only there beyond the causal past); without token types it would not."""
    _, safe, processor = build_pair(3)
    inputs = image_inputs(processor)
    start, end = image_blocks(inputs["input_ids"], processor)[0][0]
    with torch.no_grad():
        out = safe(**inputs, output_attentions=True)
        causal = safe(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, output_attentions=True)
    for attention, causal_attention in zip(out.attentions, causal.attentions):
        assert (attention[0, :, start, end - 1] > 0).all()
        assert (attention[0, :, start, end:] == 0).all()
        assert (causal_attention[0, :, start, start + 1 :] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Head-only mode (N = 0) is stock Gemma 3, bit for bit
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_head_only_logits_and_masks_are_stock_bit_for_bit(attn_implementation):
    stock, safe, processor = build_pair(0, attn_implementation)
    inputs = image_inputs(processor, images_per_row=(2, 1))
    with torch.no_grad():
        expected, actual = stock(**inputs), safe(**inputs)
    assert torch.equal(actual.logits, expected.logits)
    assert actual.safety_level_logits.shape == (2, 4)
    for name in ("full_attention", "sliding_attention"):
        assert torch.equal(model_masks(safe, inputs)[name], model_masks(stock, inputs)[name])


@pytest.mark.parametrize("safety_threshold", [1.0, 0.0])
@pytest.mark.parametrize("strategy", [{"do_sample": False}, {"num_beams": 2, "do_sample": False}])
def test_head_only_generate_is_stock_with_safety_off_and_on_allow(safety_threshold, strategy):
    stock, safe, processor = build_pair(0)
    safe.config.safety_modules_trained = True
    allow = {name: "allow" for name in safe.config.risky_type_labels}
    inputs = image_inputs(processor)
    kwargs = {**inputs, **strategy, "max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True}
    expected = stock.generate(**kwargs)
    actual = safe.generate(**kwargs, safety_threshold=safety_threshold, safety_actions=allow)
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(a, e) for a, e in zip(actual.scores, expected.scores))
    assert (getattr(actual, "safety_assessment", None) is None) == (safety_threshold == 1.0)


def test_from_base_keeps_every_stock_weight_bit_for_bit():
    stock, safe, _ = build_pair(3)
    safe_state = safe.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(safe_state[name], tensor), name
    extra = set(safe_state) - set(stock.state_dict())
    assert extra and all(name.startswith("model.safety_module.") for name in extra)
    assert safe.config.safety_modules_trained is False


# ----------------------------------------------------------------------------------------------------------------
# The verdict and the plan
# ----------------------------------------------------------------------------------------------------------------


def test_head_reads_the_pooled_siglip_grid_the_language_model_reads():
    _, safe, processor = build_pair(3)
    inputs = image_inputs(processor)
    image_outputs = safe.model.get_image_features(inputs["pixel_values"], return_dict=True)
    states = safe.model.safety_vision_states(image_outputs)
    side = int(safe.config.mm_tokens_per_image**0.5)
    patches = safe.config.vision_config.image_size // safe.config.vision_config.patch_size
    grid = image_outputs.last_hidden_state.reshape(2, patches, patches, -1)
    kernel = patches // side
    expected = grid.reshape(2, side, kernel, side, kernel, -1).mean(dim=(2, 4))
    assert states.shape == (2, side, side, safe.config.safety_vision_dim)
    assert torch.allclose(states, expected, atol=1e-6)
    assert image_outputs.pooler_output.shape[:2] == (2, 3 + safe.config.mm_tokens_per_image)


def test_assess_safety_equals_the_verdict_of_forward_and_generate():
    _, safe, processor = build_pair(3)
    inputs = image_inputs(processor)
    with torch.no_grad():
        forward = safe(**inputs)
    assessment = safe.assess_safety(**inputs, allow_untrained_safety=True)
    generated = safe.generate(
        **inputs, max_new_tokens=2, allow_untrained_safety=True, return_dict_in_generate=True,
        safety_actions={name: "allow" for name in safe.config.risky_type_labels}, safety_threshold=0.0,
    )
    expected = (forward.safety_level_logits.float() / safe.config.safety_level_temperature).softmax(-1)
    assert torch.allclose(assessment.level_probs, expected, atol=1e-6)
    assert torch.allclose(generated.safety_assessment.level_probs, expected, atol=1e-6)


def test_generate_runs_the_vision_tower_once():
    _, safe, processor = build_pair(3)
    calls = []
    safe.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    safe.generate(**image_inputs(processor), max_new_tokens=3, allow_untrained_safety=True, safety_threshold=0.0)
    assert len(calls) == 1


def test_mixed_batch_rows_get_what_they_would_get_alone():
    """Row 0 hinted, row 1 allowed, row 2 refused: the plan rebuilds the language model's prompts (hint inserted,
    rows re-padded); their token types must follow, or the hinted row's image block would lose its bidirectional
    attention and the allowed row would not be stock's."""
    from stock_contract import force_safety_verdicts

    stock, safe, processor = build_pair(3)
    safe.config.safety_modules_trained = True
    questions = (*QUESTIONS, "Read the text in the image.")
    texts = [chat_prompt(processor, q) for q in questions]
    images = [[random_image(i)] for i in range(3)]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    actions = {"Privacy": ["allow", "hint", "hint", "refuse"]}
    privacy, clean = safe.config.safety_type_labels.index("Privacy"), len(safe.config.safety_type_labels) - 1
    verdicts = [(1, privacy), (0, clean), (3, privacy)]
    handles = force_safety_verdicts(safe, verdicts)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "safety_actions": actions, "return_dict_in_generate": True,
              "output_scores": True}
    out = safe.generate(**inputs, **kwargs)
    for handle in handles:
        handle.remove()
    assert out.safety_assessment.actions == ["hint", "allow", "refuse"]
    width = inputs["input_ids"].shape[1]
    for row in (0, 1):
        alone = processor(images=images[row], text=texts[row], return_tensors="pt")
        handles = force_safety_verdicts(safe, [verdicts[row]])
        single = safe.generate(**alone, **kwargs)
        for handle in handles:
            handle.remove()
        assert out.sequences[row, width:].tolist() == single.sequences[0, alone["input_ids"].shape[1] :].tolist(), row
        for step, (batched, alone_scores) in enumerate(zip(out.scores, single.scores)):
            torch.testing.assert_close(batched[row], alone_scores[0], atol=1e-5, rtol=1e-5, msg=f"row {row} step {step}")


def test_the_safe_hint_goes_at_the_end_of_the_users_turn():
    """Gemma 3's template closes the user's turn (`<end_of_turn>`) before the model's: `generate` puts the hint inside
    the user's turn, as the template renders a hint appended to the user's message (trimmed), so that a chat client
    (the gate in front of an engine) sends exactly `generate`'s prompt."""
    _, safe, processor = build_pair(0)
    texts, tokenizer = safe.config.safety_text_token_ids, processor.tokenizer
    marker, hint_ids = texts["assistant_prefix"], texts["hints"]["Privacy"][1]
    assert tokenizer.decode(marker) == "<end_of_turn>\n<start_of_turn>model\n"
    hint = safe.config.safety_hints["Privacy"][1]
    assert hint.endswith("\n") and tokenizer.decode(hint_ids) == hint.strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    prompt = tokenizer.encode(processor.apply_chat_template(messages, add_generation_prompt=True))
    messages[0]["content"][1]["text"] += hint
    hinted = tokenizer.encode(processor.apply_chat_template(messages, add_generation_prompt=True))
    assert hinted == prompt[: -len(marker)] + hint_ids + marker


def test_processor_takes_a_flat_image_list_in_prompt_order_as_llava_does():
    _, _, processor = build_pair(2)
    texts = [chat_prompt(processor, QUESTIONS[0], images=2), chat_prompt(processor, QUESTIONS[1])]
    images = [random_image(0), random_image(1), random_image(2)]
    flat = processor(images=images, text=texts, return_tensors="pt", padding=True)
    nested = processor(images=[images[:2], images[2:]], text=texts, return_tensors="pt", padding=True)
    for name in nested:
        assert torch.equal(flat[name], nested[name]), name
    with pytest.raises(ValueError, match="should be the same as the number of images"):
        processor(images=images[:2], text=texts, return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------------------------------------------
# Auto classes and remote code
# ----------------------------------------------------------------------------------------------------------------

GEMMA3_FRESH_PROCESS = """
    import sys, json, torch
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    from pathlib import Path
    from PIL import Image
    from safetensors.torch import save_file
    folder, work = Path(sys.argv[1]), Path(sys.argv[2])
    texts = json.loads((work / "texts.json").read_text())
    images = [Image.open(work / f"image{i}.png") for i in range(len(texts))]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
    model2 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == type(model2).__name__ == "SafeGemma3ForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "SafeGemma3Processor", type(processor).__name__
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    save_file({"input_ids": inputs["input_ids"], "token_type_ids": inputs["token_type_ids"], "logits": out.logits,
               "level": out.safety_level_logits, "tokens": tokens}, str(work / "out.safetensors"))
"""


def test_auto_classes_in_process_and_with_remote_code_in_a_fresh_process(tmp_path):
    import json

    from conftest import run_without_the_package
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from modeling_safe_llava import SafeGemma3Config

    _, safe, processor = build_pair(3)
    safe.config.safety_modules_trained = True
    folder = tmp_path / "safe-gemma3-tiny"
    safe.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert isinstance(AutoConfig.from_pretrained(folder), SafeGemma3Config)
    assert type(AutoModel.from_pretrained(folder)) is SafeGemma3ForConditionalGeneration
    texts = [chat_prompt(processor, q) for q in QUESTIONS]
    for i in range(2):
        random_image(i).save(tmp_path / f"image{i}.png")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    run_without_the_package(GEMMA3_FRESH_PROCESS, folder, tmp_path, work_dir=tmp_path)
    remote = load_file(tmp_path / "out.safetensors")
    inputs = processor(images=[random_image(0), random_image(1)], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        local = safe(**inputs)
    local_tokens = safe.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert torch.equal(remote["token_type_ids"], inputs["token_type_ids"])
    torch.testing.assert_close(remote["logits"], local.logits)
    torch.testing.assert_close(remote["level"], local.safety_level_logits)
    assert torch.equal(remote["tokens"], local_tokens)


def test_the_tiny_model_reads_its_images():
    """Gemma 3 initialises its image projection to zeros; the tiny builder does not, or no test could see an image."""
    stock, _, processor = build_pair(0)
    inputs = image_inputs(processor)
    other = processor(images=[[random_image(7)], [random_image(8)]], text=[chat_prompt(processor, q) for q in QUESTIONS],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        assert not torch.allclose(stock(**inputs).logits[:, -1], stock(**other).logits[:, -1], atol=1e-3)


def test_the_query_is_bos_so_the_verdict_depends_on_the_image_not_on_the_wording_or_padding():
    """The paper's rule (the first real token) gives `<bos>` on every Gemma 3 prompt: the verdict is the image's,
    whatever the question and the padding side (docs/gemma3.md: why not the first user-text token)."""
    _, safe, processor = build_pair(3)
    image = random_image(3)
    verdicts = []
    for question, side in ((QUESTIONS[0], "left"), (QUESTIONS[1], "left"), (QUESTIONS[1], "right")):
        processor.tokenizer.padding_side = side
        texts = [chat_prompt(processor, question), chat_prompt(processor, "Hi")]
        inputs = processor(images=[image, random_image(4)], text=texts, return_tensors="pt", padding=True)
        first = inputs["input_ids"][0, inputs["attention_mask"][0].argmax()]
        assert first == processor.tokenizer.bos_token_id
        verdicts.append(safe.assess_safety(**inputs, allow_untrained_safety=True).level_probs[0])
    processor.tokenizer.padding_side = "left"
    for verdict in verdicts[1:]:
        torch.testing.assert_close(verdict, verdicts[0])
