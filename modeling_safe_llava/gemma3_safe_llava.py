# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Safe Gemma 3: Gemma 3 (`Gemma3ForConditionalGeneration`) plus the safety module of arXiv 2405.13581.

This file is remote code: it imports only torch, transformers and its sibling files. It holds the one base's config,
processor and model classes; the safety module, the policy and the generation plan are shared with every base.

Pipeline (google/gemma-3-4b-it shapes):

    pixel_values -> SigLIP -> last_hidden_state (N_img, 64*64, 1152)
      |-> Gemma 3 projector: avg-pool 4x4 -> 16x16, RMSNorm, projection -> h_i (N_img, 256, 2560)
      |      LLM input at each image: <start_of_image> [safety_module.llm_tokens (64, 2560) ; h_i] <end_of_image>
      |      (320 placeholders of the image kind: `token_type_ids` mark them, so all 320 attend to each other)
      '-> the same avg-pool 4x4 -> (N_img, 16*16, 1152) -> safety_module.projector -> h_s (N_img, 256, 2560)
             safety_module.head: query = embedding of the row's first non-padding token (BOS),
             keys/values = [safety_module.tokens (64, 2560) ; h_s] -> level (N_img, 4), type (N_img, 7)

What the head reads: SigLIP's last hidden state pooled exactly as Gemma 3 pools it for the language model (before its
norm and projection), i.e. the 16x16 grid the answer is based on. At the 4B shape the safety module then costs
23 GFLOPs per image against 345 for the full 64x64 grid (0.3 % vs 4.5 % of vision tower + prefill; see
`benchmarks/gemma3_vision_states.py` and docs/bases.md).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoProcessor, Gemma3Config, Gemma3Processor
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerationConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3CausalLMOutputWithPast,
    Gemma3ForConditionalGeneration,
    Gemma3Model,
    Gemma3ModelOutputWithPast,
    Gemma3MultiModalProjector,
    Gemma3PreTrainedModel,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_safe_llava import SafeLlavaConfig
from .modeling_safe_llava import (
    VERDICT_PATH_PREFIXES,
    SafeLlavaForConditionalGeneration,
    SafeLlavaModel,
    _check_direct_call,
    _check_only_safety_weights_missing,
    _keep_logits,
    _safetensors_only,
    _total_loss,
)
from .policy_safe_llava import SafetyPolicy, generate_with_safety, generation_config_with_threshold
from .processing_safe_llava import SafeLlavaProcessor, _prepare_images, _refuse_rescaled_floats
from .safety_module_safe_llava import (
    SAFETY_PARAMETER_PREFIXES,
    SAFETY_PROJECTOR_CLASSES,
    SafeLlavaSafetyHead,
    SafeLlavaSafetyModule,
    check_images_match,
    check_input_ids,
    check_model_inputs,
)


logger = logging.get_logger(__name__)

AUTO_MAP = {
    "AutoConfig": "gemma3_safe_llava.SafeGemma3Config",
    "AutoModel": "gemma3_safe_llava.SafeGemma3ForConditionalGeneration",
    "AutoModelForImageTextToText": "gemma3_safe_llava.SafeGemma3ForConditionalGeneration",
}
_BASE_ONLY_FIELDS = ("last_hidden_state", "safety_level_logits", "safety_type_logits", "images_per_row")
_LOAD_KWARGS = ("dtype", "device_map", "revision", "cache_dir", "local_files_only", "token", "attn_implementation")

