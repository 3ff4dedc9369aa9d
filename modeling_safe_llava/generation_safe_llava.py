# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava's generation plan: stock `generate` with the safety verdict in front.

The model's `generate` (`safety_model_safe_llava.SafetyForConditionalGenerationMixin`) resolves the call's rule
(`policy_safe_llava.SafetyCallRule`) and hands over to [`generate_with_safety`]. The plan judges the images once
through the model's [`SafetyGenerationModel`] interface, applies the rule, then carries out each row's action:

- allowed rows: stock `generate`, the images passed on pre-encoded (the vision tower runs once);
- hinted rows: the safe hint inserted before the assistant-turn marker ([`insert_hint`]), then stock `generate`;
- refused rows: the refusal, cut where stock generation would stop ([`cut_at_stop_strings`]), without the language
  model.

The result is stock's generate output class with `safety_assessment` added.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import contextvars
import copy
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig, PreTrainedConfig
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput

from .policy_safe_llava import SafeLlavaSafetyAssessment, SafetyCallRule, no_image_logits
from .safety_module_safe_llava import check_input_ids


@dataclass
class SafeLlavaGenerateDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    r"""Stock [`GenerateDecoderOnlyOutput`] plus `safety_assessment` ([`SafeLlavaSafetyAssessment`]), the verdict."""

    safety_assessment: SafeLlavaSafetyAssessment | None = None


@dataclass
class SafeLlavaGenerateBeamDecoderOnlyOutput(GenerateBeamDecoderOnlyOutput):
    r"""Stock [`GenerateBeamDecoderOnlyOutput`] plus `safety_assessment` ([`SafeLlavaSafetyAssessment`])."""

    safety_assessment: SafeLlavaSafetyAssessment | None = None


# Arguments of `generate` that `safety_logits_for_generation` takes by name, or that must not reach the image encoder.
_NOT_IMAGE_KWARGS = (
    "input_ids", "inputs_embeds", "attention_mask", "pixel_values", "mm_encoder_outputs", "output_hidden_states",
    "output_attentions",
)  # fmt: skip
# Set while a verdict governs a stock `generate` call: a nested call (assisted decoding's candidate model) follows it.
_VERDICT_GIVEN = contextvars.ContextVar("safe_llava_verdict_given", default=False)


def run_governed(stock_generate, *args, **kwargs):
    """Stock `generate`, marked as governed by a verdict already given."""
    token = _VERDICT_GIVEN.set(True)
    try:
        return stock_generate(*args, **kwargs)
    finally:
        _VERDICT_GIVEN.reset(token)


class SafetyGenerationModel(Protocol):
    """
    All the generation plan reads of a model. `safety_model_safe_llava.SafetyGenerationView` provides it for the
    ForConditionalGeneration class of every base.

    Attributes:
        config (`PreTrainedConfig`): the model's config (safety labels and temperatures, `get_text_config()`).
        generation_config (`GenerationConfig`): the model's default generation config.
    """

    config: PreTrainedConfig
    generation_config: GenerationConfig

    def safety_logits_for_generation(
        self, input_ids, inputs_embeds, attention_mask, pixel_values, image_outputs, allow_untrained_safety, **kwargs
    ) -> tuple:
        """
        The images judged once: the safety modules checked ready and the inputs validated, `pixel_values` encoded for
        the language model and the head at once (or pre-encoded `image_outputs` taken as they are), then the head.
        `allow_untrained_safety` is `generate`'s; `kwargs` are the call's other arguments, of which the image encoder
        keeps those it takes (e.g. `image_sizes`).

        Returns:
            `(image_outputs, level_logits (batch_size, num_levels), type_logits (batch_size, num_types),
            images_per_row (batch_size,))`.
        """

    def rows_inputs(self, kwargs, input_ids, attention_mask, images_per_row: list[int], rows: list[int]) -> dict:
        """
        The base's own model inputs for `rows` of the call regenerated with rebuilt prompts: the call's per-image
        arguments (`kwargs`) for the images of `rows` alone (Qwen2.5-VL: `image_grid_thw`; `images_per_row` maps images
        to rows), and the inputs that follow from the rebuilt prompts' token ids `input_ids` `(len(rows),
        prompt_length)` (Gemma 3: `token_type_ids`).
        """


