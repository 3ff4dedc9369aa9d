# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Safe Gemma 3: Gemma 3 (`Gemma3ForConditionalGeneration`) plus the safety module of arXiv 2405.13581.

Gemma 3's side of the seam (`safety_model_safe_llava.py`, `docs/bases.md`): its config, processor and model classes.
The safety module, the policy, the generation plan, loading and construction are shared with every base.

This file is remote code: it is copied next to the weights on the Hub and imports only torch, transformers and its
sibling files (flat, relative imports).

Pipeline (google/gemma-3-4b-it shapes):

    pixel_values -> SigLIP -> last_hidden_state (N_img, 64*64, 1152)
      |-> Gemma 3's projector: 4x4 average pool -> 16x16, RMSNorm, projection -> h_i (N_img, 256, 2560)
      |      LLM input at each image: <start_of_image> [safety_module.llm_tokens (64, 2560) ; h_i] <end_of_image>
      |      (320 placeholders of the image kind: `token_type_ids` marks them all, so Gemma 3's bidirectional image
      |      attention covers the safety tokens and the image, and nothing else)
      '-> the same 4x4 average pool -> (N_img, 16, 16, 1152) -> safety_module.projector -> h_s (N_img, 256, 2560)
             safety_module.head: query = embedding of the row's first non-padding token (`<bos>`),
             keys/values = [safety_module.tokens (64, 2560) ; h_s] -> level (N_img, 4), type (N_img, 7)

What the head reads: SigLIP's last hidden state average-pooled exactly as Gemma 3 pools it for the language model
(before its RMSNorm and projection), i.e. the 16x16 grid the answer is based on. At the 4B shape the safety module
then costs 23 GFLOPs per image against 345 GFLOPs on the full 64x64 grid (0.3 % vs 4.5 % of vision tower + prefill;
`benchmarks/gemma3_vision_states.py`, docs/bases.md).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, Gemma3Config, Gemma3Processor
from transformers.cache_utils import Cache
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3CausalLMOutputWithPast,
    Gemma3ForConditionalGeneration,
    Gemma3Model,
    Gemma3ModelOutputWithPast,
    Gemma3MultiModalProjector,
    Gemma3PreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .safety_config_safe_llava import SafetyConfigMixin
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_module_safe_llava import SafeLlavaSafetyModule
from .safety_processing_safe_llava import SafetyProcessorMixin


AUTO_MAP = {
    "AutoConfig": "gemma3_safe_llava.SafeGemma3Config",
    "AutoModel": "gemma3_safe_llava.SafeGemma3ForConditionalGeneration",
    "AutoModelForImageTextToText": "gemma3_safe_llava.SafeGemma3ForConditionalGeneration",
}


class SafeGemma3Config(SafetyConfigMixin, Gemma3Config):
    r"""
    Configuration of a [`SafeGemma3ForConditionalGeneration`]: every field of [`Gemma3Config`] plus the safety fields
    of [`SafetyConfigMixin`].

    `mm_tokens_per_image` keeps its stock meaning (the pooled image tokens the language model reads, a square: Gemma
    3's projector pools to `int(sqrt(mm_tokens_per_image))` squared); the placeholder count per image,
    `image_seq_length`, is `num_llm_safety_tokens` plus that square.
    """

    model_type = "safe_gemma3"
    safety_auto_map = AUTO_MAP

    image_seq_length: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.image_seq_length = self.num_llm_safety_tokens + int(self.mm_tokens_per_image**0.5) ** 2


