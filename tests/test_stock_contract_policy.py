"""The stock contract with safety on and a policy that acts (issue 11, item 2): a batch mixing refused, hinted,
allowed and text-only rows keeps generate's output shapes and scores, refusals obey the stopping rules, and streamers
behave as with stock LLaVA, for each base (`bases.BASES`). Verdicts are forced with `force_safety_verdicts` (paper
policy, threshold 0.5)."""

import pytest
import torch
from conftest import chat_prompt
from stock_contract import assert_same, build_pair, force_safety_verdicts, text_only_prompt
from transformers import TextStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

# (level, type) per image: Privacy at level 3 -> refuse; Misleading at level 1 -> hint; Clean at level 0 -> allow.
REFUSE, HINT, ALLOW = (3, 4), (1, 5), (0, 6)
ON = {"safety_threshold": 0.5, "do_sample": False}


@pytest.fixture
def policy_pair(base):
    """(stock, SafeLlava marked trained, processor) of one base."""
    return build_pair("safety_on_allow", base=base)


def mixed_inputs(processor, base):
    """Rows: refused image, hinted image, allowed image, text only (left-padded)."""
    texts = [chat_prompt(processor, q) for q in ("What is shown?", "Describe the picture.", "Read the text.")]
    texts.append(text_only_prompt(processor))
    images = [base.random_image(i) for i in range(3)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def single_inputs(processor, base):
    return processor(images=[base.random_image(0)], text=[chat_prompt(processor)], return_tensors="pt")


def force(safe, verdicts, inputs, base):
    """`force_safety_verdicts` with the base's vision units (crops) per image."""
    return force_safety_verdicts(safe, verdicts, base.judged_units(inputs))


def answer_of(sequences, inputs, row=0):
    return sequences[row, inputs["input_ids"].shape[1] :]


def refusal_text(safe):
    return safe.config.safety_refusals[safe.config.safety_type_labels[REFUSE[1]]]


def test_mixed_batch_outputs_cover_every_row(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = mixed_inputs(processor, base)
    force(safe, [REFUSE, HINT, ALLOW], inputs, base)
    out = safe.generate(
        **inputs, **ON, max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    assert out.safety_assessment.actions == ["refuse", "hint", "allow", "allow"]
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert out.sequences.shape[0] == 4
    for name in ("scores", "logits"):
        steps = getattr(out, name)
        assert steps is not None and len(steps) == new_tokens, f"{name}: one entry per new token expected"
        assert all(step.shape == (4, len(processor.tokenizer)) for step in steps), f"{name} must cover every row"
    # The allowed image row and the text-only row are what stock gives them alone.
    for row in (2, 3):
        alone = {k: inputs[k][row : row + 1] for k in ("input_ids", "attention_mask")}
        alone = {k: v[:, v.shape[1] - int(inputs["attention_mask"][row].sum()) :] for k, v in alone.items()}
        if row == 2:
            alone.update(base.select_images(inputs, [2]))
        expected = answer_of(stock.generate(**alone, do_sample=False, max_new_tokens=6), alone)
        assert_same(expected, answer_of(out.sequences, inputs, row)[: len(expected)], f"row {row} answer")
    assert isinstance(out, GenerateDecoderOnlyOutput), f"{type(out).__name__} is not a GenerateDecoderOnlyOutput"


def test_refused_image_row_beside_a_text_only_row(policy_pair, base):
    """No image reaches the language model: the allowed text-only row is generated as stock generates it."""
    stock, safe, processor = policy_pair
    texts = [chat_prompt(processor), text_only_prompt(processor)]
    inputs = processor(images=[base.random_image(0)], text=texts, return_tensors="pt", padding=True)
    force(safe, [REFUSE], inputs, base)
    out = safe.generate(**inputs, **ON, max_new_tokens=6, return_dict_in_generate=True)
    assert out.safety_assessment.actions == ["refuse", "allow"]
    text_row = {k: inputs[k][1:, inputs[k].shape[1] - int(inputs["attention_mask"][1].sum()) :] for k in ("input_ids", "attention_mask")}
    expected = answer_of(stock.generate(**text_row, do_sample=False, max_new_tokens=6), text_row)
    assert_same(expected, answer_of(out.sequences, inputs, 1)[: len(expected)], "text-only row answer")


def test_refused_tokens_score_zero_in_transition_scores(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = mixed_inputs(processor, base)
    force(safe, [REFUSE, HINT, ALLOW], inputs, base)
    out = safe.generate(**inputs, **ON, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    scores = safe.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert scores.shape == (4, out.sequences.shape[1] - inputs["input_ids"].shape[1])
    assert torch.equal(scores[0], torch.zeros_like(scores[0])), "a refusal's forced tokens have log-prob 0"
    assert torch.isfinite(scores[1:, 0]).all(), "the first new token of every generated row has a finite score"


def test_refusal_honours_max_new_tokens_and_max_length(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = single_inputs(processor, base)
    force(safe, [REFUSE], inputs, base)
    prompt_length = inputs["input_ids"].shape[1]
    full = processor.tokenizer.decode(answer_of(safe.generate(**inputs, **ON, max_new_tokens=80), inputs), skip_special_tokens=True)
    assert full == refusal_text(safe)
    short = safe.generate(**inputs, **ON, max_new_tokens=3)
    assert short.shape[1] == prompt_length + 3
    bounded = safe.generate(**inputs, **ON, max_length=prompt_length + 4)
    assert bounded.shape[1] == prompt_length + 4, "max_length bounds the whole sequence, refusals included"
    assert full.startswith(processor.tokenizer.decode(answer_of(bounded, inputs), skip_special_tokens=True))


def test_refusal_honours_stop_strings(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = single_inputs(processor, base)
    force(safe, [REFUSE], inputs, base)
    out = safe.generate(**inputs, **ON, max_new_tokens=80, stop_strings=["sorry"], tokenizer=processor.tokenizer)
    text = processor.tokenizer.decode(answer_of(out, inputs), skip_special_tokens=True)
    assert "sorry" in text and "help" not in text, f"generation must stop at the stop string, got {text!r}"
    assert refusal_text(safe).startswith(text)


def test_refusal_honours_eos(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = single_inputs(processor, base)
    force(safe, [REFUSE], inputs, base)
    eos = safe.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    full = answer_of(safe.generate(**inputs, **ON, max_new_tokens=80), inputs)
    assert int(full[-1]) == eos, "a complete refusal ends with EOS, as a finished stock answer does"
    stop = next(i for i in range(2, len(full)) if int(full[i]) not in full[:i].tolist())
    custom = answer_of(safe.generate(**inputs, **ON, max_new_tokens=80, eos_token_id=int(full[stop])), inputs)
    assert_same(full[: stop + 1], custom, "refusal cut at a custom eos_token_id")


def test_streamer_with_batch_above_one_raises_as_stock(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = mixed_inputs(processor, base)
    force(safe, [REFUSE, HINT, ALLOW], inputs, base)
    with pytest.raises(ValueError):
        stock.generate(**inputs, do_sample=False, max_new_tokens=3, streamer=TextStreamer(processor.tokenizer))
    with pytest.raises(ValueError):
        safe.generate(**inputs, **ON, max_new_tokens=3, streamer=TextStreamer(processor.tokenizer))


class RecordingStreamer(TextStreamer):
    """A `TextStreamer` that keeps the text it would print."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.texts, self.ended = [], False

    def on_finalized_text(self, text, stream_end=False):
        self.texts.append(text)
        self.ended = self.ended or stream_end


def test_refused_single_row_streams_its_refusal(policy_pair, base):
    stock, safe, processor = policy_pair
    inputs = single_inputs(processor, base)
    force(safe, [REFUSE], inputs, base)
    streamer = RecordingStreamer(processor.tokenizer)
    safe.generate(**inputs, **ON, max_new_tokens=80, streamer=streamer)
    assert streamer.ended
    assert "".join(streamer.texts).strip() == refusal_text(safe)
