"""The verdict model in serving: a SafeLlava's safety verdict, without its language model, for batches of requests.

`SafetyVerdictModel.from_pretrained(folder)` reads the checkpoint's config and processor, finds the embedding rows a
verdict reads (`query_token_ids`), and loads the *verdict model* through the model class
(`SafetyPreTrainedMixin.from_verdict_checkpoint`, any base: the `model_type` picks the class in `bases.py`), which holds
real weights only for the parts a verdict reads (`safety_loading_safe_llava.verdict_parts`):

- the vision tower (the safety head reads its hidden states: LLaVA-1.5's and LLaVA-NeXT's CLIP layer, every anyres
  crop for LLaVA-NeXT; SigLIP's last state for Gemma 3, average-pooled as Gemma 3 pools it, which needs no weights);
- the safety module (projector, head safety tokens, head);
- of the language model's input embedding table, only the rows the verdict reads (the head's query is the embedding of
  each row's first real token; the base's own embedding class, e.g. Gemma 3's scaled one): `query_token_ids` finds
  the tokens the processor puts first in any prompt of its chat template (BOS for every registered base), plus the
  image placeholder. Gemma 3 4B's table is 262k rows (1.25 GiB in bf16); its gate keeps 2. A prompt that starts with
  another token (a chat template whose first token depends on the text) fails loudly; a template like that keeps the
  whole table.

Those tensors alone are read from the safetensors files (`fileio.SafetensorsCheckpoint`: a Hub id downloads only the
shards that hold them). The language model's layers, its head and the multi-modal projector stay on `meta`: they hold
no memory, and calling them fails loudly. What this module adds is the serving part: prompts, one batched
`assess_safety` call with each row's own rule, and per-row errors. `verdict_memory_bytes` measures the weights held;
see README "Serving" for the 7B-class numbers of each base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..bases import base_for_model_type, load_safe_processor
from ..fileio import SafetensorsCheckpoint
from ..pipeline_safe_llava import NOT_JUDGED_NO_IMAGE, NOT_JUDGED_SAFETY_OFF
from ..safety_loading_safe_llava import verdict_parts
from ..safety_model_safe_llava import check_safety_ready


@dataclass
class VerdictRow:
    """One conversation to assess: processor-format `messages`, its PIL `images`, and `generate`'s safety arguments."""

    messages: list[dict]
    images: list = field(default_factory=list)
    safety_threshold: float | dict | None = None
    safety_actions: dict | None = None


@dataclass
class VerdictResult:
    """A row's `safety` entry (`pipeline_safe_llava.safety_entries` format), its prompt length in tokens, and the
    `ValueError` that made the row fail (then `safety` is None). One row's error never fails the others."""

    safety: dict | None
    prompt_tokens: int = 0
    error: ValueError | None = None


