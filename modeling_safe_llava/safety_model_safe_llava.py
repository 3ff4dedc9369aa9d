# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""The seam between the safety module and a vision-language base, and the model code every base shares.

A base (LLaVA-1.5, LLaVA-NeXT, Gemma 3, ...) gives the safety module three things, as methods of its headless model
([`SafetyModelMixin`]); see `docs/bases.md`:

1. `safety_vision_states(image_outputs)`: the vision hidden states per image that the safety projector reads, as a
   grid `(num_images, grid_height, grid_width, vision_dim)` (LLaVA-1.5: the `vision_feature_layer`(s), CLS dropped,
   24x24).
2. where the LLM safety tokens enter the language model's input: the base's processor reserves
   `num_llm_safety_tokens` placeholder positions per image, and its `get_image_features` fills them by passing its
   per-image features through `add_llm_safety_tokens`. With `num_llm_safety_tokens=0` the base is stock, bit for bit.
3. `safety_query(input_ids, inputs_embeds, attention_mask)`: the head's query, `(batch_size, hidden)`. The default is
   each row's first non-padding token's input embedding.

and, where its defaults do not fit: `images_per_row` (images in each row, from the placeholders),
`safety_units_per_image` (several vision grids per image, e.g. LLaVA-NeXT's crops), `encode_images_for_safety` (the
cheapest encoding that carries what `safety_vision_states` reads) and `prompt_inputs` (model inputs that follow from
the token ids, e.g. Gemma 3's `token_type_ids`, recomputed when the generation plan rebuilds prompts).

Everything else is generic: the headless forward, `safety_logits` (the one route from encoded images to the head), and
the ForConditionalGeneration's `forward`, `generate`, `assess_safety`, `safety_forward` and `from_base`
([`SafetyForConditionalGenerationMixin`]).

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import torch
from transformers.utils.generic import can_return_tuple

from .checks_safe_llava import check_bool
from .generation_safe_llava import generate_with_safety
from .policy_safe_llava import SafetyCallRule
from .safety_module_safe_llava import check_input_ids, check_model_inputs, safety_loss


# Fields of the headless model's output that the causal-LM output does not carry.
_BASE_ONLY_FIELDS = ("last_hidden_state", "safety_level_logits", "safety_type_logits", "images_per_row")
# What the caller asked of the outputs applies to the vision tower too (stock passes it on since 5.24).
_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


class SafetyModelMixin:
    """
    Put in front of a base's stock headless model (`class SafeLlavaModel(SafetyModelMixin, LlavaModel, ...)`). The
    base builds `self.safety_module = SafeLlavaSafetyModule(config)` in `__init__`, overrides `get_image_features` to
    pass its per-image features through `add_llm_safety_tokens`, and implements `safety_vision_states`.

    Class attributes a base sets:
        safety_output_class: the headless output class (the stock one plus the safety fields).
        safety_image_kwargs: the names of the forward arguments its `get_image_features` takes besides pixel values.
        safety_passes_output_flags: whether output flags reach `get_image_features` (default `True`).
    """

    safety_output_class = None
    safety_image_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
    # Whether the caller's `output_hidden_states` / `output_attentions` reach `get_image_features` (stock LLaVA's
    # forward passes them on since transformers 5.24; a base whose stock forward never does sets False).
    safety_passes_output_flags = True

    # -- the seam: what a base supplies ----------------------------------------------------------------------------

    def safety_vision_states(self, image_outputs) -> torch.Tensor:
        """
        The vision states the safety projector reads, `(num_units, grid_height, grid_width, vision_dim)` with
        `vision_dim == config.safety_vision_dim`, in row order. A unit is one image, or one of its crops when
        `safety_units_per_image` says so; a row's verdict is its riskiest unit's.

        Args:
            image_outputs: what `encode_images` or `encode_images_for_safety` returned for these images.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement safety_vision_states (see docs/bases.md).")

    def safety_query(self, input_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        """The safety head's query, `(batch_size, hidden)`: each row's first non-padding token's input embedding
        (a decision never depends on padding side or batch company)."""
        reference = input_ids if input_ids is not None else inputs_embeds
        rows = torch.arange(reference.shape[0], device=reference.device)
        if attention_mask is None or attention_mask.ndim != 2:
            first = torch.zeros_like(rows)
        else:
            first = attention_mask.to(torch.long).argmax(dim=1).to(reference.device)
        if input_ids is not None:
            return self.get_input_embeddings()(input_ids[rows, first])
        return inputs_embeds[rows, first]

    def images_per_row(self, input_ids, inputs_embeds, image_outputs) -> torch.LongTensor:
        """Images in each row, `(batch_size,)`, from its image placeholders: `config.image_seq_length` placeholders
        per image. Bases whose images take a varying number of placeholders override this (they can read the images'
        sizes from `image_outputs`)."""
        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds).sum(dim=1)
        return placeholders // self.config.image_seq_length

    def image_placeholder_mask(self, input_ids, inputs_embeds) -> torch.BoolTensor:
        """`(batch_size, sequence_length)`: where the image placeholders are, in `input_ids` or, as stock finds them,
        in `inputs_embeds`."""
        image_token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        image_embedding = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embedding).all(-1)

    def check_image_inputs(self, pixel_values, **image_kwargs):
        """Rejects images this base cannot read, naming the expected layout (`pixel_values` is already known to be a
        floating-point tensor on the model's device). Default: LLaVA's `(num_images, channels, height, width)`, with
        an optional crop dimension. `image_kwargs` are the call's other arguments (e.g. a base's image sizes)."""
        num_channels = self.config.vision_config.num_channels
        if pixel_values.ndim < 4 or pixel_values.shape[-3] != num_channels:
            raise ValueError(
                f"pixel_values must have shape (num_images, {num_channels}, height, width) (with crops: (num_images, "
                f"num_crops, {num_channels}, height, width)), got {tuple(pixel_values.shape)}."
            )

    def select_image_inputs(self, kwargs, images_per_row: list[int], rows: list[int]) -> dict:
        """The call's per-image arguments (`kwargs`, the `generate` call's) for the images of `rows` alone, when the
        generation plan passes a subset of rows to stock `generate`; `images_per_row` maps images to rows. Default:
        none (the images arrive pre-encoded, and the language model reads no other per-image argument)."""
        return {}

    def safety_units_per_image(self, image_outputs) -> torch.LongTensor | None:
        """Vision grids per image, `(num_images,)`, when `safety_vision_states` gives several per image (crops);
        `None` (the default): one grid per image."""
        return None

    def prompt_inputs(self, input_ids, attention_mask) -> dict:
        """Model inputs that follow from the token ids (Gemma 3: `token_type_ids`), for prompts the generation plan
        rebuilds (a safe hint inserted, a subset of rows re-padded). Default: none."""
        return {}

    def encode_images_for_safety(self, pixel_values, **image_kwargs):
        """The images encoded for a verdict alone (no language model). Defaults to `encode_images`; a base may skip
        what only the language model needs (LLaVA-1.5 skips its multi-modal projector)."""
        return self.encode_images(pixel_values, **image_kwargs)

    def add_llm_safety_tokens(self, image_features):
        """`image_features` (a list of `(num_tokens, hidden)` tensors, or one `(num_images, num_tokens, hidden)`
        tensor) with the LLM safety tokens in front of each image's; unchanged with `num_llm_safety_tokens=0`."""
        llm_tokens = self.safety_module.llm_tokens
        if llm_tokens is None:
            return image_features
        if isinstance(image_features, torch.Tensor):
            tokens = llm_tokens.to(image_features.dtype).expand(image_features.shape[0], -1, -1)
            return torch.cat([tokens, image_features], dim=1)
        return [torch.cat([llm_tokens.to(features.dtype), features], dim=0) for features in image_features]

    # -- generic ---------------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values, **image_kwargs):
        """The base's `get_image_features` (LLM safety tokens in front), keeping only the image arguments it takes
        (`safety_image_kwargs`) and the output flags that are set."""
        flags = {k: True for k in _OUTPUT_FLAGS if image_kwargs.get(k) and self.safety_passes_output_flags}
        image_kwargs = {k: v for k, v in image_kwargs.items() if k in self.safety_image_kwargs and v is not None}
        return self.get_image_features(pixel_values, return_dict=True, **image_kwargs, **flags)

    def safety_logits(self, image_outputs, input_ids=None, inputs_embeds=None, attention_mask=None):
        """
        The one route from encoded images to the safety head (forward, generate, assess_safety and training).

        Returns:
            `(level_logits (batch_size, num_levels), type_logits (batch_size, num_types), images_per_row
            (batch_size,))`.
        """
        vision_states = self.safety_vision_states(image_outputs)
        images_per_row = self.images_per_row(input_ids, inputs_embeds, image_outputs)
        units_per_image = self.safety_units_per_image(image_outputs)
        num_images = len(vision_states) if units_per_image is None else units_per_image.shape[0]
        if not torch.compiler.is_compiling():  # a host sync: skipped under torch.compile
            check_images_match(images_per_row, num_images, self.config)
        units_per_row = images_per_row
        if units_per_image is not None:  # a row's units: the crops of all its images
            rows = torch.arange(images_per_row.shape[0], device=images_per_row.device)
            image_rows = torch.repeat_interleave(rows, images_per_row, output_size=num_images)
            units_per_row = torch.zeros_like(images_per_row).index_add_(0, image_rows, units_per_image.to(rows.device))
        query = self.safety_query(input_ids, inputs_embeds, attention_mask)
        level_logits, type_logits = self.safety_module(vision_states, query, units_per_row)
        return level_logits, type_logits, images_per_row

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs,
    ):
        r"""
        The stock base's forward, plus the safety logits (`safety_output_class`).

        output_safety (`bool`, *optional*):
            Run the safety head. Defaults to `True` when this call encodes `pixel_values` itself and to `False` when
            images arrive pre-encoded in `mm_encoder_outputs` (inside `generate`, which judges them beforehand).
        """
        if input_ids is not None and past_key_values is None and kwargs.get("cache") is None:
            _check_direct_call(self.config, input_ids)
        if pixel_values is not None and mm_encoder_outputs is None:
            image_outputs = self.encode_images(pixel_values, **kwargs)
            mm_encoder_outputs, pixel_values = {"image": image_outputs}, None
            output_safety = True if output_safety is None else output_safety
        outputs = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **_cache_argument(past_key_values),
            **{**kwargs, "return_dict": True},
        )
        image_outputs = (mm_encoder_outputs or {}).get("image")
        safety = {}
        if output_safety and image_outputs is not None:
            level, kind, images_per_row = self.safety_logits(image_outputs, input_ids, inputs_embeds, attention_mask)
            safety = {"safety_level_logits": level, "safety_type_logits": kind, "images_per_row": images_per_row}
        return _with_safety_fields(outputs, self.safety_output_class, safety)