class SafeGemma3Processor(SafetyProcessorMixin, Gemma3Processor):
    r"""
    [`Gemma3Processor`] for Safe Gemma 3: each image expands to `<start_of_image>`, then `num_llm_safety_tokens` +
    `image_seq_length` image tokens, then `<end_of_image>`. The LLM safety tokens' placeholders are image tokens, so
    `token_type_ids` marks them and Gemma 3's bidirectional image attention covers the whole (safety + image) block.
    Takes images nested per prompt, as stock does, or (like `LlavaProcessor`) as a flat list in prompt order.
    Tokenizes with left padding by default, as batched generation needs.

    Args:
        num_llm_safety_tokens (`int`, *optional*, defaults to 0): Must equal the model's `config.num_llm_safety_tokens`.
        (the other arguments are [`Gemma3Processor`]'s.)
    """

    stock_class = Gemma3Processor
    stock_settings = ("image_seq_length",)

    def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length=256, num_llm_safety_tokens=0, **kwargs):
        super().__init__(
            image_processor,
            tokenizer,
            chat_template=chat_template,
            image_seq_length=image_seq_length,
            num_llm_safety_tokens=num_llm_safety_tokens,
            **kwargs,
        )
        image_tokens = tokenizer.image_token * (num_llm_safety_tokens + image_seq_length)
        self.full_image_sequence = f"\n\n{tokenizer.boi_token}{image_tokens}{tokenizer.eoi_token}\n\n"

    def __call__(self, images=None, text=None, **kwargs):
        return super().__call__(images=self._nested_per_prompt(images, text), text=text, **kwargs)

    def _nested_per_prompt(self, images, text):
        """A flat list of images for several prompts, split per prompt by its `<start_of_image>` count (what
        `LlavaProcessor` accepts; stock `Gemma3Processor` wants them nested per prompt). Anything else unchanged."""
        if not isinstance(text, (list, tuple)) or len(text) < 2 or not isinstance(images, (list, tuple)):
            return images
        if any(isinstance(image, (list, tuple)) for image in images):
            return images
        counts = [prompt.count(self.boi_token) if isinstance(prompt, str) else 0 for prompt in text]
        if sum(counts) != len(images):
            return images  # stock's own check names the mismatch
        starts = [sum(counts[:row]) for row in range(len(counts))]
        return [list(images[start : start + count]) for start, count in zip(starts, counts)]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [n + self.num_llm_safety_tokens for n in data["num_image_tokens"]]
        return data


@dataclass
class SafeGemma3ModelOutputWithPast(Gemma3ModelOutputWithPast):
    r"""
    [`Gemma3ModelOutputWithPast`] plus the safety head's verdict, computed when the call encodes `pixel_values`.

    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    images_per_row (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Images found in each row.
    """

    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeGemma3CausalLMOutputWithPast(Gemma3CausalLMOutputWithPast):
    r"""
    [`Gemma3CausalLMOutputWithPast`] plus the safety fields (after stock's, also in the `return_dict=False` tuple).

    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): Next-token cross-entropy, when `labels` is given.
    safety_loss (`torch.FloatTensor` of shape `()`, *optional*): `CE(level) + CE(type)`, when `safety_labels` is given.
    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    """

    lm_loss: torch.FloatTensor | None = None
    safety_loss: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None