class SafetyVerdictModel:
    """
    The verdict of a SafeLlava without its language model, for rows of requests.

    Args:
        model: a SafeLlava of any base (`bases.BASES`) whose vision tower, safety module and input embeddings hold
            weights (the rest may sit on `meta`): the verdict model (`from_verdict_checkpoint`) or a full one.
        processor: its processor (chat template, tokenizer, image processor).
        allow_untrained_safety (`bool`): assess with untrained safety modules (tests only; fails closed otherwise).
    """

    def __init__(self, model, processor, allow_untrained_safety: bool = False):
        check_safety_ready(model.config, allow_untrained_safety)
        self.model, self.processor = model.eval(), processor
        self.policy = model.safety_policy  # built and validated once; each request resolves its own call rule
        self.allow_untrained_safety = allow_untrained_safety
        self.config = model.config

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, revision=None, allow_untrained_safety=False):
        """The verdict model of a SafeLlava folder or Hub id: see the module docstring. `dtype`: a torch dtype, one of
        `"float32"`, `"bfloat16"`, `"float16"`, or `"auto"`/None (the checkpoint's)."""
        config = load_safe_config(path, revision=revision)
        processor = load_safe_processor(path, config.model_type, revision=revision)
        model = base_for_model_type(config.model_type).model_class.from_verdict_checkpoint(
            SafetensorsCheckpoint(path, revision=revision), config, device=device, dtype=dtype,
            embedding_rows=query_token_ids(processor, config),
        )  # fmt: skip
        return cls(model, processor, allow_untrained_safety=allow_untrained_safety)

    @property
    def device(self) -> torch.device:
        return self.model.model.vision_tower.device

    def prompt(self, messages: list[dict]) -> str:
        """The chat template's prompt, as `generate`'s callers build it (`add_generation_prompt=True`)."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        return len(self.processor.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @torch.no_grad()
    def assess(self, rows: list[VerdictRow]) -> list[VerdictResult]:
        """One `VerdictResult` per row. The rows that need a verdict share one `assess_safety` call (one vision-tower
        and safety-head pass), each under its own threshold and actions (the model's rule, one per row)."""
        results, todo = [], []
        for index, row in enumerate(rows):
            result, needs_verdict = self._prepare(row)
            results.append(result)
            if needs_verdict:
                todo.append(index)
        if todo:
            self._assess_batch([rows[i] for i in todo], results, todo)
        return results

    def _prepare(self, row: VerdictRow) -> tuple[VerdictResult, bool]:
        """The row's prompt length, and whether it needs a verdict (its rule is checked here, so that a bad rule fails
        its row alone)."""
        try:
            prompt_tokens = self.count_tokens(self.prompt(row.messages), add_special_tokens=True)
            prompt_tokens += len(row.images) * (self.config.image_seq_length - 1)  # exact once assessed (`_assess`)
            rule = self.policy.for_call(row.safety_threshold, row.safety_actions, self.model.generation_config)
        except ValueError as error:
            return VerdictResult(None, error=error), False
        if not row.images:
            return VerdictResult({"judged": False, "reason": NOT_JUDGED_NO_IMAGE}, prompt_tokens), False
        if rule.safety_off:
            return VerdictResult({"judged": False, "reason": NOT_JUDGED_SAFETY_OFF}, prompt_tokens), False
        return VerdictResult(None, prompt_tokens), True

    def _assess_batch(self, rows: list[VerdictRow], results: list[VerdictResult], indices: list[int]):
        try:
            assessment, lengths = self._assess(rows)
        except ValueError as error:  # a bad image or prompt: assess the rows one by one, so that only it fails
            if len(rows) == 1:
                results[indices[0]] = VerdictResult(None, results[indices[0]].prompt_tokens, error)
                return
            for row, index in zip(rows, indices):
                self._assess_batch([row], results, [index])
            return
        for k, (record, index) in enumerate(zip(assessment.to_records(), indices)):
            results[index].safety = {"judged": True, **record}
            results[index].prompt_tokens = int(lengths[k])

    def _assess(self, rows: list[VerdictRow]):
        """`model.assess_safety` on one left-padded batch, each row under its own rule, and each row's prompt length
        in tokens (images expanded, as the language model would read it)."""
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        prompts = [self.prompt(row.messages) for row in rows]
        images = [image for row in rows for image in row.images]
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.model.vision_tower.dtype)  # the base's image
        # fields (LLaVA-NeXT's `image_sizes`, Gemma 3's `token_type_ids`, ...) go along: each base takes what it reads
        assessment = self.model.assess_safety(
            **inputs,
            safety_threshold=[row.safety_threshold for row in rows],
            safety_actions=[row.safety_actions for row in rows],
            allow_untrained_safety=self.allow_untrained_safety,
        )
        return assessment, inputs["attention_mask"].sum(dim=1).tolist()


def load_safe_config(path: str, revision=None):
    """The config of a SafeLlava folder or Hub id of any base; a `ValueError` naming the accepted model types
    otherwise."""
    from transformers import PretrainedConfig

    model_type = PretrainedConfig.get_config_dict(path, revision=revision)[0].get("model_type")
    return base_for_model_type(model_type).config_class.from_pretrained(path, revision=revision)


def query_token_ids(processor, config) -> list[int] | None:
    """The token ids whose input embeddings a verdict reads: the first real token of every prompt the processor builds
    from its chat template (probed with user and system texts that differ), and the image placeholder. None when the
    first token depends on the text (then the verdict model keeps the whole table)."""
    from PIL import Image

    image = Image.new("RGB", (32, 32), (127, 127, 127))
    probes = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}] for text in ("a", "Why?")
    ] + [
        [{"role": "system", "content": [{"type": "text", "text": text}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "b"}]}]  # fmt: skip
        for text in ("x", "You are helpful.")
    ]
    firsts = set()
    for messages in probes:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        firsts.add(int(inputs["input_ids"][0, int(inputs["attention_mask"][0].argmax())]))
    if len(firsts) != 1:
        return None
    return sorted(firsts | {int(config.image_token_id)})


def verdict_memory_bytes(model) -> dict[str, int]:
    """Bytes held by the verdict model's parts (parameters and buffers not on `meta`), and by the parts left on
    `meta`."""
    held = {"vision_tower": 0, "safety_module": 0, "embed_tokens": 0, "other": 0}
    parts = verdict_parts(model)
    on_meta = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type == "meta":
            on_meta += size
            continue
        part = next((p for p, prefix in parts.items() if name.startswith(prefix)), "other")
        held[part] += size
    return {**held, "total": sum(held.values()), "not_loaded": on_meta}