def _with_safety_fields(outputs, output_class, safety: dict):
    """
    Stock's output re-classed in place as `output_class` (stock's class plus the safety fields, which default to
    None), with the `safety` fields set: the same object a fresh `output_class(**outputs, **safety)` would give, without
    copying stock's fields into a new output on every decoding step.
    """
    if torch.compiler.is_compiling() or not issubclass(output_class, type(outputs)):  # dynamo cannot re-class
        return output_class(**outputs, **safety)
    outputs.__class__ = output_class
    for name, value in safety.items():
        outputs[name] = value
    return outputs


class SafetyForConditionalGenerationMixin:
    """
    Put in front of a base's stock ForConditionalGeneration class. `forward` is stock's plus the safety logits: the
    base restates stock's, calls its headless model as stock's does, then `causal_lm_output`. `generate` is stock's
    with the verdict in front (`generation_safe_llava.generate_with_safety`), `assess_safety` is the verdict alone;
    each validates its inputs once and builds the policy once. A base sets `stock_class` (the stock class `from_base`
    converts) and `safety_output_class` (stock's causal-LM output plus the safety fields).
    """

    safety_output_class = None
    # The safety loss is a per-row mean, not a per-token sum: the Trainer must not rescale it by the token count.
    accepts_loss_kwargs = False

    @classmethod
    def from_base(cls, model_or_path, processor=None, **config_overrides):
        """
        The SafeLlava of a stock `cls.stock_class` model (instance, folder or Hub id): every stock weight kept bit for
        bit, the safety module freshly initialised (and marked untrained), the paper's policy unless overridden by
        `config_overrides` (config fields; `from_pretrained` kwargs such as `dtype` are passed on when loading a path),
        and its texts tokenized with `processor` (a SafeLlava processor) when one is given.
        """
        model = cls._from_stock(model_or_path, dict(config_overrides))
        if processor is not None:
            model.tokenize_safety_texts(processor)
        return model

    def causal_lm_output(self, outputs, labels=None, safety_labels=None, logits_to_keep=0, **kwargs):
        r"""
        The generation class's output from its headless model's: a base's `forward` restatement calls `self.model(...)`
        as stock's does (with `output_safety=True` when `safety_labels` is given), then this.

        Args:
            outputs: the headless model's output (`last_hidden_state` `(batch_size, sequence_length, hidden)`, the
                safety logits when the call ran the head).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): next-token labels.
            safety_labels (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
                `(level, type)` per row, -100 for none; adds `safety_loss_weight * safety_loss` to the loss.
            logits_to_keep (`int` or `torch.Tensor`): stock's: the last positions (0: all) or the positions to score.
            kwargs: the call's other arguments, for stock's loss function (e.g. `num_items_in_batch`).

        Returns:
            `safety_output_class`: stock's fields, `logits` `(batch_size, kept positions, vocab_size)`, the losses and
            the safety logits.
        """
        if safety_labels is not None and outputs.safety_level_logits is None:
            raise ValueError("safety_labels were given without pixel_values: there is no image to classify.")
        logits = self.lm_head(_keep_logits(outputs.last_hidden_state, logits_to_keep))
        lm_loss, safety = _losses(self, logits, labels, outputs, safety_labels, kwargs)
        # Stock's own fields, whatever this transformers version names them (`past_key_values` or `cache`, ...).
        stock_fields = {name: value for name, value in outputs.items() if name not in _BASE_ONLY_FIELDS}
        return self.safety_output_class(
            loss=_total_loss(lm_loss, safety, self.config.safety_loss_weight),
            logits=logits,
            **stock_fields,
            lm_loss=lm_loss,
            safety_loss=safety,
            safety_level_logits=outputs.safety_level_logits,
            safety_type_logits=outputs.safety_type_logits,
        )

    @torch.no_grad()
    def generate(self, *args, safety_threshold=None, safety_actions=None, allow_untrained_safety=False, **kwargs):
        r"""
        Stock `generate` with the safety verdict in front; everything stock accepts is accepted.

        Args:
            safety_threshold (`None`, `float` or `dict[str, float]`, *optional*):
                A row is flagged iff `risk = 1 - P(level 0)` exceeds the threshold of its most likely risky type.
                `None` uses the saved default; `1.0` turns safety off (stock generation, nothing judged).
            safety_actions (`dict[str, str | list[str]]`, *optional*):
                Call-time overrides of `config.safety_actions`, e.g. `{"Illegal Risk": "allow"}`.
            allow_untrained_safety (`bool`, *optional*, defaults to `False`):
                Judge with untrained safety modules (tests and debugging only).

        Returns:
            Stock's result for every allowed row; a refused row holds the refusal, a hinted row's hint stays internal.
            With `return_dict_in_generate=True`, stock's output class with `safety_assessment` added.
        """
        plan_view = SafetyGenerationView(self)
        generation_config = kwargs.get("generation_config") or self.generation_config
        rule = SafetyCallRule.from_config(self.config, safety_threshold, safety_actions, generation_config)
        return generate_with_safety(plan_view, super().generate, args, kwargs, rule, allow_untrained_safety)

    @torch.no_grad()
    def assess_safety(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        safety_threshold=None,
        safety_actions=None,
        allow_untrained_safety: bool = False,
        **image_kwargs,
    ):
        """
        The verdict alone ([`SafeLlavaSafetyAssessment`]) of the processor's output (`**inputs`, other fields ignored)
        by vision tower, safety projector and head; `generate`'s safety arguments, or lists of one per row (`for_rows`).
        """
        check_safety_ready(self.config, allow_untrained_safety)
        rows = None if input_ids is None else len(input_ids)
        rule = SafetyCallRule.from_config(self.config, safety_threshold, safety_actions, self.generation_config, rows)
        level_logits, type_logits, images_per_row = self._pixel_safety_logits(input_ids, pixel_values, attention_mask, image_kwargs)
        return rule.assess(self.config, level_logits, type_logits, images_per_row)

    def safety_forward(self, input_ids, pixel_values, attention_mask=None, safety_labels=None, **batch_fields):
        """
        The safety branch alone (no language model), with gradients: `loss = safety_loss_weight * safety_loss` when
        `safety_labels` is given, and the safety logits. Stage 1 trains on it when the LLM safety tokens stay frozen.
        """
        level_logits, type_logits, images_per_row = self._pixel_safety_logits(input_ids, pixel_values, attention_mask, batch_fields)
        loss = safety = None
        if safety_labels is not None:
            safety = safety_loss(level_logits, type_logits, safety_labels, images_per_row)
            loss = self.config.safety_loss_weight * safety
        return self.safety_output_class(
            loss=loss, safety_loss=safety, safety_level_logits=level_logits, safety_type_logits=type_logits
        )

    def _pixel_safety_logits(self, input_ids, pixel_values, attention_mask, image_kwargs):
        """Inputs validated once, images encoded for the verdict alone, then `safety_logits`."""
        check_verdict_inputs(self, input_ids, pixel_values, attention_mask, image_kwargs)
        image_outputs = self.model.encode_images_for_safety(pixel_values, **image_kwargs)
        return self.model.safety_logits(image_outputs, input_ids, None, attention_mask)