register_checkpoint_conversion_mapping(
    "SafeGemma3ForConditionalGeneration", get_checkpoint_conversion_mapping("gemma3"), overwrite=True
)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class SafeGemma3Config(Gemma3Config):
    r"""
    Configuration of a [`SafeGemma3ForConditionalGeneration`]: every field of [`Gemma3Config`] plus the safety fields
    of [`SafeLlavaConfig`] (same names, same meaning). `image_seq_length` (derived) is the placeholder count per image:
    `num_llm_safety_tokens + mm_tokens_per_image`.
    """

    model_type = "safe_gemma3"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "image_hidden_states", "image_outputs"]

    num_safety_tokens: int = 64
    num_llm_safety_tokens: int = 64
    safety_projector_type: str = "cabstractor"
    safety_projector_hidden_size: int | None = None
    safety_projector_depth: int = 3
    safety_head_num_heads: int = 8
    safety_level_labels: list[str] | None = None
    safety_type_labels: list[str] | None = None
    safety_loss_weight: float = 10.0
    safety_threshold: float = 0.5
    safety_thresholds: dict | None = None
    safety_actions: dict | None = None
    safety_hints: dict | None = None
    safety_refusals: dict | None = None
    safety_text_token_ids: dict | None = None
    safety_level_temperature: float = 1.0
    safety_type_temperature: float = 1.0
    safety_modules_trained: bool = False
    image_seq_length: int | None = None

    def __post_init__(self, **kwargs):
        if self.safety_level_labels is None:
            self.safety_level_labels = list(SafeLlavaConfig().safety_level_labels)
        if self.safety_type_labels is None:
            self.safety_type_labels = list(SafeLlavaConfig().safety_type_labels)
        super().__post_init__(**kwargs)
        self._validate_safety_fields()
        for name, value in SafetyPolicy.from_config(self).config_fields().items():
            setattr(self, name, value)
        if self.safety_projector_hidden_size is None:
            self.safety_projector_hidden_size = self.vision_config.hidden_size + self.num_safety_tokens
        self.image_seq_length = self.mm_tokens_per_image + self.num_llm_safety_tokens
        self.auto_map = dict(AUTO_MAP)

    _validate_safety_fields = SafeLlavaConfig._validate_safety_fields
    risky_type_labels = SafeLlavaConfig.risky_type_labels
    clean_type_label = SafeLlavaConfig.clean_type_label

    @classmethod
    def from_base_config(cls, gemma3_config, **safety_fields) -> "SafeGemma3Config":
        """Every field of a stock `Gemma3Config` and the given safety fields."""
        fields = gemma3_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "image_seq_length"):
            fields.pop(key, None)
        return cls(**fields, **safety_fields)


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class SafeGemma3Processor(Gemma3Processor):
    r"""
    [`Gemma3Processor`] for Safe Gemma 3: each image expands to `<start_of_image>`, then `num_llm_safety_tokens` +
    `image_seq_length` image tokens, then `<end_of_image>`. The LLM safety tokens' placeholders are image tokens, so
    `token_type_ids` marks them and Gemma 3's bidirectional image attention covers the whole (safety + image) block.
    Tokenizes with left padding by default, as batched generation needs.

    Args:
        num_llm_safety_tokens (`int`, *optional*, defaults to 0): Must equal the model's `config.num_llm_safety_tokens`.
        (the other arguments are [`Gemma3Processor`]'s.)
    """

    def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length=256, num_llm_safety_tokens=0, **kwargs):
        if isinstance(num_llm_safety_tokens, bool) or not isinstance(num_llm_safety_tokens, int) or num_llm_safety_tokens < 0:
            raise ValueError(f"num_llm_safety_tokens must be an integer >= 0, got {num_llm_safety_tokens!r}.")
        self.num_llm_safety_tokens = num_llm_safety_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_seq_length=image_seq_length, **kwargs)
        image_tokens = tokenizer.image_token * (num_llm_safety_tokens + image_seq_length)
        self.full_image_sequence = f"\n\n{tokenizer.boi_token}{image_tokens}{tokenizer.eoi_token}\n\n"

    @classmethod
    def from_base(cls, processor_or_path, num_llm_safety_tokens: int, chat_template: str | None = None, **kwargs):
        """A Safe Gemma 3 processor from a stock [`Gemma3Processor`] (instance, folder or Hub id), keeping its
        tokenizer, image processor, image sequence length and chat template; sets left padding for generation."""
        if isinstance(processor_or_path, Gemma3Processor):
            stock = processor_or_path
        else:
            stock = AutoProcessor.from_pretrained(processor_or_path, **kwargs)
        stock.tokenizer.padding_side = "left"
        return cls(
            image_processor=stock.image_processor,
            tokenizer=stock.tokenizer,
            chat_template=chat_template or stock.chat_template,
            image_seq_length=stock.image_seq_length,
            num_llm_safety_tokens=num_llm_safety_tokens,
        )

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is None:
            raise ValueError(
                "SafeGemma3Processor needs text with a <start_of_image> placeholder for each image (the safety head "
                "reads the prompt's first token), e.g. processor.apply_chat_template(...)."
            )
        if images is not None:
            images = _prepare_images(self._nested_per_prompt(images, text), counter=[0])
            if kwargs.get("do_rescale", getattr(self.image_processor, "do_rescale", False)) is not False:
                _refuse_rescaled_floats(images, counter=[0])
        return super().__call__(images=images, text=text, **kwargs)

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

    assistant_prefix_ids = SafeLlavaProcessor.assistant_prefix_ids
    encode_safety_texts = SafeLlavaProcessor.encode_safety_texts


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class SafeGemma3SafetyModule(SafeLlavaSafetyModule):
    """The shared safety module, reading the pooled SigLIP grid (`(num_images, side * side, vision_dim)`)."""

    def __init__(self, config: SafeGemma3Config):
        nn.Module.__init__(self)
        hidden = config.text_config.hidden_size
        self.projector = SAFETY_PROJECTOR_CLASSES[config.safety_projector_type](config, config.vision_config.hidden_size)
        if hasattr(self.projector, "pool"):  # the C-Abstractor keeps the grid it reads: the pooled one
            side = int(config.mm_tokens_per_image**0.5)
            self.projector.grid_size, self.projector.pool = side, nn.AdaptiveAvgPool2d((side, side))
        self.tokens = nn.Parameter(torch.zeros(config.num_safety_tokens, hidden))
        if config.num_llm_safety_tokens > 0:
            self.llm_tokens = nn.Parameter(torch.zeros(config.num_llm_safety_tokens, hidden))
        else:
            self.register_parameter("llm_tokens", None)
        self.head = SafeLlavaSafetyHead(config)

    def select_vision_features(self, vision_states) -> torch.Tensor:
        return vision_states


