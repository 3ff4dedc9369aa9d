"""Safety-aware generate: threshold semantics, policies, one vision pass, assessments, batching invariance."""

import threading

import pytest
import torch
from conftest import chat_prompt, random_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlavaForConditionalGeneration, TextIteratorStreamer

from modeling_safe_llava import SafeLlavaForConditionalGeneration, decide_safety_actions
from modeling_safe_llava.configuration_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS

RISKY = SAFETY_TYPE_LABELS[:-1]
# Verdicts forced by image colour (see `force_verdicts`): (level, type index).
VERDICTS = {"red": (3, 4), "green": (1, 5), "blue": (0, 6), "yellow": (2, 1)}
COLOURS = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220), "yellow": (220, 220, 20)}


def solid(colour):
    return Image.new("RGB", (20, 20), COLOURS[colour])


def force_verdicts(model):
    """Replaces the random head's logits by a verdict read from each image's colour, keeping the real vision pass:
    both encoders (`encode_images` for generate and forward, `encode_images_for_safety` for `assess_safety`) record
    each image's colour, and the one route to the head, `safety_logits`, reads it."""
    base = model.model
    encode, encode_for_safety, safety_logits = base.encode_images, base.encode_images_for_safety, base.safety_logits

    def recording(encoder):
        def encode_and_record(pixel_values, *args, **kwargs):
            outputs = encoder(pixel_values, *args, **kwargs)
            outputs.forced_colours = _colours(pixel_values)
            return outputs

        return encode_and_record

    def forced_safety_logits(image_outputs, *args, **kwargs):
        verdict = safety_logits(image_outputs, *args, **kwargs)
        return verdict if image_outputs is None else _forced(*verdict, image_outputs.forced_colours)

    base.encode_images, base.encode_images_for_safety = recording(encode), recording(encode_for_safety)
    base.safety_logits = forced_safety_logits
    return model


def _colours(pixel_values):
    means = pixel_values.mean(dim=(2, 3))  # (num_images, 3), normalised colours
    return [["red", "green", "blue", "yellow"][_colour_index(mean)] for mean in means]


def _forced(level_logits, type_logits, images_per_row, colours):
    for row, image in enumerate(images_per_row.cumsum(0) - 1):
        level, kind = VERDICTS[colours[image]]
        level_logits[row] = torch.nn.functional.one_hot(torch.tensor(level), 4).float() * 20
        type_logits[row] = torch.nn.functional.one_hot(torch.tensor(kind), 7).float() * 20
    return level_logits, type_logits, images_per_row


def _colour_index(mean_rgb):
    r, g, b = mean_rgb.tolist()
    if r > 0 and g > 0:
        return 3
    return [r, g, b].index(max(r, g, b))


def inputs_for(processor, colours, questions=None):
    questions = questions or [f"Question number {i}: what is shown here?" * (i % 2 + 1) for i in range(len(colours))]
    texts = [chat_prompt(processor, q) for q in questions]
    return processor(images=[solid(c) for c in colours], text=texts, return_tensors="pt", padding=True)


def answers(model_output, inputs):
    sequences = model_output.sequences if hasattr(model_output, "sequences") else model_output
    return sequences[:, inputs["input_ids"].shape[1] :]


def decode_answer(processor, tokens):
    return processor.tokenizer.decode(tokens, skip_special_tokens=True)


GREEDY = {"max_new_tokens": 8, "do_sample": False}


# -- threshold semantics ---------------------------------------------------------------------------------------


def test_threshold_one_equals_generation_with_safety_off(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    inputs = processor(
        images=[random_image(1), random_image(2)],
        text=[chat_prompt(processor), chat_prompt(processor, "Describe the picture please.")],
        return_tensors="pt", padding=True,
    )
    safety_off = LlavaForConditionalGeneration.generate(model, **inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, safety_threshold=1.0, **GREEDY), safety_off)


