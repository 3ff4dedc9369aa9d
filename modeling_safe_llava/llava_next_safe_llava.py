# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava on LLaVA-NeXT (LLaVA-v1.6): the safety module of arXiv 2405.13581 on `LlavaNextForConditionalGeneration`,
with anyres crops. Config, processor and model classes of the base in one file, built on the stock classes.

Pipeline (llava-v1.6-mistral-7b shapes, a 672x672 image: the base image plus 2x2 crops of 336x336):

    pixel_values (N_img, 5, 3, 336, 336) -> vision tower on every crop -> (N_crops, 577, 1024)
      |-> stock projection, unpadding, `image_newline`, packing -> one (tokens_i, 4096) tensor per image
      |      LLM input at each image: [safety_module.llm_tokens (64, 4096) ; packed features of the image]
      '-> vision_feature_layer, CLS dropped, one 24x24 grid per crop -> safety projector -> safety head
             -> level / type logits per crop -> riskiest crop of the riskiest image per row -> (B, 4), (B, 7)

What the head judges: every crop (the base image and each anyres crop), a row's verdict being its riskiest crop. A
detail visible only at crop resolution (small text, a small object) is averaged away in the 336x336 base image; on a
toy case of such a risk (`benchmarks/llava_next_crops.py`, 3 seeds) a head trained on the base image alone reached a
held-out AUROC of 0.67 on average, one judging every crop 0.94. The cost is the safety projector and head once per
crop instead of once per image (about 1% of a 7B request; the vision tower runs on every crop either way). See
`docs/bases.md`.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, LlavaNextConfig, LlavaNextProcessor
from transformers.cache_utils import Cache
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextModelOutputWithPast,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
    image_size_to_num_patches,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .safety_processing_safe_llava import SafetyProcessorMixin
from .safety_config_safe_llava import SafetyConfigMixin
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_module_safe_llava import SafeLlavaSafetyModule


# Remote code: transformers records only one auto class per model class, so every entry is written here.
AUTO_MAP = {
    "AutoConfig": "llava_next_safe_llava.SafeLlavaNextConfig",
    "AutoModel": "llava_next_safe_llava.SafeLlavaNextForConditionalGeneration",
    "AutoModelForImageTextToText": "llava_next_safe_llava.SafeLlavaNextForConditionalGeneration",
}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaNextConfig(SafetyConfigMixin, LlavaNextConfig):
    r"""
    Configuration of a [`SafeLlavaNextForConditionalGeneration`]: every field of [`LlavaNextConfig`] (anyres
    `image_grid_pinpoints` included) plus the safety fields of [`SafetyConfigMixin`]. The placeholder count of an
    image depends on its size (anyres), so it is the processor's to count; it grows by `num_llm_safety_tokens`.

    Example:

    ```python
    >>> from modeling_safe_llava import SafeLlavaNextConfig
    >>> config = SafeLlavaNextConfig(num_llm_safety_tokens=0)
    >>> config.image_grid_pinpoints[0]
    [336, 672]
    ```
    """

    model_type = "safe_llava_next"
    safety_auto_map = AUTO_MAP

    @property
    def safety_vision_dim(self) -> int:
        """The vision layer(s) LLaVA-NeXT projects, concatenated: `vision hidden size * number of layers`."""
        layers = self.vision_feature_layer
        return self.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaNextProcessor(SafetyProcessorMixin, LlavaNextProcessor):
    r"""
    [`LlavaNextProcessor`] for SafeLlava-NeXT: each `<image>` expands to `num_llm_safety_tokens` + the image's anyres
    feature count (base image, unpadded crops, one `image_newline` per row of the crop grid), the positions that
    [`SafeLlavaNextForConditionalGeneration`] fills with its LLM safety tokens and the packed image features.

    Args:
        num_llm_safety_tokens (`int`, *optional*, defaults to 0):
            Must equal the model's `config.num_llm_safety_tokens`.
        (the other arguments are [`LlavaNextProcessor`]'s.)
    """

    stock_class = LlavaNextProcessor
    stock_settings = ("patch_size", "vision_feature_select_strategy", "image_token", "num_additional_image_tokens")

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        num_llm_safety_tokens=0,
        **kwargs,
    ):
        # Every argument named: the saved processor_config.json holds the ones `__init__`'s signature names.
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            num_llm_safety_tokens=num_llm_safety_tokens,
            **kwargs,
        )

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Stock's anyres feature count plus the LLM safety tokens (counted once per image, before its features)."""
        return super()._get_number_of_features(orig_height, orig_width, height, width) + self.num_llm_safety_tokens


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SafeLlavaNextImageOutputs(BaseModelOutputWithPooling):
    r"""
    What [`SafeLlavaNextModel.get_image_features`] returns: stock's fields (`pooler_output` holds one packed
    `(num_llm_safety_tokens + tokens_i, text_hidden)` tensor per image; `hidden_states` one entry per crop), plus
    how many crops each image has. As a tuple it is stock's (the crop counts are left out), so that stock's
    `return_dict=False` outputs keep their shape where they carry the image outputs (transformers >= 5.24).

    crops_per_image (`torch.LongTensor` of shape `(num_images,)`, *optional*):
        Crops of each image in `hidden_states` (the base image plus its anyres crops), images in order.
    tokens_per_image (`torch.LongTensor` of shape `(num_images,)`, *optional*):
        Language-model positions of each image (LLM safety tokens included): its placeholders in `input_ids`.
    """

    crops_per_image: torch.LongTensor | None = None
    tokens_per_image: torch.LongTensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(value for name, value in self.items() if name not in _SAFETY_ONLY_IMAGE_FIELDS)