def generate_with_safety(
    model: SafetyGenerationModel, stock_generate, args, kwargs, rule: SafetyCallRule, allow_untrained_safety: bool
):
    """
    `model.generate` with the verdict in front. Stock behaviour, exactly, when safety is off (`safety_threshold=1.0`
    flags nothing), when there is no image to judge, and for every allowed row; see [`SafetyGenerationPlan`].
    """
    if _VERDICT_GIVEN.get() or rule.safety_off:
        return run_governed(stock_generate, *args, **kwargs)
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    plan = SafetyGenerationPlan(model, rule, kwargs)
    return plan.run(stock_generate, args, allow_untrained_safety)


class SafetyGenerationPlan:
    """
    One `generate` call's verdicts carried out: images encoded once, judged, then each row generated as its action
    says. Each row gets what it would get alone.

    The plan reads nothing of the model but its [`SafetyGenerationModel`] interface.

    Args:
        model (`SafetyGenerationModel`): the model generating.
        rule (`SafetyCallRule`): the call's thresholds and actions, and the policy's texts.
        kwargs (`dict`): the keyword arguments of the `generate` call (`input_ids` among them).
    """

    def __init__(self, model: SafetyGenerationModel, rule: SafetyCallRule, kwargs: dict):
        self.model, self.rule, self.policy, self.kwargs = model, rule, rule.policy, kwargs
        self.config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
        self.config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})

    # -- verdict -------------------------------------------------------------------------------------------------

    def run(self, stock_generate, args, allow_untrained_safety):
        input_ids, inputs_embeds = self.kwargs.get("input_ids"), self.kwargs.get("inputs_embeds")
        pixel_values, attention_mask = self.kwargs.get("pixel_values"), self.kwargs.get("attention_mask")
        pre_encoded = (self.kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pixel_values is None and pre_encoded is None:
            return self._run_text_only(stock_generate, args, input_ids, inputs_embeds)
        if self.rule.allows_everything and not self._verdict_wanted():
            # Nothing to judge, as with safety off: every row is stock's whatever the verdict, and nobody reads it.
            # Stock `generate` encodes the images itself (`forward` names `mm_encoder_outputs`), the safety head never
            # runs, and untrained safety modules cannot change an answer, so nothing fails closed.
            return run_governed(stock_generate, *args, **self.kwargs)
        image_kwargs = self._image_kwargs()
        image_outputs, *logits = self.model.safety_logits_for_generation(
            input_ids, inputs_embeds, attention_mask, pixel_values, pre_encoded, allow_untrained_safety, **image_kwargs
        )
        assessment = self.rule.assess(self.model.config, *logits)
        streamer = self.kwargs.get("streamer")
        if hasattr(streamer, "on_safety_assessment"):
            streamer.on_safety_assessment(assessment)
        self.kwargs.pop("pixel_values", None)
        self.kwargs["mm_encoder_outputs"] = {**(self.kwargs.get("mm_encoder_outputs") or {}), "image": image_outputs}
        if all(action == "allow" for action in assessment.actions):
            return self._with_assessment(run_governed(stock_generate, *args, **self.kwargs), assessment)
        return self._run_mixed(stock_generate, args, assessment, image_outputs)

    def _run_text_only(self, stock_generate, args, input_ids, inputs_embeds):
        """No image: nothing to judge. Stock generation, with an all-"allow" assessment attached."""
        if input_ids is not None:
            check_input_ids(self.model.config, input_ids)
        output = run_governed(stock_generate, *args, **self.kwargs)
        if not isinstance(output, ModelOutput):
            return output
        batch_size = output.sequences.shape[0] // (self.config.num_return_sequences or 1)
        no_image = no_image_logits(self.model.config, batch_size)
        return self._with_assessment(output, self.rule.assess(self.model.config, *no_image, None))

    def _verdict_wanted(self) -> bool:
        """Whether the caller reads the verdict: in the output (`return_dict_in_generate`) or from the streamer."""
        return bool(self.config.return_dict_in_generate) or hasattr(self.kwargs.get("streamer"), "on_safety_assessment")

    def _image_kwargs(self) -> dict:
        """The call's arguments besides the verdict's named inputs; the model keeps those its image encoder takes.
        Output flags are left out: they are for the language model, not for the images encoded for both."""
        return {k: v for k, v in self.kwargs.items() if k not in _NOT_IMAGE_KWARGS}

    def _with_assessment(self, output, assessment):
        if not isinstance(output, ModelOutput):
            return output
        output_class = (
            SafeLlavaGenerateBeamDecoderOnlyOutput
            if isinstance(output, GenerateBeamDecoderOnlyOutput)
            else SafeLlavaGenerateDecoderOnlyOutput
        )
        return output_class(**dict(output.items()), safety_assessment=assessment)

    # -- mixed batches -------------------------------------------------------------------------------------------

    def _run_mixed(self, stock_generate, args, assessment, image_outputs):
        input_ids = self.kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "A row was flagged for a safe hint or a refusal, which needs input_ids to place the hint and return "
                "the answer; generate from input_ids (inputs_embeds alone cannot be edited), or set "
                "safety_threshold=1.0 to turn safety off."
            )
        if self.kwargs.get("streamer") is not None and input_ids.shape[0] > 1:
            raise ValueError("A streamer only supports batch size 1 (as stock generate's TextStreamer).")
        attention_mask = self.kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        texts = self._text_token_ids()
        rows = range(input_ids.shape[0])
        lm_rows = [row for row in rows if assessment.actions[row] != "refuse"]
        lm_output = None
        if lm_rows:
            lm_output = self._generate_rows(stock_generate, args, lm_rows, input_ids, attention_mask, assessment, image_outputs, texts)
        answers = _Answers(self, input_ids, lm_rows, lm_output)
        for row in rows:
            if assessment.actions[row] == "refuse":
                answers.add_refusal(row, self._refusal_tokens(texts, assessment.category_names[row], input_ids))
        self._stream_refusal(input_ids, assessment, answers)
        return answers.output(assessment)

    def _generate_rows(self, stock_generate, args, rows, input_ids, attention_mask, assessment, image_outputs, texts):
        prompts = []
        for row in rows:
            prompt = input_ids[row][attention_mask[row].bool()]
            if assessment.actions[row] == "hint":
                prompt = insert_hint(prompt, row, texts, assessment)
            prompts.append(prompt)
        width = max(len(prompt) for prompt in prompts)
        ids = input_ids.new_full((len(prompts), width), self.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = prompt
            mask[i, width - len(prompt) :] = 1
        images_per_row = assessment.images_per_row.tolist()
        images = select_images(image_outputs, images_per_row, rows)
        kwargs = {**self.kwargs, "input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": images}}
        kwargs.update(self.model.rows_inputs(self.kwargs, ids, mask, images_per_row, rows))
        if len(images.pooler_output) == 0:  # only text-only rows reach the language model
            kwargs.pop("mm_encoder_outputs")
        kwargs["return_dict_in_generate"] = True
        self.lm_prompt_width = width
        return run_governed(stock_generate, *args, **kwargs)

    def _text_token_ids(self):
        if not self.policy.text_token_ids:
            tokenizer = self.kwargs.get("tokenizer")
            if tokenizer is None:
                raise ValueError(
                    "A row was flagged for a hint or a refusal, but this model has no tokenized safety texts "
                    "(config.safety_text_token_ids is empty). Call model.tokenize_safety_texts(processor) once, or "
                    "pass tokenizer=... to generate."
                )
            return copy.copy(self.policy).tokenize(tokenizer)  # the policy is shared: tokenized for this call only
        return self.policy.text_token_ids

    def _refusal_tokens(self, texts, category, input_ids) -> list[int]:
        """The refusal, then EOS, cut where stock generation would stop: at EOS, a stop string or the length limit."""
        refusal = list(texts["refusals"].get(category) or [])
        if not refusal:
            raise ValueError(f"No refusal text for {category!r}; set config.safety_refusals and tokenize it.")
        eos = self.eos_token_ids
        tokens = refusal + eos[:1]
        for i, token in enumerate(tokens):
            if token in eos:
                tokens = tokens[: i + 1]
                break
        tokens = cut_at_stop_strings(tokens, self.config.stop_strings, self.kwargs.get("tokenizer"))
        return tokens[: self.max_new_tokens(input_ids.shape[1])]

    def max_new_tokens(self, prompt_length: int) -> int:
        if self.config.max_new_tokens is not None:
            limit = self.config.max_new_tokens
        else:
            limit = self.config.max_length - prompt_length
        if limit <= 0:
            raise ValueError(
                f"max_new_tokens must be greater than 0, got {limit} (max_new_tokens={self.config.max_new_tokens}, "
                f"max_length={self.config.max_length}, prompt length {prompt_length})."
            )
        return limit

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.config.eos_token_id
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @property
    def pad_token_id(self) -> int:
        if self.config.pad_token_id is not None:
            return int(self.config.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def _stream_refusal(self, input_ids, assessment, answers):
        streamer = self.kwargs.get("streamer")
        if streamer is None or assessment.actions != ["refuse"]:
            return
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(answers.new_tokens[0][0], dtype=torch.long))
        streamer.end()