class SafeGemma3PreTrainedModel(Gemma3PreTrainedModel):
    config: SafeGemma3Config
    config_class = SafeGemma3Config
    _no_split_modules = [*Gemma3PreTrainedModel._no_split_modules, "SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialised like transformers' own models (see `SafeLlavaPreTrainedModel.is_custom_code`)."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SafeLlavaSafetyModule):
            init.normal_(module.tokens, mean=0.0, std=0.02)
            if module.llm_tokens is not None:
                init.normal_(module.llm_tokens, mean=0.0, std=0.02)


class SafeGemma3Model(Gemma3Model, SafeGemma3PreTrainedModel):
    """Gemma 3 without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of
    each image's projected features by `get_image_features`, so stock Gemma 3's merge and masks handle them."""

    config: SafeGemma3Config
    config_class = SafeGemma3Config

    def __init__(self, config: SafeGemma3Config):
        Gemma3PreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.safety_module = SafeGemma3SafetyModule(config)
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values, **kwargs):
        """Gemma 3's image features with the LLM safety tokens first: `pooler_output` is
        `(num_images, num_llm_safety_tokens + mm_tokens_per_image, text_hidden)`; `last_hidden_state` (SigLIP's) is
        what the safety head reads."""
        image_outputs = super().get_image_features(pixel_values, **{**kwargs, "return_dict": True})
        llm_tokens = self.safety_module.llm_tokens
        if llm_tokens is not None:
            features = image_outputs.pooler_output
            llm_tokens = llm_tokens.to(features.dtype).unsqueeze(0).expand(features.shape[0], -1, -1)
            image_outputs.pooler_output = torch.cat([llm_tokens, features], dim=1)
        return image_outputs

    def safety_vision_states(self, image_outputs) -> torch.Tensor:
        """SigLIP's last hidden state pooled as Gemma 3 pools it for the language model (before its norm and
        projection): `(num_images, mm_tokens_per_image, vision_dim)`, a square grid in row-major order."""
        states = getattr(image_outputs, "last_hidden_state", None)
        if states is None:
            raise ValueError(
                "These pre-encoded images carry no vision last_hidden_state, so the safety head cannot judge them. "
                "Pass pixel_values, encode with model.get_image_features, or set safety_threshold=1.0."
            )
        projector = self.multi_modal_projector
        num_images, _, channels = states.shape
        grid = states.transpose(1, 2).reshape(num_images, channels, projector.patches_per_image, -1)
        return projector.avg_pool(grid).flatten(2).transpose(1, 2)

    images_per_row = SafeLlavaModel.images_per_row
    first_token_embeddings = SafeLlavaModel.first_token_embeddings

    def judge(self, image_outputs, input_ids, inputs_embeds, attention_mask):
        """The safety module on already-encoded images: `(level_logits, type_logits, images_per_row)`, one row each."""
        vision_states = self.safety_vision_states(image_outputs)
        images_per_row = self.images_per_row(input_ids, inputs_embeds, vision_states.shape[0])
        query = self.first_token_embeddings(input_ids, inputs_embeds, attention_mask)
        level_logits, type_logits = self.safety_module(vision_states, query, images_per_row)
        return level_logits, type_logits, images_per_row

    @can_return_tuple
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None,
                mm_encoder_outputs=None, output_safety=None, **kwargs):
        r"""
        Stock Gemma 3's forward, plus the safety logits when `output_safety` (default: when this call encodes
        `pixel_values`). Images pre-encoded as a list of per-image tensors (what the generation plan selects per row)
        are stacked, as stock Gemma 3 takes one tensor.
        """
        if pixel_values is not None and mm_encoder_outputs is None:
            mm_encoder_outputs, pixel_values = {"image": self.get_image_features(pixel_values, return_dict=True)}, None
            output_safety = True if output_safety is None else output_safety
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is not None and isinstance(image_outputs.pooler_output, (list, tuple)):
            image_outputs.pooler_output = torch.stack(list(image_outputs.pooler_output))
        outputs = super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs, **{**kwargs, "return_dict": True},
        )
        safety = {}
        if output_safety and image_outputs is not None:
            level, kind, images_per_row = self.judge(image_outputs, input_ids, inputs_embeds, attention_mask)
            safety = {"safety_level_logits": level, "safety_type_logits": kind, "images_per_row": images_per_row}
        return SafeGemma3ModelOutputWithPast(**outputs, **safety)