def test_threshold_zero_flags_every_row(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    inputs = processor(images=[random_image(i) for i in range(3)], text=[chat_prompt(processor)] * 3, return_tensors="pt")
    assessment = model.assess_safety(**inputs, safety_threshold=0.0)
    assert assessment.flagged.all()
    assert set(assessment.actions) <= {"hint", "refuse"}


probability_rows = st.lists(st.floats(0.001, 1.0), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(probability_rows, min_size=1, max_size=6),
    low=st.floats(0.0, 1.0),
    high=st.floats(0.0, 1.0),
)
def test_raising_the_threshold_never_adds_a_flag(levels, low, high):
    low, high = min(low, high), max(low, high)
    level_probs = torch.tensor(levels)
    level_probs = level_probs / level_probs.sum(-1, keepdim=True)
    type_probs = torch.softmax(torch.randn(len(levels), 7, generator=torch.Generator().manual_seed(len(levels))), -1)
    actions = {name: ["allow", "hint", "hint", "refuse"] for name in RISKY}

    def flags(threshold):
        thresholds = torch.full((len(RISKY),), threshold)
        return decide_safety_actions(level_probs, type_probs, thresholds, actions, SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS).flagged

    assert not (flags(high) & ~flags(low)).any()
    assert torch.equal(flags(low), (1 - level_probs[:, 0]) > low)


def test_per_category_thresholds(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red", "green"])  # Privacy level 3, Misleading level 1, both risk ~1
    strict_privacy_only = model.assess_safety(**inputs, safety_threshold={"Privacy": 0.5, "Misleading": 1.0})
    assert strict_privacy_only.flagged.tolist() == [True, False]
    assert model.assess_safety(**inputs, safety_threshold=0.5).flagged.tolist() == [True, True]


@pytest.mark.parametrize(
    "threshold, fragment",
    [
        (float("nan"), "nan cannot be applied"),
        (-0.1, "-0.1 cannot be applied"),
        (1.5, "1.5 cannot be applied"),
        ("0.5", "'0.5' cannot be applied"),
        (True, "True cannot be applied"),
        ([0.5], "[0.5] cannot be applied"),
        ({"Weather": 0.5}, "unknown risk type(s) ['Weather']"),
        ({"Privacy": 2.0}, "2.0 cannot be applied"),
    ],
)
def test_invalid_thresholds_raise(trained_tiny_safe_llava, threshold, fragment):
    model, processor = trained_tiny_safe_llava
    inputs = inputs_for(processor, ["red"])
    with pytest.raises(ValueError) as error:
        model.generate(**inputs, safety_threshold=threshold, **GREEDY)
    assert fragment in str(error.value)


# -- policies ----------------------------------------------------------------------------------------------------


def test_refused_row_answers_with_the_configured_refusal(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red"])
    out = model.generate(**inputs, max_new_tokens=60, return_dict_in_generate=True)
    assert out.safety_assessment.actions == ["refuse"]
    assert out.safety_assessment.category_names == ["Privacy"]
    assert decode_answer(processor, answers(out, inputs)[0]) == model.config.safety_refusals["Privacy"]


def record_lm_prompts(model):
    """Input ids of every prefill the language model sees (decode steps have length 1 and are skipped)."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and kwargs.get("mm_encoder_outputs") is not None:
            seen.append(ids.clone())

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_hinted_row_gets_the_hint_right_before_the_assistant_turn(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["green"])  # Misleading, level 1 -> hint
    seen, handle = record_lm_prompts(model)
    out = model.generate(**inputs, return_dict_in_generate=True, **GREEDY)
    handle.remove()
    assert out.safety_assessment.actions == ["hint"]
    texts = model.config.safety_text_token_ids
    marker, hint = texts["assistant_prefix"], texts["hints"]["Misleading"][1]
    prompt = inputs["input_ids"][0].tolist()
    expected = prompt[: -len(marker)] + hint + marker
    assert seen[0][0].tolist() == expected
    assert processor.tokenizer.decode(hint).startswith("Safe Hint: This image may contain risks of false rumors")


def test_allowed_row_is_generated_unchanged(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["blue"])
    seen, handle = record_lm_prompts(model)
    out = model.generate(**inputs, **GREEDY)
    handle.remove()
    assert torch.equal(seen[0], inputs["input_ids"])
    assert torch.equal(out, LlavaForConditionalGeneration.generate(model, **inputs, **GREEDY))


def test_switching_one_category_to_allow_changes_only_its_rows(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red", "green", "yellow", "blue"])
    default = model.generate(**inputs, return_dict_in_generate=True, **GREEDY)
    privacy_allowed = model.generate(
        **inputs, safety_actions={"Privacy": "allow"}, return_dict_in_generate=True, **GREEDY
    )
    assert default.safety_assessment.actions == ["refuse", "hint", "hint", "allow"]
    assert privacy_allowed.safety_assessment.actions == ["allow", "hint", "hint", "allow"]
    a, b = answers(default, inputs), answers(privacy_allowed, inputs)
    assert not torch.equal(a[0], b[0])
    for row in (1, 2, 3):
        assert torch.equal(a[row], b[row]), row


def test_policies_in_the_config_persist_through_save_and_load(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    model.config.safety_actions["Illegal Risk"] = ["allow", "allow", "allow", "hint"]
    model.generation_config.safety_threshold = 0.3
    model.save_pretrained(tmp_path)
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.safety_actions["Illegal Risk"] == ["allow", "allow", "allow", "hint"]
    assert reloaded.generation_config.safety_threshold == 0.3
    rule = reloaded.safety_policy.for_call(None, generation_config=reloaded.generation_config)
    assert rule.thresholds.tolist() == pytest.approx([0.3] * 6)
    assert reloaded.config.safety_text_token_ids == model.config.safety_text_token_ids


# -- one vision pass, no wasted language-model work ------------------------------------------------------------------


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_vision_tower_runs_once_per_generate_call(trained_tiny_safe_llava, threshold):
    model, processor = trained_tiny_safe_llava
    inputs = processor(images=[random_image(5), random_image(6)], text=[chat_prompt(processor)] * 2, return_tensors="pt")
    calls, handle = count_calls(model.model.vision_tower)
    model.generate(**inputs, safety_threshold=threshold, **GREEDY)
    handle.remove()
    assert len(calls) == 1  # one batched call covering both images


def test_assess_safety_never_calls_the_language_model(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    inputs = processor(images=[random_image(5)], text=[chat_prompt(processor)], return_tensors="pt")
    calls, handle = count_calls(model.model.language_model)
    projector_calls, projector_handle = count_calls(model.model.multi_modal_projector)
    assessment = model.assess_safety(**inputs)
    handle.remove()
    projector_handle.remove()
    assert calls == [] and assessment.risk.shape == (1,)
    assert projector_calls == []  # the safety head reads the vision tower only; LLaVA's projection is not needed


def test_all_refused_batch_makes_no_decode_step(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red", "red"])
    calls, handle = count_calls(model.model.language_model)
    out = model.generate(**inputs, max_new_tokens=40)
    handle.remove()
    assert calls == []
    refusal = model.config.safety_refusals["Privacy"]
    assert [decode_answer(processor, row) for row in answers(out, inputs)] == [refusal, refusal]


# -- invariance -------------------------------------------------------------------------------------------------


def test_a_row_gets_the_same_decision_and_output_alone_and_in_a_mixed_batch(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    colours = ["blue", "red", "green", "blue"]
    questions = ["Hi?", "What is shown in this image?", "Describe the picture in detail please.", "Read the text."]
    batch_inputs = inputs_for(processor, colours, questions)
    batch_out = model.generate(**batch_inputs, return_dict_in_generate=True, **GREEDY)
    for row, (colour, question) in enumerate(zip(colours, questions)):
        alone_inputs = inputs_for(processor, [colour], [question])
        alone = model.generate(**alone_inputs, return_dict_in_generate=True, **GREEDY)
        assert alone.safety_assessment.actions[0] == batch_out.safety_assessment.actions[row]
        alone_answer = answers(alone, alone_inputs)[0]
        batch_answer = answers(batch_out, batch_inputs)[row][: len(alone_answer)]
        assert torch.equal(alone_answer, batch_answer), row


def test_assessment_comes_back_with_the_sequences(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red", "blue"])
    out = model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **GREEDY)
    direct = model.assess_safety(**inputs)
    assert out.safety_assessment.actions == direct.actions == ["refuse", "allow"]
    assert torch.allclose(out.safety_assessment.risk, direct.risk)
    assert out.sequences.shape[0] == 2 and all(step.shape[0] == 2 for step in out.scores)  # every row is scored
    records = out.safety_assessment.to_records()
    assert records[0]["category_name"] == "Privacy" and records[0]["action"] == "refuse" and records[1]["flagged"] is False


# -- works with the rest of transformers ---------------------------------------------------------------------------


def test_text_iterator_streamer_receives_the_refusal(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red"])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, "max_new_tokens": 60})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == model.config.safety_refusals["Privacy"]


def test_text_iterator_streamer_streams_an_allowed_answer(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["blue"])
    expected = decode_answer(processor, answers(model.generate(**inputs, **GREEDY), inputs)[0])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, **GREEDY})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == expected


def test_sampling_beams_and_multiple_return_sequences(trained_tiny_safe_llava):
    model, processor = force_verdicts(trained_tiny_safe_llava[0]), trained_tiny_safe_llava[1]
    inputs = inputs_for(processor, ["red", "green", "blue"])
    beams = model.generate(**inputs, num_beams=2, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    assert beams.shape[0] == 6
    refusal = model.config.safety_refusals["Privacy"]
    assert decode_answer(processor, answers(beams, inputs)[0]) == decode_answer(processor, answers(beams, inputs)[1])
    assert refusal.startswith(decode_answer(processor, answers(beams, inputs)[0]))
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=6)
    assert sampled.shape[0] == 3


def test_peft_wrapped_and_merged_models_keep_safety(trained_tiny_safe_llava):
    from peft import LoraConfig, get_peft_model

    model, processor = trained_tiny_safe_llava
    inputs = inputs_for(processor, ["red", "blue"])
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    force_verdicts(peft_model.base_model.model)
    wrapped = peft_model.generate(**inputs, return_dict_in_generate=True, **GREEDY)
    assert wrapped.safety_assessment.actions == ["refuse", "allow"]
    merged = force_verdicts(peft_model.merge_and_unload())
    assert type(merged) is SafeLlavaForConditionalGeneration
    merged_out = merged.generate(**inputs, return_dict_in_generate=True, **GREEDY)
    assert merged_out.safety_assessment.actions == ["refuse", "allow"]
    assert torch.equal(answers(merged_out, inputs), answers(wrapped, inputs))


def test_untrained_safety_modules_fail_closed(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = inputs_for(processor, ["blue"])
    with pytest.raises(ValueError, match="safety modules of this model are untrained"):
        model.generate(**inputs, **GREEDY)
    with pytest.raises(ValueError, match="safety modules of this model are untrained"):
        model.assess_safety(**inputs)
    assert model.generate(**inputs, allow_untrained_safety=True, **GREEDY).shape[0] == 1


def test_from_llava_with_a_processor_hints_and_refuses_with_the_papers_policy_out_of_the_box(tiny_llava):
    """No `**load_safety_policy()` needed: the paper's texts are the default, tokenized with the processor given."""
    from modeling_safe_llava import SafeLlavaProcessor
    from modeling_safe_llava.tiny import safety_fields

    llava, llava_processor = tiny_llava
    fields = safety_fields()
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeLlavaForConditionalGeneration.from_llava(llava, processor=processor, **fields).eval()
    model.config.safety_modules_trained = True
    inputs = processor(images=[solid("red")], text=[chat_prompt(processor)], return_tensors="pt")
    for actions in ("hint", "refuse"):
        every_type = {name: actions for name in RISKY}
        out = model.generate(**inputs, safety_threshold=0.0, safety_actions=every_type, return_dict_in_generate=True, **GREEDY)
        assert out.safety_assessment.actions == [actions]
    assert model.config.safety_refusals["Privacy"].startswith("I'm sorry")