class _Answers:
    """Builds the full-batch output of a mixed batch: every row's sequences, and scores and logits for every row, a
    refused row's forced tokens scored at log-prob 0 (so `compute_transition_scores` works on the whole batch)."""

    def __init__(self, plan, input_ids, lm_rows, lm_output):
        self.plan, self.input_ids, self.lm_output = plan, input_ids, lm_output
        self.num_beams = plan.config.num_beams or 1
        self.num_return = plan.config.num_return_sequences or 1
        self.new_tokens = {}  # row -> list of answers (one per returned sequence)
        self.lm_position = {row: i for i, row in enumerate(lm_rows)}
        if lm_output is not None:
            generated = lm_output.sequences[:, plan.lm_prompt_width :]
            for row, i in self.lm_position.items():
                self.new_tokens[row] = [generated[i * self.num_return + k].tolist() for k in range(self.num_return)]

    def add_refusal(self, row, tokens):
        self.new_tokens[row] = [list(tokens)] * self.num_return

    def output(self, assessment):
        rows = sorted(self.new_tokens)
        width = max(len(answer) for row in rows for answer in self.new_tokens[row])
        sequences = self._sequences(rows, width)
        if not self.plan.config.return_dict_in_generate:
            return sequences
        fields = {"sequences": sequences, "safety_assessment": assessment}
        for name in ("scores", "logits"):
            if getattr(self.plan.config, f"output_{name}", False):
                fields[name] = self._step_scores(rows, width, name)
        if self.num_beams > 1:
            fields.update(self._beam_fields(rows, width))
            return SafeLlavaGenerateBeamDecoderOnlyOutput(**fields)
        return SafeLlavaGenerateDecoderOnlyOutput(**fields)

    def _sequences(self, rows, width):
        prompts = self.input_ids.repeat_interleave(self.num_return, dim=0)
        out = prompts.new_full((prompts.shape[0], prompts.shape[1] + width), self.plan.pad_token_id)
        out[:, : prompts.shape[1]] = prompts
        for row in rows:
            for k, answer in enumerate(self.new_tokens[row]):
                out[row * self.num_return + k, prompts.shape[1] : prompts.shape[1] + len(answer)] = torch.tensor(answer)
        return out

    def _step_scores(self, rows, width, name):
        """`width` tensors of `(batch * block, vocab)`: the language model's for its rows while it ran, else forced."""
        lm_steps = getattr(self.lm_output, name, None) if self.lm_output is not None else None
        vocab = lm_steps[0].shape[-1] if lm_steps else self.plan.model.config.get_text_config().vocab_size
        block = self.num_beams if self.num_beams > 1 else self.num_return
        steps = []
        for t in range(width):
            scores = torch.full((len(rows) * block, vocab), -math.inf, device=self.input_ids.device)
            for row in rows:
                target = slice(row * block, (row + 1) * block)
                if row in self.lm_position and lm_steps and t < len(lm_steps):
                    i = self.lm_position[row]
                    scores[target] = lm_steps[t][i * block : (i + 1) * block].to(scores.dtype)
                else:
                    for k in range(block):
                        scores[row * block + k, self._forced_token(row, min(k, self.num_return - 1), t)] = 0.0
            steps.append(scores)
        return tuple(steps)

    def _forced_token(self, row, k, t) -> int:
        answer = self.new_tokens[row][k]
        return answer[t] if t < len(answer) else self.plan.pad_token_id

    def _beam_fields(self, rows, width):
        """`sequences_scores` and `beam_indices` of every row (a refused row's beam is its first one, score 0)."""
        num_sequences = len(rows) * self.num_return
        sequences_scores = torch.zeros(num_sequences, device=self.input_ids.device)
        beam_indices = torch.full((num_sequences, width), -1, dtype=torch.long, device=self.input_ids.device)
        for row in rows:
            for k in range(self.num_return):
                sequence = row * self.num_return + k
                if row in self.lm_position:
                    i = self.lm_position[row]
                    source = i * self.num_return + k
                    sequences_scores[sequence] = self.lm_output.sequences_scores[source]
                    lm_indices = self.lm_output.beam_indices[source]
                    shifted = torch.where(lm_indices >= 0, lm_indices + (row - i) * self.num_beams, lm_indices)
                    beam_indices[sequence, : min(width, shifted.shape[0])] = shifted[:width]
                else:
                    beam_indices[sequence, : len(self.new_tokens[row][k])] = row * self.num_beams
        return {"sequences_scores": sequences_scores, "beam_indices": beam_indices}