@dataclass
class SafeGemma3ModelOutputWithPast(Gemma3ModelOutputWithPast):
    r"""[`Gemma3ModelOutputWithPast`] plus the safety head's verdict (see `SafeLlavaModelOutputWithPast`)."""

    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeGemma3CausalLMOutputWithPast(Gemma3CausalLMOutputWithPast):
    r"""[`Gemma3CausalLMOutputWithPast`] plus the safety fields (see `SafeLlavaCausalLMOutputWithPast`)."""

    lm_loss: torch.FloatTensor | None = None
    safety_loss: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None


class SafeGemma3ForConditionalGeneration(Gemma3ForConditionalGeneration, SafeGemma3PreTrainedModel):
    """
    Gemma 3 with the safety module. `forward` is stock Gemma 3's plus the safety logits; `generate` is stock's with the
    verdict in front (see `policy_safe_llava.generate_with_safety`).

    Example:

    ```python
    >>> processor = SafeGemma3Processor.from_base("google/gemma-3-4b-it", num_llm_safety_tokens=64)
    >>> model = SafeGemma3ForConditionalGeneration.from_base("google/gemma-3-4b-it", processor=processor)
    ```
    """

    config: SafeGemma3Config
    config_class = SafeGemma3Config
    accepts_loss_kwargs = False

    def __init__(self, config: SafeGemma3Config):
        super(Gemma3ForConditionalGeneration, self).__init__(config)
        self.model = SafeGemma3Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, model_or_path, processor=None, **config_overrides):
        """
        A Safe Gemma 3 from a stock `Gemma3ForConditionalGeneration` (instance, folder or Hub id): every stock weight
        kept bit for bit, the safety module freshly initialised (and marked untrained), the paper's policy unless
        overridden, its texts tokenized with `processor` when one is given.
        """
        load_kwargs = {k: config_overrides.pop(k) for k in _LOAD_KWARGS if k in config_overrides}
        if isinstance(model_or_path, Gemma3ForConditionalGeneration):
            stock = model_or_path
            model = cls(SafeGemma3Config.from_base_config(stock.config, **config_overrides))
            model = model.to(dtype=stock.dtype, device=stock.device)
            missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
            _check_only_safety_weights_missing(missing, unexpected)
            model.generation_config = GenerationConfig.from_dict(stock.generation_config.to_dict())
        else:
            model = cls._from_base_checkpoint(model_or_path, config_overrides, load_kwargs)
        model.generation_config = generation_config_with_threshold(model.generation_config, model.config.safety_threshold)
        if processor is not None:
            model.tokenize_safety_texts(processor)
        return model

    @classmethod
    def _from_base_checkpoint(cls, path, config_overrides, load_kwargs):
        from transformers import AutoConfig

        hub_kwargs = {k: v for k, v in load_kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
        stock_config = AutoConfig.from_pretrained(path, **hub_kwargs)
        if not isinstance(stock_config, Gemma3Config) or isinstance(stock_config, SafeGemma3Config):
            raise ValueError(f"from_base expects a stock Gemma 3 checkpoint, {path!r} has model_type {stock_config.model_type!r}.")
        config = SafeGemma3Config.from_base_config(stock_config, **config_overrides)
        model, info = super().from_pretrained(path, config=config, output_loading_info=True, **_safetensors_only(load_kwargs))
        _check_only_safety_weights_missing(info["missing_keys"], info["unexpected_keys"])
        model.config.safety_modules_trained = False
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` from safetensors only; a checkpoint lacking any weight the verdict
        depends on loads marked untrained, with a warning naming them."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **_safetensors_only(kwargs)
        )
        missing = sorted(k for k in info["missing_keys"] if k.startswith(VERDICT_PATH_PREFIXES))
        if missing and model.config.safety_modules_trained:
            logger.warning("The checkpoint lacks weights the safety verdict depends on: %s; marked untrained.", missing)
        if missing:
            model.config.safety_modules_trained = False
        return (model, info) if want_info else model

    _load_pretrained_model = SafeLlavaForConditionalGeneration._load_pretrained_model

    # -- the policy beside the model, the verdict (shared with every base) -----------------------------------

    safety_policy = SafeLlavaForConditionalGeneration.safety_policy
    tokenize_safety_texts = SafeLlavaForConditionalGeneration.tokenize_safety_texts
    resolve_safety_threshold = SafeLlavaForConditionalGeneration.resolve_safety_threshold
    resolve_safety_actions = SafeLlavaForConditionalGeneration.resolve_safety_actions
    check_safety_ready = SafeLlavaForConditionalGeneration.check_safety_ready
    check_model_inputs = SafeLlavaForConditionalGeneration.check_model_inputs
    check_input_ids = SafeLlavaForConditionalGeneration.check_input_ids
    assess_safety = SafeLlavaForConditionalGeneration.assess_safety
    safety_forward = SafeLlavaForConditionalGeneration.safety_forward
    safety_loss = SafeLlavaForConditionalGeneration.safety_loss
    _losses = SafeLlavaForConditionalGeneration._losses

    def judge_encoded_images(self, image_outputs, input_ids=None, inputs_embeds=None, attention_mask=None):
        """`(level_logits, type_logits, images_per_row)` of already-encoded images (`get_image_features` output)."""
        if input_ids is not None:
            check_input_ids(self.config, input_ids)
        level_logits, type_logits, images_per_row = self.model.judge(image_outputs, input_ids, inputs_embeds, attention_mask)
        check_images_match(images_per_row, len(image_outputs.pooler_output), self.config)
        return level_logits, type_logits, images_per_row

    def _judge_pixels(self, input_ids, pixel_values, attention_mask):
        """The vision tower only (Gemma 3's projection is not needed for a verdict), then the safety module."""
        check_model_inputs(self, input_ids, pixel_values, attention_mask)
        vision_outputs = self.model.vision_tower(pixel_values=pixel_values, return_dict=True)
        images_per_row = self.model.images_per_row(input_ids, None, pixel_values.shape[0])
        check_images_match(images_per_row, pixel_values.shape[0], self.config)
        query = self.model.first_token_embeddings(input_ids, None, attention_mask)
        vision_states = self.model.safety_vision_states(vision_outputs)
        level_logits, type_logits = self.model.safety_module(vision_states, query, images_per_row)
        return level_logits, type_logits, images_per_row

    # -- forward and generate ----------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        safety_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs,
    ) -> SafeGemma3CausalLMOutputWithPast:
        r"""
        Stock Gemma 3's forward, plus the safety logits whenever this call encodes `pixel_values`.

        safety_labels (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            `(level, type)` per row, -100 for none; adds `safety_loss_weight * safety_loss` to the loss.
        output_safety (`bool`, *optional*): Run the safety head (default: when `pixel_values` or `safety_labels`).
        """
        if safety_labels is not None:
            output_safety = True
            if pixel_values is None and mm_encoder_outputs is None:
                raise ValueError("safety_labels were given without pixel_values: there is no image to classify.")
        if input_ids is not None and kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            _check_direct_call(self.config, input_ids)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            output_safety=output_safety,
            **{**kwargs, "return_dict": True},
        )
        logits = self.lm_head(_keep_logits(outputs.last_hidden_state, logits_to_keep))
        lm_loss, safety_loss = self._losses(logits, labels, outputs, safety_labels, kwargs)
        stock_fields = {name: value for name, value in outputs.items() if name not in _BASE_ONLY_FIELDS}
        return SafeGemma3CausalLMOutputWithPast(
            loss=_total_loss(lm_loss, safety_loss, self.config.safety_loss_weight), logits=logits, **stock_fields,
            lm_loss=lm_loss, safety_loss=safety_loss,
            safety_level_logits=outputs.safety_level_logits, safety_type_logits=outputs.safety_type_logits,
        )

    @torch.no_grad()
    def generate(self, *args, safety_threshold=None, safety_actions=None, allow_untrained_safety=False, **kwargs):
        r"""Stock `generate` with the safety verdict in front (see `SafeLlavaForConditionalGeneration.generate`)."""
        prompt_ids = kwargs.get("input_ids", args[0] if args else None)

        def stock_generate(*stock_args, **stock_kwargs):
            # The plan rebuilds the prompts of hinted rows (hint inserted, rows re-padded): their token types follow.
            ids = stock_kwargs.get("input_ids")
            if stock_kwargs.get("token_type_ids") is not None and ids is not None and ids is not prompt_ids:
                stock_kwargs["token_type_ids"] = (ids == self.config.image_token_id).long()
            return super(SafeGemma3ForConditionalGeneration, self).generate(*stock_args, **stock_kwargs)

        return generate_with_safety(self, stock_generate, args, kwargs, safety_threshold, safety_actions, allow_untrained_safety)


__all__ = [
    "SafeGemma3Config",
    "SafeGemma3Processor",
    "SafeGemma3PreTrainedModel",
    "SafeGemma3Model",
    "SafeGemma3ForConditionalGeneration",
    "SafeGemma3CausalLMOutputWithPast",
    "SafeGemma3ModelOutputWithPast",
]
