# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava: LLaVA-1.5 plus the safety module of arXiv 2405.13581 (safety projector, safety tokens, safety head).

This file is remote code: it is copied next to the weights on the Hub and imports only torch, transformers and its
sibling files (flat, relative imports). What a verdict does (thresholds, actions, hints, refusals, the generation
plan) lives beside the model, in `policy_safe_llava.py`.

Pipeline (LLaVA-1.5-7B shapes):

    pixel_values -> vision tower -> h_o (N_img, 576, 1024)   [vision_feature_layer, CLS dropped]
      |-> multi-modal projector -> h_i (N_img, 576, 4096)
      |      LLM input at each image: [safety_module.llm_tokens (64, 4096) ; h_i]      (640 positions)
      '-> safety_module.projector -> h_s (N_img, 576, 4096)
             safety_module.head: query = embedding of the row's first non-padding token,
             keys/values = [safety_module.tokens (64, 4096) ; h_s]
             -> level logits (N_img, 4), type logits (N_img, 7) -> riskiest image per row -> (B, 4), (B, 7)
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.generation import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers import AutoModel, GenerationMixin
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_safe_llava import SafeLlavaConfig
from .safety_module_safe_llava import (
    SAFETY_PARAMETER_PREFIXES,
    SafeLlavaSafetyModule,
    check_images_match,
    check_input_ids,
    check_model_inputs,
    safety_loss,
    shape_field,
)
from .policy_safe_llava import (
    SafeLlavaSafetyAssessment,
    SafetyPolicy,
    assess_logits,
    generate_with_safety,
    generation_config_with_threshold,
)


logger = logging.get_logger(__name__)

# Fields of the headless model's output that the causal-LM output does not carry.
_BASE_ONLY_FIELDS = ("last_hidden_state", "safety_level_logits", "safety_type_logits", "images_per_row")
# Weights the verdict depends on: a checkpoint lacking any of them cannot be a trained safety classifier.
VERDICT_PATH_PREFIXES = (*SAFETY_PARAMETER_PREFIXES, "model.vision_tower.", "model.language_model.embed_tokens.")

# Stock llava-hf checkpoints use legacy key names (`language_model.model.*`, ...), which transformers renames only for
# its own classes. The safety module's parameters keep the flat names SafeLlava has always saved
# (`model.safety_projector.*`, `model.safety_tokens`, ...): checkpoints from before and after the grouping load alike.
register_checkpoint_conversion_mapping(
    "SafeLlavaForConditionalGeneration",
    [
        *get_checkpoint_conversion_mapping("llava"),
        WeightRenaming(source_patterns=r"^model\.safety_projector\.", target_patterns="model.safety_module.projector."),
        WeightRenaming(source_patterns=r"^model\.safety_tokens", target_patterns="model.safety_module.tokens"),
        WeightRenaming(source_patterns=r"^model\.llm_safety_tokens", target_patterns="model.safety_module.llm_tokens"),
        WeightRenaming(source_patterns=r"^model\.safety_head\.", target_patterns="model.safety_module.head."),
    ],
    overwrite=True,
)