def insert_hint(prompt: torch.LongTensor, row: int, texts: dict, assessment) -> torch.LongTensor:
    """
    `prompt` (one row's unpadded token ids, `(prompt_length,)`) with the safe hint of the row's verdict inserted right
    before the assistant-turn marker `texts["assistant_prefix"]`, `(prompt_length + hint_length,)`.
    """
    category, level = assessment.category_names[row], int(assessment.level[row])
    hint = texts["hints"].get(category, [[]] * 4)[level]
    if not hint:
        raise ValueError(
            f"No safe-hint text for ({category!r}, level {level}); set config.safety_hints and call "
            "model.tokenize_safety_texts(processor), or choose another action."
        )
    marker = texts["assistant_prefix"]
    if len(prompt) < len(marker) or prompt[-len(marker) :].tolist() != marker:
        raise ValueError(
            f"Cannot place the safe hint in row {row}: the prompt does not end with the assistant-turn marker "
            f"{marker}. Build prompts with processor.apply_chat_template(..., add_generation_prompt=True)."
        )
    hint = torch.tensor(hint, dtype=prompt.dtype, device=prompt.device)
    return torch.cat([prompt[: -len(marker)], hint, prompt[-len(marker) :]])


def cut_at_stop_strings(tokens: list[int], stop_strings, tokenizer) -> list[int]:
    """`tokens` up to and including the token that completes the first stop string (as stock generation stops)."""
    if not stop_strings:
        return tokens
    if tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=... to generate, as stock generate requires.")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end])
        if any(text.endswith(stop) or stop in text for stop in stop_strings):
            return tokens[:end]
    return tokens