_SAFETY_ONLY_IMAGE_FIELDS = ("crops_per_image", "tokens_per_image")


@dataclass
class SafeLlavaNextModelOutputWithPast(LlavaNextModelOutputWithPast):
    r"""
    [`LlavaNextModelOutputWithPast`] plus the safety head's verdict, computed when the call encodes `pixel_values`.

    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*):
        Risk-level logits of each row (its riskiest crop).
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*):
        Risk-type logits of each row (its riskiest crop).
    images_per_row (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Images found in each row.
    """

    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeLlavaNextCausalLMOutputWithPast(LlavaNextCausalLMOutputWithPast):
    r"""
    [`LlavaNextCausalLMOutputWithPast`] plus the safety fields (after stock's, also in the `return_dict=False` tuple).

    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): Next-token cross-entropy, when `labels` is given.
    safety_loss (`torch.FloatTensor` of shape `()`, *optional*): `CE(level) + CE(type)`, when `safety_labels` is given.
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


class SafeLlavaNextPreTrainedModel(SafetyPreTrainedMixin, LlavaNextPreTrainedModel):
    config: SafeLlavaNextConfig
    config_class = SafeLlavaNextConfig
    _no_split_modules = ["SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]


class SafeLlavaNextModel(SafetyModelMixin, LlavaNextModel, SafeLlavaNextPreTrainedModel):
    """LLaVA-NeXT without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of
    each image's packed features by `get_image_features`, so stock's merge and generation handle them."""

    config: SafeLlavaNextConfig
    config_class = SafeLlavaNextConfig
    stock_class = LlavaNextModel
    safety_output_class = SafeLlavaNextModelOutputWithPast
    # Stock LLaVA-NeXT's forward never hands `output_hidden_states` / `output_attentions` to its vision tower: its
    # image outputs hold only the vision layer(s) it reads (transformers 5.25 returns them), and so do these.
    safety_passes_output_flags = False

    def __init__(self, config: SafeLlavaNextConfig):
        # LlavaNextModel's modules, then the safety module, then one post_init() (LlavaNextModel.__init__ would run
        # post_init() before the safety module exists).
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.safety_module = SafeLlavaSafetyModule(config)
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values, image_sizes=None, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        """
        LLaVA-NeXT's packed image features with the LLM safety tokens first ([`SafeLlavaNextImageOutputs`]):
        `hidden_states` also keeps the vision layer(s) the safety head reads when the language model is given others.
        """
        if image_sizes is None:  # stock raises a TypeError too, without saying what is missing
            raise TypeError(
                "LLaVA-NeXT images need `image_sizes` next to `pixel_values`: each image's (height, width) before anyres "
                "tiling, as the processor returns them (pass `**processor(images=..., text=...)`)."
            )
        safety_layers = _as_list(self.config.vision_feature_layer)
        if vision_feature_layer is not None and not kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = sorted({*_as_list(vision_feature_layer), *safety_layers})
        image_outputs = super().get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **{**kwargs, "return_dict": True},
        )
        features = self.add_llm_safety_tokens(image_outputs.pooler_output)
        device = features[0].device
        return SafeLlavaNextImageOutputs(
            **{**image_outputs, "pooler_output": features},
            crops_per_image=self.crops_per_image(image_sizes, device),
            tokens_per_image=torch.tensor([len(f) for f in features], dtype=torch.long, device=device),
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[FlashAttentionKwargs],
    ) -> SafeLlavaNextModelOutputWithPast:
        r"""Stock `LlavaNextModel.forward` restated (docs/bases.md, "What a `forward` names"), plus the safety logits
        ([`SafetyModelMixin.forward`], `output_safety`)."""
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=output_safety, image_sizes=image_sizes, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, use_cache=use_cache, **kwargs,
        )  # fmt: skip

    def encode_images_for_safety(self, pixel_values, image_sizes=None, **image_kwargs):
        """
        The vision tower alone, on every crop that stock encodes: what the verdict reads (each crop's hidden states,
        the crops and placeholder count of each image), without the projector and packing only the language model
        needs. The hidden states are the very ones `get_image_features` computes.
        """
        if image_sizes is None:
            raise TypeError(
                "LLaVA-NeXT images need `image_sizes` next to `pixel_values`: each image's (height, width) before anyres "
                "tiling, as the processor returns them (pass `**processor(images=..., text=...)`)."
            )
        crops = self.crops_per_image(image_sizes, pixel_values.device)
        if pixel_values.dim() == 5:  # (images, max crops, ...) padded: keep each image's own crops, as stock does
            pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, crops.tolist())])
        image_outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        return SafeLlavaNextImageOutputs(
            last_hidden_state=image_outputs.last_hidden_state,
            hidden_states=image_outputs.hidden_states,
            crops_per_image=crops,
            tokens_per_image=self.tokens_per_image(image_sizes, crops, pixel_values.device),
        )

    def tokens_per_image(self, image_sizes, crops_per_image, device=None) -> torch.LongTensor:
        """Language-model positions of each image, `(num_images,)`: stock's packing (base image, unpadded crops,
        `image_newline`s) counted on one-channel features, plus the LLM safety tokens."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        strategy = self.config.vision_feature_select_strategy
        tokens = side * side + (strategy != "default")  # CLS dropped for "default", as stock selects the features
        features = [torch.zeros(count, tokens, 1) for count in crops_per_image.tolist()]
        _, lengths = self.pack_image_features(features, image_sizes, strategy, image_newline=torch.zeros(1))
        return torch.as_tensor(lengths, dtype=torch.long).to(device) + self.config.num_llm_safety_tokens

    def crops_per_image(self, image_sizes, device=None) -> torch.LongTensor:
        """Crops of each image (the base image plus its anyres crops), `(num_images,)`, as stock counts them."""
        crop = self.config.vision_config.image_size
        counts = [image_size_to_num_patches(size, self.config.image_grid_pinpoints, crop) for size in image_sizes]
        return torch.tensor(counts, dtype=torch.long, device=device)

    def safety_vision_states(self, image_outputs) -> torch.Tensor:
        """Every crop's grid at `vision_feature_layer` (CLS dropped): `(num_crops_total, grid, grid, vision_dim)`."""
        layers = _as_list(self.config.vision_feature_layer)
        hidden_states = image_outputs.hidden_states
        selected = [hidden_states[layer] if hidden_states is not None else None for layer in layers]
        if any(hidden is None for hidden in selected):
            raise ValueError(
                f"The safety head reads vision layer(s) {layers}, which these image features do not carry; encode the "
                "images with this model's get_image_features (or pass pixel_values)."
            )
        if self.config.vision_feature_select_strategy == "default":
            selected = [hidden[:, 1:] for hidden in selected]
        states = torch.cat(selected, dim=-1)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return states.reshape(states.shape[0], side, side, states.shape[-1])

    def safety_units_per_image(self, image_outputs) -> torch.LongTensor:
        """The head judges every crop: an image's units are its crops (the base image first)."""
        crops = getattr(image_outputs, "crops_per_image", None)
        if crops is None:
            raise ValueError(
                "These pre-encoded images do not say how many anyres crops each image has, which the safety head needs "
                "to judge every crop; encode them with this model's get_image_features (or pass pixel_values)."
            )
        return crops

    def images_per_row(self, input_ids, inputs_embeds, image_outputs) -> torch.LongTensor:
        """Images in each row, `(batch_size,)`: each image takes its own number of placeholders (anyres), so rows are
        matched to images by running totals of placeholders and of per-image feature lengths."""
        placeholders = self.image_placeholders_per_row(input_ids, inputs_embeds)
        tokens = getattr(image_outputs, "tokens_per_image", None)
        if tokens is None:  # pre-encoded elsewhere: the packed features' lengths
            tokens = torch.tensor([len(f) for f in image_outputs.pooler_output])
        tokens = tokens.to(placeholders.device)
        ends = torch.searchsorted(tokens.cumsum(0), placeholders.cumsum(0), right=True)
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def image_placeholders_per_row(self, input_ids, inputs_embeds) -> torch.LongTensor:
        """Image placeholders in each row, `(batch_size,)`, in `input_ids` or, as stock finds them, `inputs_embeds`."""
        image_token_id = self.config.image_token_id
        if input_ids is not None:
            return (input_ids == image_token_id).sum(dim=1)
        image_embedding = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embedding).all(-1).sum(dim=1)