@dataclass
class SafeLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    [`LlavaModelOutputWithPast`] plus the safety head's verdict, computed when the call encodes `pixel_values`.

    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*):
        Risk-level logits of each row (its riskiest image).
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*):
        Risk-type logits of each row (its riskiest image).
    images_per_row (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Images found in each row.
    """

    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    [`LlavaCausalLMOutputWithPast`] plus the safety fields (after stock's, also in the `return_dict=False` tuple).
    `loss` is `lm_loss + config.safety_loss_weight * safety_loss` (each term only when its labels are given).

    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): Next-token cross-entropy, when `labels` is given.
    safety_loss (`torch.FloatTensor` of shape `()`, *optional*):
        `CE(level) + CE(type)` averaged over labelled rows, when `safety_labels` is given.
    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    """

    lm_loss: torch.FloatTensor | None = None
    safety_loss: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    _no_split_modules = ["SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialised like transformers' own models. For custom code, transformers skips every module whose own
        parameters are already flagged, which is vacuously true of a module without parameters of its own, so CLIP's
        attention and MLP init would be skipped on weights a checkpoint lacks. Every SafeLlava init goes through
        `transformers.initialization`, which flags each parameter, so that shortcut is not needed."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        # Bare parameters are not covered by the generic init: without this they would keep uninitialised memory
        # whenever a checkpoint lacks them (e.g. when converting a stock LLaVA checkpoint).
        if isinstance(module, SafeLlavaSafetyModule):
            init.normal_(module.tokens, mean=0.0, std=0.02)
            if module.llm_tokens is not None:
                init.normal_(module.llm_tokens, mean=0.0, std=0.02)


class SafeLlavaModel(LlavaModel, SafeLlavaPreTrainedModel):
    """LLaVA without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of each
    image's projected features by `get_image_features`, so stock LLaVA's merge and generation handle them."""

    config: SafeLlavaConfig
    config_class = SafeLlavaConfig

    def __init__(self, config: SafeLlavaConfig):
        # LlavaModel's modules, then the safety module, then one post_init() (LlavaModel.__init__ would run post_init()
        # before the safety module exists, and a second one would initialise the stock weights twice).
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.safety_module = SafeLlavaSafetyModule(config)
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        """
        LLaVA's image features with the LLM safety tokens first: `pooler_output` is a list with one
        `(num_llm_safety_tokens + num_patches, text_hidden)` tensor per image; `hidden_states` keeps the vision
        layer(s) the safety head reads, whatever layer the language model is given.
        """
        if vision_feature_layer not in (None, self.config.vision_feature_layer) and not kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = True
        image_outputs = super().get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **{**kwargs, "return_dict": True},
        )
        llm_tokens = self.safety_module.llm_tokens
        if llm_tokens is not None:
            image_outputs.pooler_output = [
                torch.cat([llm_tokens.to(features.dtype), features], dim=0) for features in image_outputs.pooler_output
            ]
        return image_outputs

    def images_per_row(self, input_ids, inputs_embeds, num_images: int) -> torch.LongTensor:
        """Images in each row, `(batch_size,)`, from its `<image>` placeholders (in `input_ids` or, as stock finds
        them, in `inputs_embeds`). Stock's own check raises if the placeholders and features do not match."""
        if input_ids is not None:
            placeholders = (input_ids == self.config.image_token_id).sum(dim=1)
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            placeholders = (inputs_embeds == image_embedding).all(-1).sum(dim=1)
        return placeholders // self.config.image_seq_length

    def first_token_embeddings(self, input_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        """Embedding of each row's first non-padding token, `(batch_size, hidden)`: the safety head's query."""
        reference = input_ids if input_ids is not None else inputs_embeds
        rows = torch.arange(reference.shape[0], device=reference.device)
        if attention_mask is None or attention_mask.ndim != 2:
            first = torch.zeros_like(rows)
        else:
            first = attention_mask.to(torch.long).argmax(dim=1).to(reference.device)
        if input_ids is not None:
            return self.get_input_embeddings()(input_ids[rows, first])
        return inputs_embeds[rows, first]

    def judge(self, image_outputs, input_ids, inputs_embeds, attention_mask):
        """The safety module on already-encoded images: `(level_logits, type_logits, images_per_row)`, one row each."""
        images_per_row = self.images_per_row(input_ids, inputs_embeds, len(image_outputs.pooler_output))
        query = self.first_token_embeddings(input_ids, inputs_embeds, attention_mask)
        level_logits, type_logits = self.safety_module(image_outputs.hidden_states, query, images_per_row)
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
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        output_safety: bool | None = None,
        **kwargs,
    ) -> SafeLlavaModelOutputWithPast:
        r"""
        output_safety (`bool`, *optional*):
            Run the safety head. Defaults to `True` when this call encodes `pixel_values` itself and to `False` when
            images arrive pre-encoded in `mm_encoder_outputs` (inside `generate`, which judges them beforehand).
        """
        if pixel_values is not None and mm_encoder_outputs is None:
            # What the caller asked of the outputs applies to the vision tower too (stock passes it on since 5.24).
            asked = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)}
            image_outputs = self.get_image_features(
                pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **asked,
            )
            mm_encoder_outputs, pixel_values = {"image": image_outputs}, None
            output_safety = True if output_safety is None else output_safety
        outputs = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **{**kwargs, "return_dict": True},
        )
        image_outputs = (mm_encoder_outputs or {}).get("image")
        safety = {}
        if output_safety and image_outputs is not None:
            level, kind, images_per_row = self.judge(image_outputs, input_ids, inputs_embeds, attention_mask)
            safety = {"safety_level_logits": level, "safety_type_logits": kind, "images_per_row": images_per_row}
        return SafeLlavaModelOutputWithPast(**outputs, **safety)