class SafetyGenerationView:
    """
    A SafeLlava ForConditionalGeneration model as the generation plan sees it: the plan's one interface to the model
    (`generation_safe_llava.SafetyGenerationModel`), so that the plan reads nothing else of it.

    Args:
        model (`SafetyForConditionalGenerationMixin`): the model generating.
    """

    def __init__(self, model):
        self.model = model
        self.config, self.generation_config = model.config, model.generation_config

    def safety_logits_for_generation(
        self,
        input_ids,
        inputs_embeds,
        attention_mask,
        pixel_values,
        image_outputs,
        allow_untrained_safety: bool,
        **image_kwargs,
    ) -> tuple:
        """`SafetyGenerationModel.safety_logits_for_generation`: readiness and inputs checked once, `pixel_values`
        encoded once for the language model and the head (`encode_images`), then `safety_logits`; `(image_outputs,
        level_logits, type_logits, images_per_row)`."""
        check_safety_ready(self.config, allow_untrained_safety)
        if pixel_values is not None and input_ids is not None:
            check_verdict_inputs(self.model, input_ids, pixel_values, attention_mask, image_kwargs)
        elif input_ids is not None:
            check_input_ids(self.config, input_ids)
        headless = self.model.model
        if pixel_values is not None:
            image_outputs = headless.encode_images(pixel_values, **image_kwargs)
        return (image_outputs, *headless.safety_logits(image_outputs, input_ids, inputs_embeds, attention_mask))

    def rows_inputs(self, kwargs, input_ids, attention_mask, images_per_row: list[int], rows: list[int]) -> dict:
        """`SafetyGenerationModel.rows_inputs`: the headless model's `select_image_inputs` and `prompt_inputs`."""
        headless = self.model.model
        return {
            **headless.select_image_inputs(kwargs, images_per_row, rows),
            **headless.prompt_inputs(input_ids, attention_mask),
        }


