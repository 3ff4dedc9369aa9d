# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava: LLaVA-1.5 plus the safety module of arXiv 2405.13581 (safety projector, safety tokens, safety head).

This file is LLaVA-1.5's side of the seam (`safety_model_safe_llava.py`, `docs/bases.md`): where the head's vision
states come from, and where the LLM safety tokens enter. Loading and construction live in
`safety_loading_safe_llava.py`, the policy in `policy_safe_llava.py`, the generation plan in `generation_safe_llava.py`.

This file is remote code: it is copied next to the weights on the Hub and imports only torch, transformers and its
sibling files (flat, relative imports).

Pipeline (LLaVA-1.5-7B shapes):

    pixel_values -> vision tower -> h_o (N_img, 576, 1024)   [vision_feature_layer, CLS dropped]
      |-> multi-modal projector -> h_i (N_img, 576, 4096)
      |      LLM input at each image: [safety_module.llm_tokens (64, 4096) ; h_i]      (640 positions)
      '-> safety_module.projector: h_o as a (24, 24, 1024) grid -> h_s (N_img, 576, 4096)
             safety_module.head: query = embedding of the row's first non-padding token,
             keys/values = [safety_module.tokens (64, 4096) ; h_s]
             -> level logits (N_img, 4), type logits (N_img, 7) -> riskiest image per row -> (B, 4), (B, 7)
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_safe_llava import SafeLlavaConfig
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_module_safe_llava import SAFETY_PARAMETER_PREFIXES, SafeLlavaSafetyModule  # noqa: F401 (re-exported)


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


class SafeLlavaPreTrainedModel(SafetyPreTrainedMixin, LlavaPreTrainedModel):
    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    _no_split_modules = ["SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]


class SafeLlavaModel(SafetyModelMixin, LlavaModel, SafeLlavaPreTrainedModel):
    """LLaVA without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of each
    image's projected features by `get_image_features`, so stock LLaVA's merge and generation handle them."""

    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    stock_class = LlavaModel
    safety_output_class = SafeLlavaModelOutputWithPast

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
        image_outputs.pooler_output = self.add_llm_safety_tokens(image_outputs.pooler_output)
        return image_outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeLlavaModelOutputWithPast:
        r"""Stock `LlavaModel.forward` restated (docs/bases.md, "What a `forward` names"), plus the safety logits
        ([`SafetyModelMixin.forward`], `output_safety`)."""
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=output_safety, vision_feature_layer=vision_feature_layer, image_sizes=image_sizes,
            vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
        )  # fmt: skip

    def encode_images_for_safety(self, pixel_values, **image_kwargs):
        """The vision tower alone: the head reads its hidden states, LLaVA's projection is not needed for a verdict."""
        return self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)

    def safety_vision_states(self, image_outputs) -> torch.Tensor:
        """The layer(s) LLaVA projects (`config.vision_feature_layer`, CLS dropped for strategy `"default"`),
        concatenated, as a `(num_images, 24, 24, vision_dim)` grid for LLaVA-1.5-7B."""
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        hidden_states = getattr(image_outputs, "hidden_states", None)
        if hidden_states is None or any(hidden_states[layer] is None for layer in layers):
            raise ValueError(
                "These pre-encoded images carry no vision hidden states, so the safety head cannot judge them. Pass "
                "pixel_values, encode with model.get_image_features, or set safety_threshold=1.0 to turn safety off."
            )
        drop_cls = self.config.vision_feature_select_strategy == "default"
        states = torch.cat([hidden_states[layer][:, 1:] if drop_cls else hidden_states[layer] for layer in layers], -1)
        num_images, num_patches, channels = states.shape
        side = math.isqrt(num_patches)
        if side * side == num_patches:
            return states.view(num_images, side, side, channels)
        if self.config.safety_projector_type == "cabstractor":
            raise ValueError(
                f"The C-Abstractor needs a square patch grid, got {num_patches} patches per image; use "
                "vision_feature_select_strategy='default' (drops CLS) or safety_projector_type='mlp'."
            )
        return states.view(num_images, 1, num_patches, channels)


class SafeLlavaForConditionalGeneration(
    SafetyForConditionalGenerationMixin, LlavaForConditionalGeneration, SafeLlavaPreTrainedModel
):
    """
    LLaVA-1.5 with the safety module: `forward` is stock LLaVA's plus the safety logits, `generate` stock's with the
    verdict in front, `assess_safety` the verdict alone ([`SafetyForConditionalGenerationMixin`]).

    Example:

    ```python
    >>> model = SafeLlavaForConditionalGeneration.from_llava("llava-hf/llava-1.5-7b-hf", processor=processor)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety module
    ```
    """

    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    stock_class = LlavaForConditionalGeneration
    safety_output_class = SafeLlavaCausalLMOutputWithPast
    # `from_base` under LLaVA's name: a SafeLlava from a stock `LlavaForConditionalGeneration` (instance, folder, id).
    from_llava = classmethod(SafetyForConditionalGenerationMixin.from_base.__func__)

    def __init__(self, config: SafeLlavaConfig):
        # Skip LlavaForConditionalGeneration.__init__ (it would build a stock LlavaModel), keep PreTrainedModel's.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = SafeLlavaModel(config)
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
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        safety_labels: torch.LongTensor | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeLlavaCausalLMOutputWithPast:
        r"""Stock `LlavaForConditionalGeneration.forward` restated (docs/bases.md, "What a `forward` names"), plus the
        safety logits and loss ([`SafetyForConditionalGenerationMixin.causal_lm_output`])."""
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=True if safety_labels is not None else output_safety,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes, return_dict=True, **kwargs,
        )  # fmt: skip
        return self.causal_lm_output(outputs, labels, safety_labels, logits_to_keep, **kwargs)


__all__ = [
    "SafeLlavaPreTrainedModel",
    "SafeLlavaModel",
    "SafeLlavaForConditionalGeneration",
    "SafeLlavaCausalLMOutputWithPast",
    "SafeLlavaModelOutputWithPast",
]
