"""Collators: labels only on assistant answers (exact positions), safety labels per row, right padding for training,
and exactly the inputs `forward` takes."""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_safe_llava.training import SafeLlavaPromptCollator, SafeLlavaTrainingCollator
from modeling_safe_llava.training.collator import IGNORE_INDEX


def image(colour) -> Image.Image:
    return Image.fromarray(np.full((20, 20, 3), colour, dtype="uint8"))


def row(question, answers, level, type_index, colour=(200, 10, 10), follow_ups=()):
    conversations = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answers[0]}]
    for follow_up, answer in zip(follow_ups, answers[1:]):
        conversations += [{"from": "human", "value": follow_up}, {"from": "gpt", "value": answer}]
    return {"image": image(colour), "conversations": conversations, "safe_level": level, "safe_type": type_index}


ROWS = [
    row("What is shown?", ["A cat."], 0, 6),
    row("Read the text in the image.", ["I'm sorry, but I can't help with this request."], 3, 1, (10, 10, 200)),
    row("Describe the picture.", ["A street sign.", "Yes, a menu."], 2, 4, (10, 200, 10), ["Anything else?"]),
]


def expected_labels(processor, source_row, input_ids):
    """Label row built independently: tokenize each prefix ending in an assistant turn's start, then mark the
    answer's tokens (answer + end-of-sequence) right after it."""
    tokenizer = processor.tokenizer
    turns = source_row["conversations"]
    expected = [IGNORE_INDEX] * len(input_ids)
    for end in range(1, len(turns), 2):
        prompt = processor.apply_chat_template(
            _messages(turns[:end]), add_generation_prompt=True, tokenize=False
        )
        start = len(processor(text=prompt, images=source_row["image"])["input_ids"][0])
        answer_ids = tokenizer.encode(" " + turns[end]["value"] + tokenizer.eos_token, add_special_tokens=False)
        assert input_ids[start : start + len(answer_ids)] == answer_ids  # the collator tokenized the same text
        expected[start : start + len(answer_ids)] = answer_ids
    return expected


def _messages(turns):
    messages = []
    for turn in turns:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"].replace("<image>\n", "")
        content = ([{"type": "image"}] if "<image>" in turn["value"] else []) + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


def test_labels_mark_exactly_the_assistant_answers(tiny_safe_llava):
    _, processor = tiny_safe_llava
    batch = SafeLlavaTrainingCollator(processor)(ROWS)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for index, source_row in enumerate(ROWS):
        ids = batch["input_ids"][index, : lengths[index]].tolist()
        labels = batch["labels"][index].tolist()
        assert labels[: lengths[index]] == expected_labels(processor, source_row, ids)
        assert all(label == IGNORE_INDEX for label in labels[lengths[index] :])  # padding
        image_positions = batch["input_ids"][index] == processor.image_token_id
        assert bool((batch["labels"][index][image_positions] == IGNORE_INDEX).all())
    # The two-answer row has two labelled spans separated by the unlabelled follow-up question.
    labelled = (batch["labels"][2] != IGNORE_INDEX).int().tolist()
    assert sum(1 for a, b in zip([0] + labelled, labelled) if (a, b) == (0, 1)) == 2


def test_padding_is_on_the_right_and_safety_labels_follow_the_rows(tiny_safe_llava):
    _, processor = tiny_safe_llava
    collator = SafeLlavaTrainingCollator(processor)
    for order in ([0, 1, 2], [2, 0, 1]):
        rows = [ROWS[i] for i in order]
        batch = collator(rows)
        assert batch["safety_labels"].dtype == torch.long
        assert batch["safety_labels"].tolist() == [[r["safe_level"], r["safe_type"]] for r in rows]
        mask = batch["attention_mask"]
        assert bool((mask[:, 0] == 1).all())  # every row starts with a real token
        assert mask.shape[1] == int(mask.sum(dim=1).max())
        for index in range(len(rows)):
            length = int(mask[index].sum())
            assert mask[index].tolist() == [1] * length + [0] * (mask.shape[1] - length)
            assert bool((batch["input_ids"][index, length:] == processor.tokenizer.pad_token_id).all())
        assert int(mask.sum(dim=1).min()) < mask.shape[1]  # rows of different lengths, so padding was needed
    assert processor.tokenizer.padding_side == "left"  # the processor's generation default is left untouched


def test_batches_hold_exactly_what_forward_takes_and_train(tiny_safe_llava):
    model, processor = tiny_safe_llava
    batch = SafeLlavaTrainingCollator(processor)(ROWS)
    forward_parameters = inspect.signature(model.forward).parameters
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels", "safety_labels"}
    assert set(batch) <= set(forward_parameters)
    output = model(**batch)
    assert output.lm_loss is not None and output.safety_loss is not None
    assert torch.isfinite(output.loss)


def test_max_length_cuts_answers_but_never_image_placeholders(tiny_safe_llava):
    _, processor = tiny_safe_llava
    full = SafeLlavaTrainingCollator(processor)(ROWS)
    cut = SafeLlavaTrainingCollator(processor, max_length=full["input_ids"].shape[1] - 3)(ROWS)
    assert cut["input_ids"].shape[1] == full["input_ids"].shape[1] - 3
    assert torch.equal(cut["labels"], full["labels"][:, :-3])
    first_image = int((full["input_ids"][0] == processor.image_token_id).nonzero()[0])
    with pytest.raises(ValueError, match="would cut the image placeholders"):
        SafeLlavaTrainingCollator(processor, max_length=first_image + 2)(ROWS)


def test_prompt_collator_left_pads_prompts_for_assessment(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    batch = SafeLlavaPromptCollator(processor)(ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "safety_labels"}
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left padding: every row ends with a real token
    marker = processor.assistant_prefix_ids()
    for index in range(len(ROWS)):
        assert batch["input_ids"][index, -len(marker) :].tolist() == marker  # ends at the assistant turn
        length = int(batch["attention_mask"][index].sum())
        ids = batch["input_ids"][index, -length:].tolist()
        assert ids.count(processor.tokenizer.eos_token_id) == 0  # no answer inside
    assessment = model.assess_safety(**{k: v for k, v in batch.items() if k != "safety_labels"})
    assert len(assessment.actions) == len(ROWS)