def check_safety_ready(config, allow_untrained_safety: bool = False):
    """Fails closed: a verdict from untrained safety modules raises unless explicitly allowed (only `True` counts: a
    string such as `"False"` is truthy and must not unlock anything)."""
    check_bool("allow_untrained_safety", allow_untrained_safety)
    if config.safety_modules_trained is not True and not allow_untrained_safety:
        raise ValueError(
            "The safety modules of this model are untrained (config.safety_modules_trained is "
            f"{config.safety_modules_trained!r}), so its safety verdicts are random. Train them (stage 1) or load a "
            "trained checkpoint; pass allow_untrained_safety=True only for tests and debugging, or "
            "safety_threshold=1.0 to turn safety off."
        )


def check_verdict_inputs(model, input_ids, pixel_values, attention_mask, image_kwargs: dict):
    """The inputs of a verdict, checked once per call: the tensors (`check_model_inputs`), then the images' layout
    by the base's own rule (`check_image_inputs`)."""
    check_model_inputs(model, input_ids, pixel_values, attention_mask)
    model.model.check_image_inputs(pixel_values, **image_kwargs)


def check_images_match(images_per_row, num_images, config):
    """Every image has its image placeholders and every placeholder its image (`images_per_row` counts them)."""
    if int(images_per_row.sum()) != num_images:
        per_image = getattr(config, "image_seq_length", None)
        if per_image:
            need, hold = f"{num_images * per_image} <image> placeholders ({per_image} each: ", images_per_row * per_image
        else:
            need, hold = "their placeholders (", images_per_row
        raise ValueError(
            f"Image features and image tokens do not match: {num_images} image(s) need {need}"
            f"{config.num_llm_safety_tokens} LLM safety tokens + patches), the rows hold {hold.tolist()}. Build inputs "
            "with this model's processor for its config."
        )