class SafeLlavaNextForConditionalGeneration(
    SafetyForConditionalGenerationMixin, LlavaNextForConditionalGeneration, SafeLlavaNextPreTrainedModel
):
    """
    LLaVA-NeXT with the safety module: the head judges every anyres crop of each image (the base image included), and
    a row's verdict is its riskiest crop, so that a risk visible only at crop resolution is caught (judging the base
    image alone missed it on a toy case: held-out AUROC 0.67 against 0.94, `benchmarks/llava_next_crops.py`).
    `forward` is stock's plus the safety logits; `generate` is stock's with the verdict in front.

    Example:

    ```python
    >>> processor = SafeLlavaNextProcessor.from_base("llava-hf/llava-v1.6-mistral-7b-hf", num_llm_safety_tokens=64)
    >>> model = SafeLlavaNextForConditionalGeneration.from_base("llava-hf/llava-v1.6-mistral-7b-hf", processor=processor)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety module
    ```
    """

    config: SafeLlavaNextConfig
    config_class = SafeLlavaNextConfig
    stock_class = LlavaNextForConditionalGeneration
    safety_output_class = SafeLlavaNextCausalLMOutputWithPast

    def __init__(self, config: SafeLlavaNextConfig):
        # Skip LlavaNextForConditionalGeneration.__init__ (it would build a stock LlavaNextModel).
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = SafeLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        safety_labels: torch.LongTensor | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeLlavaNextCausalLMOutputWithPast:
        r"""
        Stock `LlavaNextForConditionalGeneration.forward` restated (docs/bases.md, "What a `forward` names"), plus the
        safety logits and loss ([`SafetyForConditionalGenerationMixin.causal_lm_output`]).

        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`): each image's `(height, width)` before anyres.
        """
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache, mm_encoder_outputs=mm_encoder_outputs,
            output_safety=True if safety_labels is not None else output_safety, return_dict=True, **kwargs,
        )  # fmt: skip
        return self.causal_lm_output(outputs, labels, safety_labels, logits_to_keep, **kwargs)


def _as_list(layers) -> list[int]:
    return [layers] if isinstance(layers, int) else list(layers)


__all__ = [
    "SafeLlavaNextConfig",
    "SafeLlavaNextProcessor",
    "SafeLlavaNextPreTrainedModel",
    "SafeLlavaNextModel",
    "SafeLlavaNextForConditionalGeneration",
    "SafeLlavaNextModelOutputWithPast",
    "SafeLlavaNextCausalLMOutputWithPast",
]