class SafeLlavaForConditionalGeneration(LlavaForConditionalGeneration, SafeLlavaPreTrainedModel, GenerationMixin):
    """
    LLaVA-1.5 with the safety module. `forward` is stock LLaVA's plus the safety logits; `generate` is stock's with the
    verdict in front (see `policy_safe_llava.generate_with_safety`).

    Example:

    ```python
    >>> model = SafeLlavaForConditionalGeneration.from_llava("llava-hf/llava-1.5-7b-hf", processor=processor)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety module
    ```
    """

    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    # The safety loss is a per-row mean, not a per-token sum: the Trainer must not rescale it by the token count.
    accepts_loss_kwargs = False

    def __init__(self, config: SafeLlavaConfig):
        # Skip LlavaForConditionalGeneration.__init__ (it would build a stock LlavaModel), keep PreTrainedModel's.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = SafeLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        Stock `save_pretrained`, plus SafeLlava's pipeline: `config.json` names it in `custom_pipelines`, and the
        relative import below makes transformers' `custom_object_save` copy `pipeline_safe_llava.py` with the other
        remote-code files, so that `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` returns
        each answer with its verdict.
        """
        from .pipeline_safe_llava import CUSTOM_PIPELINES

        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_llava(cls, model_or_path, processor=None, **config_overrides):
        """
        A SafeLlava from a stock `LlavaForConditionalGeneration` (instance, folder or Hub id): every stock weight kept
        bit for bit, the safety module freshly initialised (and marked untrained), the paper's policy unless
        overridden, and its texts tokenized with `processor` when one is given.

        Args:
            model_or_path: a `LlavaForConditionalGeneration`, or anything `from_pretrained` accepts.
            processor: optional `SafeLlavaProcessor` whose tokenizer encodes the safety texts.
            config_overrides: `SafeLlavaConfig` fields (e.g. `num_llm_safety_tokens=0`); `from_pretrained` kwargs such
                as `dtype` are passed on when loading a path.
        """
        load_kwargs = {k: config_overrides.pop(k) for k in _LOAD_KWARGS if k in config_overrides}
        if isinstance(model_or_path, LlavaForConditionalGeneration):
            model = cls._from_llava_model(model_or_path, config_overrides)
        else:
            model = cls._from_llava_checkpoint(model_or_path, config_overrides, load_kwargs)
        model.generation_config = generation_config_with_threshold(model.generation_config, model.config.safety_threshold)
        if processor is not None:
            model.tokenize_safety_texts(processor)
        return model

    @classmethod
    def _from_llava_model(cls, llava, config_overrides):
        config = SafeLlavaConfig.from_llava_config(llava.config, **config_overrides)
        model = cls(config).to(dtype=llava.dtype, device=llava.device)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        _check_only_safety_weights_missing(missing, unexpected)
        model.generation_config = GenerationConfig.from_dict(llava.generation_config.to_dict())
        return model

    @classmethod
    def _from_llava_checkpoint(cls, path, config_overrides, load_kwargs):
        from transformers import AutoConfig

        hub_kwargs = {k: v for k, v in load_kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
        llava_config = AutoConfig.from_pretrained(path, **hub_kwargs)
        if llava_config.model_type != "llava":
            raise ValueError(f"from_llava expects a 'llava' checkpoint, {path!r} has model_type {llava_config.model_type!r}.")
        config = SafeLlavaConfig.from_llava_config(llava_config, **config_overrides)
        model, info = super().from_pretrained(path, config=config, output_loading_info=True, **_safetensors_only(load_kwargs))
        _check_only_safety_weights_missing(info["missing_keys"], info["unexpected_keys"])
        model.config.safety_modules_trained = False
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that reads safetensors only, and that marks the model untrained, with a
        warning naming them, when the checkpoint lacks any weight the verdict depends on (the safety module, the vision
        tower, the query's token embeddings), so that a half-loaded model never passes for a trained one."""
        kwargs = _safetensors_only(kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error) or kwargs.get("ignore_mismatched_sizes"):
                raise
            cls._raise_safety_shape_error(pretrained_model_name_or_path, args, kwargs, error)
        missing = sorted(k for k in info["missing_keys"] if k.startswith(VERDICT_PATH_PREFIXES))
        if missing and model.config.safety_modules_trained:
            logger.warning(
                "The checkpoint lacks weights the safety verdict depends on, which were freshly initialised: %s. "
                "The model is marked untrained (config.safety_modules_trained=False); safety-aware generation "
                "refuses to run until the safety module is trained.",
                ", ".join(missing),
            )
        if missing:
            model.config.safety_modules_trained = False
        return (model, info) if want_info else model

    @classmethod
    def _raise_safety_shape_error(cls, path, args, kwargs, error):
        """A checkpoint whose safety-module shapes disagree with its config: an error naming the config field and both
        shapes (found by a second, tolerant load), instead of transformers' generic `ignore_mismatched_sizes` one."""
        _, info = super().from_pretrained(
            path, *args, output_loading_info=True, **{**kwargs, "ignore_mismatched_sizes": True}
        )
        mismatched = [m for m in info.get("mismatched_keys", ()) if m[0].startswith(SAFETY_PARAMETER_PREFIXES)]
        if not mismatched:
            raise error
        details = "; ".join(
            f"{name} ({shape_field(name)}): checkpoint {tuple(saved)}, config {tuple(expected)}"
            for name, saved, expected in sorted(mismatched)
        )
        raise ValueError(
            f"The checkpoint's safety module does not match its config: {details}. Fix the config field(s) named to "
            "match the checkpoint, or retrain the safety module."
        ) from error

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        """Refuses any weight file that is not safetensors before it is opened: a shard index can name a pickle."""
        pickles = [name for name in checkpoint_files or () if not str(name).endswith(".safetensors")]
        if pickles:
            raise ValueError(
                f"SafeLlava loads weights from safetensors files only; the checkpoint names {pickles} (a pickle can run "
                "code when opened). Convert the checkpoint to safetensors in a trusted environment."
            )
        return LlavaForConditionalGeneration._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)

    # -- the policy beside the model ---------------------------------------------------------------------------

    @property
    def safety_policy(self) -> SafetyPolicy:
        """The [`SafetyPolicy`] saved in this model's config."""
        return SafetyPolicy.from_config(self.config)

    def tokenize_safety_texts(self, processor) -> dict:
        """Stores the policy texts as token ids of `processor` in the config, so that `generate` needs no tokenizer."""
        self.config.safety_text_token_ids = self.safety_policy.tokenize(processor)
        return self.config.safety_text_token_ids

    def resolve_safety_threshold(self, safety_threshold=None) -> torch.Tensor:
        """One threshold per risky type, `(num_risky_types,)`, for a `safety_threshold` argument."""
        default = getattr(self.generation_config, "safety_threshold", None)
        return self.safety_policy.resolve_thresholds(safety_threshold, default)

    def resolve_safety_actions(self, safety_actions=None) -> dict:
        """The configured actions with call-time overrides applied."""
        return self.safety_policy.resolve_actions(safety_actions)

    def check_safety_ready(self, allow_untrained_safety: bool = False):
        """Fails closed: a verdict from untrained safety modules raises unless explicitly allowed (only `True`
        counts: a string such as `"False"` is truthy and must not unlock anything)."""
        if not isinstance(allow_untrained_safety, bool):
            raise ValueError(f"allow_untrained_safety must be True or False, got {allow_untrained_safety!r}.")
        if self.config.safety_modules_trained is not True and not allow_untrained_safety:
            raise ValueError(
                "The safety modules of this model are untrained (config.safety_modules_trained is "
                f"{self.config.safety_modules_trained!r}), so its safety verdicts are random. Train them (stage 1) or "
                "load a trained checkpoint; pass allow_untrained_safety=True only for tests and debugging, or "
                "safety_threshold=1.0 to turn safety off."
            )

    # -- the verdict ---------------------------------------------------------------------------------------------

    def check_model_inputs(self, input_ids, pixel_values, attention_mask=None):
        """Clear errors for inputs that would give a wrong verdict or crash deep inside torch (see `check_model_inputs`)."""
        check_model_inputs(self, input_ids, pixel_values, attention_mask)

    def check_input_ids(self, input_ids):
        check_input_ids(self.config, input_ids)

    def judge_encoded_images(self, image_outputs, input_ids=None, inputs_embeds=None, attention_mask=None):
        """`(level_logits, type_logits, images_per_row)` of already-encoded images (`get_image_features` output)."""
        if getattr(image_outputs, "hidden_states", None) is None:
            raise ValueError(
                "These pre-encoded images carry no vision hidden states, so the safety head cannot judge them. Pass "
                "pixel_values, encode with model.get_image_features, or set safety_threshold=1.0 to turn safety off."
            )
        if input_ids is not None:
            check_input_ids(self.config, input_ids)
        level_logits, type_logits, images_per_row = self.model.judge(image_outputs, input_ids, inputs_embeds, attention_mask)
        check_images_match(images_per_row, len(image_outputs.pooler_output), self.config)
        return level_logits, type_logits, images_per_row

    @torch.no_grad()
    def assess_safety(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        safety_threshold=None,
        safety_actions=None,
        allow_untrained_safety: bool = False,
        image_sizes: torch.Tensor | None = None,
        **unused_processor_outputs,
    ) -> SafeLlavaSafetyAssessment:
        """
        The verdict alone: vision tower, safety projector and safety head, never the language model. Takes the
        processor's output (`**inputs`) and the same `safety_threshold` / `safety_actions` as `generate`.
        """
        self.check_safety_ready(allow_untrained_safety)
        level_logits, type_logits, images_per_row = self._judge_pixels(input_ids, pixel_values, attention_mask)
        thresholds, actions = self.resolve_safety_threshold(safety_threshold), self.resolve_safety_actions(safety_actions)
        return assess_logits(self.config, level_logits, type_logits, thresholds, actions, images_per_row)

    def safety_forward(self, input_ids, pixel_values, attention_mask=None, safety_labels=None, **unused_batch_fields):
        """
        The safety branch alone (no language model), with gradients: `loss = safety_loss_weight * safety_loss` when
        `safety_labels` is given, and the safety logits. Stage 1 trains on it when the LLM safety tokens stay frozen.
        """
        level_logits, type_logits, images_per_row = self._judge_pixels(input_ids, pixel_values, attention_mask)
        safety_loss = loss = None
        if safety_labels is not None:
            safety_loss = self.safety_loss(level_logits, type_logits, safety_labels, images_per_row)
            loss = self.config.safety_loss_weight * safety_loss
        return SafeLlavaCausalLMOutputWithPast(
            loss=loss, safety_loss=safety_loss, safety_level_logits=level_logits, safety_type_logits=type_logits
        )

    def _judge_pixels(self, input_ids, pixel_values, attention_mask):
        """Vision tower only (LLaVA's projection is not needed for a verdict), then the safety module."""
        check_model_inputs(self, input_ids, pixel_values, attention_mask)
        vision_outputs = self.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        images_per_row = self.model.images_per_row(input_ids, None, pixel_values.shape[0])
        check_images_match(images_per_row, pixel_values.shape[0], self.config)
        query = self.model.first_token_embeddings(input_ids, None, attention_mask)
        level_logits, type_logits = self.model.safety_module(vision_outputs.hidden_states, query, images_per_row)
        return level_logits, type_logits, images_per_row

    # -- forward -----------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        safety_labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        output_safety: bool | None = None,
        **kwargs,
    ) -> SafeLlavaCausalLMOutputWithPast:
        r"""
        Stock LLaVA's forward, plus the safety logits whenever this call encodes `pixel_values`.

        safety_labels (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            `(level, type)` per row, -100 for none; adds `safety_loss_weight * safety_loss` to the loss.
        output_safety (`bool`, *optional*):
            Run the safety head (default: when `pixel_values` is given, or when `safety_labels` is given).
        """
        if safety_labels is not None:
            output_safety = True
            if pixel_values is None and mm_encoder_outputs is None:
                raise ValueError("safety_labels were given without pixel_values: there is no image to classify.")
        if input_ids is not None and past_key_values is None and kwargs.get("cache") is None:
            _check_direct_call(self.config, input_ids)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            output_safety=output_safety,
            **{**kwargs, "return_dict": True},
        )
        logits = self.lm_head(_keep_logits(outputs.last_hidden_state, logits_to_keep))
        lm_loss, safety_loss = self._losses(logits, labels, outputs, safety_labels, kwargs)
        # Stock's own fields, whatever this transformers version names them (`past_key_values` or `cache`, ...).
        stock_fields = {name: value for name, value in outputs.items() if name not in _BASE_ONLY_FIELDS}
        return SafeLlavaCausalLMOutputWithPast(
            loss=_total_loss(lm_loss, safety_loss, self.config.safety_loss_weight),
            logits=logits,
            **stock_fields,
            lm_loss=lm_loss,
            safety_loss=safety_loss,
            safety_level_logits=outputs.safety_level_logits,
            safety_type_logits=outputs.safety_type_logits,
        )

    def _losses(self, logits, labels, outputs, safety_labels, kwargs):
        """`(lm_loss, safety_loss)`, each `None` without its labels."""
        lm_loss = safety_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        if safety_labels is not None:
            safety_loss = self.safety_loss(
                outputs.safety_level_logits, outputs.safety_type_logits, safety_labels, outputs.images_per_row
            )
        return lm_loss, safety_loss

    def safety_loss(self, level_logits, type_logits, safety_labels, images_per_row) -> torch.Tensor:
        """`CE(level) + CE(type)`, each averaged over the rows that carry that label (-100 rows add nothing)."""
        return safety_loss(level_logits, type_logits, safety_labels, images_per_row)

    # -- generation --------------------------------------------------------------------------------------------

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
        return generate_with_safety(
            self, super().generate, args, kwargs, safety_threshold, safety_actions, allow_untrained_safety
        )


