"""Collators: records in the paper's schema -> exactly the tensors `SafeLlavaForConditionalGeneration.forward` takes.

Both tokenize with the processor's chat template (which expands each `<image>` to the LLM safety tokens and the
patches). `SafeLlavaTrainingCollator` trains (answers are the only LM targets, right padding);
`SafeLlavaPromptCollator` judges prompts (no answers, left padding, as generation needs).
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..checks_safe_llava import is_integer
from .data import load_image, to_chat_messages


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Without `max_length`, a conversation keeps at most this many tokens' worth of characters before tokenising: far
# beyond any LLaVA context, yet a bound on the cost of one hostile row.
DEFAULT_TOKEN_LIMIT = 32768
TRAINING_BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "safety_labels")
PROMPT_BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "safety_labels")


def safety_labels_of(rows: list[dict]) -> torch.LongTensor:
    """`(batch, 2)` long tensor of `(safe_level, safe_type)` per row; a `None` label becomes -100 (no loss)."""
    values = [
        [IGNORE_INDEX if row.get(name) is None else int(row[name]) for name in ("safe_level", "safe_type")]
        for row in rows
    ]
    return torch.tensor(values, dtype=torch.long)


def character_budget(tokenizer, max_tokens: int) -> int:
    """The most characters that `max_tokens` tokens of `tokenizer` can cover: `max_tokens` times its longest
    vocabulary entry. Text cut after that many characters still gives the same first `max_tokens` tokens."""
    return max_tokens * max(map(len, tokenizer.get_vocab()), default=1)


def cut_messages(messages: list[dict], max_characters: int) -> tuple[list[dict], bool]:
    """`(messages whose texts hold at most max_characters characters together, whether anything was cut)`; image
    entries are always kept."""
    left, cut, kept = max_characters, False, []
    for message in messages:
        content = []
        for item in message["content"]:
            if item.get("type") == "text":
                text = item["text"]
                cut = cut or len(text) > left
                item = {**item, "text": text[: max(left, 0)]}
                left -= len(item["text"])
            content.append(item)
        kept.append({**message, "content": content})
    return kept, cut


def _conversations_with_images(rows: list[dict], include_answers: bool, max_characters: int) -> list[list[dict]]:
    """Chat messages of each row with its decoded image, texts cut to `max_characters` before any tokenising (the
    cost of one huge conversation is bounded); logs how many rows were cut."""
    conversations, num_cut = [], 0
    for row in rows:
        messages = to_chat_messages(row["conversations"], load_image(row["image"]), include_answers)
        messages, was_cut = cut_messages(messages, max_characters)
        conversations.append(messages)
        num_cut += was_cut
    if num_cut:
        logger.warning(
            "Cut %d of %d conversations in this batch to %d characters before tokenising (raise max_length to keep "
            "more); the cut text never reaches the model.",
            num_cut,
            len(rows),
            max_characters,
        )
    return conversations


@dataclass
class SafeLlavaTrainingCollator:
    """
    Batches records for training.

    Returns `input_ids`, `attention_mask` `(B, T)`, the image fields (`pixel_values` `(B, 3, H, W)`; anyres bases:
    `(B, crops, 3, H, W)` and `image_sizes` `(B, 2)`), `labels` `(B, T)` (token ids of
    what the model must generate after each generation prompt: the assistant answer with its end-of-turn token, and
    a whitespace token between "ASSISTANT:" and the answer; -100 everywhere else: prompts, image placeholders,
    padding)
    and `safety_labels` `(B, 2)` (level, type per row). Rows are padded on the right.

    Args:
        processor: a `SafeLlavaProcessor` with a chat template that marks answers with `{% generation %}`.
        max_length: keep the first `max_length` tokens of each row (the end of long answers is cut); a cut that
            would remove image placeholders raises instead, since the model needs all of them. Before tokenising,
            each conversation's text is cut to what `max_length` (default `DEFAULT_TOKEN_LIMIT`) tokens can cover at
            most (`character_budget`), so a huge row costs no more than a long one; cut rows are logged.
    """

    processor: Any
    max_length: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "_budget" not in self.__dict__:  # computed once: it reads the whole vocabulary
            limit = DEFAULT_TOKEN_LIMIT if self.max_length is None else _checked_max_length(self.max_length)
            self._budget = character_budget(self.processor.tokenizer, limit)
        encoded = self.processor.apply_chat_template(
            _conversations_with_images(rows, include_answers=True, max_characters=self._budget),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "right"},
        )
        answer_mask = self._with_leading_whitespace(encoded["input_ids"], encoded["assistant_masks"].bool())
        labels = encoded["input_ids"].masked_fill(~answer_mask, IGNORE_INDEX)
        batch = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            **image_fields(encoded),
            "labels": labels,
            "safety_labels": safety_labels_of(rows),
        }
        if self.max_length is not None:
            batch = _truncate_right(batch, self.max_length, self.processor.image_token_id)
        return batch

    def _with_leading_whitespace(self, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """
        Extends each answer span of `answer_mask` `(B, T)` over the whitespace-only tokens between the generation
        prompt (e.g. "ASSISTANT:") and the answer. The chat template writes that space outside `{% generation %}`,
        yet after the generation prompt the model must produce it: a tokenizer that does not merge it into the
        answer's first token (e.g. Llama before a digit) would otherwise never learn to emit it.
        """
        prefix = self._assistant_prefix()
        answer_mask = answer_mask.clone()
        for row in range(input_ids.shape[0]):
            ids, mask = input_ids[row].tolist(), answer_mask[row].tolist()
            starts = [i for i in range(1, len(ids)) if mask[i] and not mask[i - 1]]
            for start in starts:
                lead = start
                while lead > 0 and not mask[lead - 1] and self._is_whitespace_token(ids[lead - 1]):
                    lead -= 1
                if lead < start and lead >= len(prefix) and ids[lead - len(prefix) : lead] == prefix:
                    answer_mask[row, lead:start] = True
        return answer_mask

    def _assistant_prefix(self) -> list[int]:
        if not hasattr(self, "_prefix_ids"):
            self._prefix_ids = self.processor.assistant_prefix_ids()
        return self._prefix_ids

    def _is_whitespace_token(self, token_id: int) -> bool:
        cache = self.__dict__.setdefault("_whitespace_cache", {})
        if token_id not in cache:
            special = token_id in self.processor.tokenizer.all_special_ids
            cache[token_id] = not special and self.processor.tokenizer.decode([token_id]).strip() == ""
        return cache[token_id]


@dataclass
class SafeLlavaPromptCollator:
    """
    Batches the prompts of records (turns before the first answer, plus the assistant-turn marker), left-padded:
    what `model.assess_safety(**batch)` and `generate` take. Returns `input_ids`, `attention_mask`,
    `pixel_values` and `safety_labels` `(B, 2)` (drop `safety_labels` before `generate`). Prompts are cut to
    `DEFAULT_TOKEN_LIMIT` tokens' worth of characters before tokenising.
    """

    processor: Any

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "_budget" not in self.__dict__:  # computed once: it reads the whole vocabulary
            self._budget = character_budget(self.processor.tokenizer, DEFAULT_TOKEN_LIMIT)
        encoded = self.processor.apply_chat_template(
            _conversations_with_images(rows, include_answers=False, max_characters=self._budget),
            tokenize=True,
            return_dict=True,
            add_generation_prompt=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            **image_fields(encoded),
            "safety_labels": safety_labels_of(rows),
        }


# Processor outputs that follow the tokens, one entry per token (cut with the text): the modality of each token, which
# multimodal RoPE reads (Qwen2.5-VL's `get_rope_index`).
TOKEN_FIELDS = ("mm_token_type_ids",)


def image_fields(encoded) -> dict:
    """The processor's image outputs, whatever the base returns: `pixel_values`, and e.g. LLaVA-NeXT's `image_sizes`
    or Qwen2.5-VL's `image_grid_thw` (one entry per image, never cut with the text), and the `TOKEN_FIELDS` it
    returns."""
    return {key: value for key, value in encoded.items() if key.startswith(("pixel_values", "image_", *TOKEN_FIELDS))}


def _checked_max_length(max_length) -> int:
    if not is_integer(max_length) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}.")
    return max_length


def _truncate_right(batch: dict, max_length: int, image_token_id: int) -> dict:
    """Cuts right-padded `(B, T)` tensors to `max_length` columns, refusing to cut image placeholders."""
    _checked_max_length(max_length)
    if batch["input_ids"].shape[1] <= max_length:
        return batch
    kept = (batch["input_ids"][:, :max_length] == image_token_id).sum(dim=1)
    total = (batch["input_ids"] == image_token_id).sum(dim=1)
    if bool((kept != total).any()):
        rows = (kept != total).nonzero().flatten().tolist()
        raise ValueError(
            f"max_length={max_length} would cut the image placeholders of rows {rows} ({total.tolist()} needed); "
            "raise max_length."
        )
    return {
        key: value[:, :max_length] if key in ("input_ids", "attention_mask", "labels", *TOKEN_FIELDS) else value
        for key, value in batch.items()
    }


__all__ = [
    "IGNORE_INDEX",
    "SafeLlavaTrainingCollator",
    "SafeLlavaPromptCollator",
    "safety_labels_of",
    "character_budget",
    "cut_messages",
    "DEFAULT_TOKEN_LIMIT",
]