class SafeGemma3PreTrainedModel(SafetyPreTrainedMixin, Gemma3PreTrainedModel):
    config: SafeGemma3Config
    config_class = SafeGemma3Config
    _no_split_modules = [*Gemma3PreTrainedModel._no_split_modules, "SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]


class SafeGemma3Model(SafetyModelMixin, Gemma3Model, SafeGemma3PreTrainedModel):
    """Gemma 3 without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of
    each image's projected features by `get_image_features`, so stock Gemma 3's merge and masks handle them."""

    config: SafeGemma3Config
    config_class = SafeGemma3Config
    stock_class = Gemma3Model
    safety_output_class = SafeGemma3ModelOutputWithPast
    safety_image_kwargs = ()
    safety_passes_output_flags = False  # stock Gemma 3 encodes images without the caller's output flags

    def __init__(self, config: SafeGemma3Config):
        # Gemma3Model's modules, then the safety module, then one post_init().
        Gemma3PreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.safety_module = SafeLlavaSafetyModule(config)
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values, **kwargs):
        """Gemma 3's image features with the LLM safety tokens first: `pooler_output` is
        `(num_images, num_llm_safety_tokens + mm_tokens_per_image, text_hidden)`; `last_hidden_state` (SigLIP's) is
        what the safety head reads."""
        image_outputs = super().get_image_features(pixel_values, **{**kwargs, "return_dict": True})
        image_outputs.pooler_output = self.add_llm_safety_tokens(image_outputs.pooler_output)
        return image_outputs

    def encode_images_for_safety(self, pixel_values, **image_kwargs):
        """SigLIP alone: the head reads its last hidden state, Gemma 3's projection is not needed for a verdict."""
        return self.vision_tower(pixel_values=pixel_values, return_dict=True)

    def safety_vision_states(self, image_outputs) -> torch.Tensor:
        """SigLIP's last hidden state average-pooled as Gemma 3 pools it for the language model (before its norm and
        projection): `(num_images, 16, 16, 1152)` for gemma-3-4b."""
        states = getattr(image_outputs, "last_hidden_state", None)
        if states is None:
            raise ValueError(
                "These pre-encoded images carry no vision last_hidden_state, so the safety head cannot judge them. "
                "Pass pixel_values, encode with model.get_image_features, or set safety_threshold=1.0 to turn safety off."
            )
        projector = self.multi_modal_projector
        num_images, _, channels = states.shape
        grid = states.transpose(1, 2).reshape(num_images, channels, projector.patches_per_image, -1)
        return projector.avg_pool(grid).permute(0, 2, 3, 1)

    def prompt_inputs(self, input_ids, attention_mask) -> dict:
        """`token_type_ids` of prompts the generation plan rebuilds: 1 at every image placeholder (the LLM safety
        tokens' included), as `SafeGemma3Processor` marks them."""
        return {"token_type_ids": (input_ids == self.config.image_token_id).long()}

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeGemma3ModelOutputWithPast:
        r"""
        Stock `Gemma3Model.forward` restated (docs/bases.md, "What a `forward` names"), plus the safety logits
        ([`SafetyModelMixin.forward`], `output_safety`). Images the generation plan selected per row arrive as a list
        of per-image tensors; stock Gemma 3 takes one `(num_images, tokens, hidden)` tensor.
        """
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is not None and isinstance(image_outputs.pooler_output, (list, tuple)):
            image_outputs.pooler_output = torch.stack(list(image_outputs.pooler_output))
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=output_safety, token_type_ids=token_type_ids, labels=labels, use_cache=use_cache, **kwargs,
        )  # fmt: skip


class SafeGemma3ForConditionalGeneration(
    SafetyForConditionalGenerationMixin, Gemma3ForConditionalGeneration, SafeGemma3PreTrainedModel
):
    """
    Gemma 3 with the safety module. `forward` is stock Gemma 3's plus the safety logits; `generate` is stock's with the
    verdict in front; `assess_safety` is the verdict alone (see [`SafetyForConditionalGenerationMixin`]).

    Example:

    ```python
    >>> processor = SafeGemma3Processor.from_base("google/gemma-3-4b-it", num_llm_safety_tokens=64)
    >>> model = SafeGemma3ForConditionalGeneration.from_base("google/gemma-3-4b-it", processor=processor)
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
    ...                                        return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety module
    ```
    """

    config: SafeGemma3Config
    config_class = SafeGemma3Config
    stock_class = Gemma3ForConditionalGeneration
    safety_output_class = SafeGemma3CausalLMOutputWithPast

    def __init__(self, config: SafeGemma3Config):
        # Skip Gemma3ForConditionalGeneration.__init__ (it would build a stock Gemma3Model), keep PreTrainedModel's.
        super(Gemma3ForConditionalGeneration, self).__init__(config)
        self.model = SafeGemma3Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        safety_labels: torch.LongTensor | None = None,
        output_safety: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeGemma3CausalLMOutputWithPast:
        r"""
        Stock `Gemma3ForConditionalGeneration.forward` restated (docs/bases.md, "What a `forward` names"), plus the
        safety logits and loss ([`SafetyForConditionalGenerationMixin.causal_lm_output`]). `cache` is
        transformers 5.24+'s name of `past_key_values`.

        token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 at image placeholders (the LLM safety tokens' included): bidirectional attention within each image.
        """
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids,
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, labels=labels, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=True if safety_labels is not None else output_safety, return_dict=True,
            **({} if cache is None else {"cache": cache}), **kwargs,
        )  # fmt: skip
        return self.causal_lm_output(outputs, labels, safety_labels, logits_to_keep, **kwargs)


__all__ = [
    "SafeGemma3Config",
    "SafeGemma3Processor",
    "SafeGemma3PreTrainedModel",
    "SafeGemma3Model",
    "SafeGemma3ForConditionalGeneration",
    "SafeGemma3CausalLMOutputWithPast",
    "SafeGemma3ModelOutputWithPast",
]