def _check_direct_call(config, input_ids):
    """A call without a cache is no generation step: out-of-vocabulary ids get a clear error instead of an
    IndexError inside torch (skipped under `torch.compile`, where it would be a host sync)."""
    if not torch.compiler.is_compiling():
        check_input_ids(config, input_ids)


def _losses(model, logits, labels, outputs, safety_labels, kwargs):
    """`(lm_loss, safety_loss)` of a forward, each `None` without its labels."""
    lm_loss = safety = None
    if labels is not None:
        vocab_size = model.config.get_text_config().vocab_size
        lm_loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
    if safety_labels is not None:
        level, kind = outputs.safety_level_logits, outputs.safety_type_logits
        safety = safety_loss(level, kind, safety_labels, outputs.images_per_row)
    return lm_loss, safety


def _cache_argument(past_key_values) -> dict:
    """`past_key_values` passed on only when given: transformers >= 5.25 names the cache `cache` and logs a
    deprecation for every explicit `past_key_values=`, even `None`."""
    return {} if past_key_values is None else {"past_key_values": past_key_values}


def _keep_logits(hidden_states, logits_to_keep):
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep]


def _total_loss(lm_loss, safety_loss_value, weight):
    if safety_loss_value is None:
        return lm_loss
    weighted = weight * safety_loss_value
    return weighted if lm_loss is None else lm_loss + weighted


__all__ = ["SafetyModelMixin", "SafetyForConditionalGenerationMixin", "SafetyGenerationView", "check_safety_ready"]