# ----------------------------------------------------------------------------------------------------------------
# Losses and construction helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_direct_call(config, input_ids):
    """A call without a cache is no generation step: out-of-vocabulary ids get a clear error instead of an
    IndexError inside torch (skipped under `torch.compile`, where it would be a host sync)."""
    if not torch.compiler.is_compiling():
        check_input_ids(config, input_ids)


def _keep_logits(hidden_states, logits_to_keep):
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep]


def _total_loss(lm_loss, safety_loss, weight):
    if safety_loss is None:
        return lm_loss
    weighted = weight * safety_loss
    return weighted if lm_loss is None else lm_loss + weighted


def _safetensors_only(load_kwargs: dict) -> dict:
    """`from_pretrained` kwargs that read weights from safetensors files only, never from a pickle."""
    if load_kwargs.get("use_safetensors") is False or load_kwargs.get("weights_only") is False:
        raise ValueError(
            "SafeLlava loads weights from safetensors files only: use_safetensors=False and weights_only=False "
            "(pickle checkpoints) are refused. Convert the checkpoint to safetensors in a trusted environment."
        )
    return {**load_kwargs, "use_safetensors": True}


_LOAD_KWARGS = ("dtype", "device_map", "revision", "cache_dir", "local_files_only", "token", "attn_implementation")


def _check_only_safety_weights_missing(missing, unexpected):
    not_safety = sorted(k for k in missing if not k.startswith(SAFETY_PARAMETER_PREFIXES))
    if not_safety or unexpected:
        raise ValueError(
            "The LLaVA weights do not match this SafeLlava configuration: "
            f"missing {not_safety[:10]}, unexpected {sorted(unexpected)[:10]}."
        )


__all__ = [
    "SafeLlavaPreTrainedModel",
    "SafeLlavaModel",
    "SafeLlavaForConditionalGeneration",
    "SafeLlavaCausalLMOutputWithPast",
    "SafeLlavaModelOutputWithPast",
]