def select_images(image_outputs, images_per_row: list[int], rows: list[int]) -> BaseModelOutputWithPooling:
    """
    The language-model features of the images of `rows`, for the stock `generate` of those rows. `pooler_output` holds
    one entry per image, in row order: a list of tensors or one stacked tensor, as the base's `get_image_features`
    gives them. Vision hidden states are left out: the verdict was given already, and the language model never
    reads them.
    """
    chosen = selected_image_indices(images_per_row, rows)
    features = image_outputs.pooler_output
    if isinstance(features, torch.Tensor):
        selected = features[torch.tensor(chosen, dtype=torch.long, device=features.device)]
    else:
        selected = [features[i] for i in chosen]
    return BaseModelOutputWithPooling(pooler_output=selected)



def selected_image_indices(images_per_row: list[int], rows: list[int]) -> list[int]:
    """The numbers of the images of `rows` (images numbered in row order, `images_per_row` of them per row)."""
    starts = [sum(images_per_row[:row]) for row in range(len(images_per_row))]
    return [starts[row] + i for row in rows for i in range(images_per_row[row])]


__all__ = [
    "SafeLlavaGenerateDecoderOnlyOutput",
    "SafeLlavaGenerateBeamDecoderOnlyOutput",
    "SafetyGenerationModel",
    "SafetyGenerationPlan",
    "generate_with_safety",
    "insert_hint",
    "cut_at_stop_strings",
    "run_governed",
    "select_images",
    "selected_image_indices",
]
