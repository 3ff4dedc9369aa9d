# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava: LLaVA-1.5 with the safety projector, safety tokens and safety head of arXiv 2405.13581.

This file is remote code: it is copied next to the weights on the Hub and imports only torch,
transformers and its sibling files (flat, relative imports).

Pipeline (LLaVA-1.5-7B shapes):

    pixel_values -> vision tower -> h_o (N_img, 576, 1024)   [vision_feature_layer, CLS dropped]
      |-> multi-modal projector -> h_i (N_img, 576, 4096)
      |      LLM input at each image: [llm_safety_tokens (64, 4096) ; h_i]      (640 positions)
      '-> safety projector -> h_s (N_img, 576, 4096)
             safety head: query = embedding of the row's first non-padding token,
             keys/values = [safety_tokens (64, 4096) ; h_s]
             -> level logits (N_img, 4), type logits (N_img, 7) -> riskiest image per row -> (B, 4), (B, 7)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils import logging

from .configuration_safe_llava import SafeLlavaConfig, check_action_list


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
SAFETY_PARAMETER_PREFIXES = ("model.safety_", "model.llm_safety_tokens")

# Stock llava-hf checkpoints use legacy key names (`language_model.model.*`, `language_model.lm_head.*`, ...).
# transformers renames them only for its own classes, so custom code must register the mapping itself,
# otherwise lm_head would silently stay randomly initialised.
register_checkpoint_conversion_mapping(
    "SafeLlavaForConditionalGeneration", get_checkpoint_conversion_mapping("llava"), overwrite=True
)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SafeLlavaModelOutputWithPast(ModelOutput):
    r"""
    Output of the headless [`SafeLlavaModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Hidden states of the language model's last layer.
        past_key_values (`Cache`, *optional*): The language model's key/value cache.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): Hidden states of every language-model layer.
        attentions (`tuple(torch.FloatTensor)`, *optional*): Attention weights of every language-model layer.
        image_hidden_states (`torch.FloatTensor` of shape `(num_images * image_seq_length, hidden_size)`, *optional*):
            What was scattered into the image positions: LLM safety tokens then projected patches, per image.
        safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*):
            Risk-level logits of each row (its riskiest image); computed when the call encodes images.
        safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*):
            Risk-type logits of each row (its riskiest image).
        images_per_row (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Images found in each row.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeLlavaCausalLMOutputWithPast(ModelOutput):
    r"""
    Output of [`SafeLlavaForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `lm_loss + config.safety_loss_weight * safety_loss` (each term only when its labels are given).
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*): Next-token cross-entropy, when `labels` is given.
        safety_loss (`torch.FloatTensor` of shape `()`, *optional*):
            `CE(level) + CE(type)` averaged over labelled rows, when `safety_labels` is given (0 if no row is labelled).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): Language-model logits.
        past_key_values (`Cache`, *optional*): The language model's key/value cache.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): Hidden states of every language-model layer.
        attentions (`tuple(torch.FloatTensor)`, *optional*): Attention weights of every language-model layer.
        image_hidden_states (`torch.FloatTensor` of shape `(num_images * image_seq_length, hidden_size)`, *optional*):
            What was scattered into the image positions.
        safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
        safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    safety_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None


@dataclass
class SafeLlavaSafetyAssessment(ModelOutput):
    r"""
    The safety head's verdict for each row of a batch (a row with several images takes its riskiest image).

    Args:
        level_probs (`torch.FloatTensor` of shape `(batch_size, num_levels)`): P(level) per row.
        type_probs (`torch.FloatTensor` of shape `(batch_size, num_types)`): P(type) per row.
        risk (`torch.FloatTensor` of shape `(batch_size,)`): `1 - P(level 0)`.
        threshold (`torch.FloatTensor` of shape `(batch_size,)`): The threshold applied to each row.
        flagged (`torch.BoolTensor` of shape `(batch_size,)`): `risk > threshold`.
        level (`torch.LongTensor` of shape `(batch_size,)`):
            For a flagged row its most likely risky level (1-3), else the most likely level.
        category (`torch.LongTensor` of shape `(batch_size,)`):
            For a flagged row its most likely risky type, else the most likely type.
        actions (`list[str]`): `"allow"`, `"hint"` or `"refuse"` per row.
        level_names (`list[str]`): Name of `level` per row.
        category_names (`list[str]`): Name of `category` per row.
        images_per_row (`torch.LongTensor` of shape `(batch_size,)`): Images found in each row (0: nothing assessed).
    """

    level_probs: torch.FloatTensor | None = None
    type_probs: torch.FloatTensor | None = None
    risk: torch.FloatTensor | None = None
    threshold: torch.FloatTensor | None = None
    flagged: torch.BoolTensor | None = None
    level: torch.LongTensor | None = None
    category: torch.LongTensor | None = None
    actions: list[str] | None = None
    level_names: list[str] | None = None
    category_names: list[str] | None = None
    images_per_row: torch.LongTensor | None = None

    def to_records(self) -> list[dict]:
        """One JSON-ready dict per row (for logs, audits and reports)."""
        return [
            {
                "risk": float(self.risk[row]),
                "flagged": bool(self.flagged[row]),
                "threshold": float(self.threshold[row]),
                "level": int(self.level[row]),
                "level_name": self.level_names[row],
                "category": int(self.category[row]),
                "category_name": self.category_names[row],
                "action": self.actions[row],
                "level_probs": [round(float(p), 6) for p in self.level_probs[row]],
                "type_probs": [round(float(p), 6) for p in self.type_probs[row]],
            }
            for row in range(len(self.actions))
        ]


@dataclass
class SafeLlavaGenerateOutput(ModelOutput):
    r"""
    What `generate(..., return_dict_in_generate=True)` returns.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size * num_return_sequences, prompt_length + new_tokens)`):
            The caller's prompt (unchanged, hints are internal) followed by each row's answer; refused rows hold the
            refusal, shorter answers are padded with `pad_token_id`.
        safety_assessment ([`SafeLlavaSafetyAssessment`]): The verdict per input row.
        lm_row_indices (`list[int]`): Input rows the language model generated for, in the order of the fields below.
        scores, logits, attentions, hidden_states, past_key_values: As in transformers' `GenerateDecoderOnlyOutput`,
            for the rows in `lm_row_indices` only (`None` when every row was refused).
    """

    sequences: torch.LongTensor | None = None
    safety_assessment: SafeLlavaSafetyAssessment | None = None
    lm_row_indices: list[int] | None = None
    scores: tuple[torch.FloatTensor] | None = None
    logits: tuple[torch.FloatTensor] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Cache | None = None


# ----------------------------------------------------------------------------------------------------------------
# Safety projector: Honeybee's C-Abstractor in plain torch (timm's RegStage/Bottleneck defaults), or an MLP
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `(batch, channels, height, width)` map."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.permute(0, 2, 3, 1)
        hidden_states = super().forward(hidden_states)
        return hidden_states.permute(0, 3, 1, 2)


class SafeLlavaSqueezeExcite(nn.Module):
    """Channel gating: global average pool -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, kernel_size=1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced_channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = hidden_states.mean(dim=(2, 3), keepdim=True)
        gate = self.fc2(self.act(self.fc1(gate)))
        return hidden_states * gate.sigmoid()


class SafeLlavaRegBlock(nn.Module):
    """timm's RegNet `Bottleneck` with bottle_ratio 1, group_size 1 (depthwise 3x3), SE 0.25, SiLU, LayerNorm2d."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm1 = SafeLlavaLayerNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, groups=out_channels, bias=False)
        self.norm2 = SafeLlavaLayerNorm2d(out_channels)
        self.squeeze_excite = SafeLlavaSqueezeExcite(out_channels, max(1, round(in_channels * 0.25)))
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)
        self.norm3 = SafeLlavaLayerNorm2d(out_channels)
        self.act = nn.SiLU()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), SafeLlavaLayerNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_states)
        hidden_states = self.act(self.norm1(self.conv1(hidden_states)))
        hidden_states = self.act(self.norm2(self.conv2(hidden_states)))
        hidden_states = self.squeeze_excite(hidden_states)
        hidden_states = self.norm3(self.conv3(hidden_states))
        return self.act(hidden_states + residual)


class SafeLlavaRegStage(nn.Sequential):
    """`depth` residual blocks; the first one changes the channel count."""

    def __init__(self, depth: int, in_channels: int, out_channels: int):
        blocks = [SafeLlavaRegBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(depth)]
        super().__init__(*blocks)


class SafeLlavaCAbstractor(nn.Module):
    """
    Honeybee's C-Abstractor: RegStage -> adaptive average pool -> RegStage -> 2-layer MLP readout.

    Input `(num_images, num_patches, vision_dim)` with a square patch grid; output
    `(num_images, num_patches, text_hidden_size)` (the paper keeps the 24x24 grid: nothing is pooled away).
    """

    def __init__(self, config: SafeLlavaConfig, input_dim: int):
        super().__init__()
        hidden = config.safety_projector_hidden_size
        self.grid_size = config.vision_config.image_size // config.vision_config.patch_size
        self.stage1 = SafeLlavaRegStage(config.safety_projector_depth, input_dim, hidden)
        self.pool = nn.AdaptiveAvgPool2d((self.grid_size, self.grid_size))
        self.stage2 = SafeLlavaRegStage(config.safety_projector_depth, hidden, hidden)
        self.readout_in = nn.Linear(hidden, config.text_config.hidden_size)
        self.readout_act = nn.SiLU()
        self.readout_out = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        num_images, num_patches, channels = vision_features.shape
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"The C-Abstractor needs a square patch grid, got {num_patches} patches per image; use "
                "vision_feature_select_strategy='default' (drops CLS) or safety_projector_type='mlp'."
            )
        grid = vision_features.transpose(1, 2).reshape(num_images, channels, side, side)  # (N, C, H, W)
        grid = self.stage2(self.pool(self.stage1(grid)))  # (N, hidden, grid, grid)
        tokens = grid.flatten(2).transpose(1, 2)  # (N, grid*grid, hidden)
        return self.readout_out(self.readout_act(self.readout_in(tokens)))


class SafeLlavaMLPSafetyProjector(nn.Module):
    """The cheap alternative: the same 2-layer MLP shape as LLaVA's own projector."""

    def __init__(self, config: SafeLlavaConfig, input_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(input_dim, config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(vision_features)))


SAFETY_PROJECTOR_CLASSES = {"cabstractor": SafeLlavaCAbstractor, "mlp": SafeLlavaMLPSafetyProjector}


# ----------------------------------------------------------------------------------------------------------------
# Safety head: cross-attention from one text query to [safety tokens ; safety features], then two classifiers
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaSafetyHead(nn.Module):
    """
    Multi-head cross-attention (query: one text embedding per image; keys/values: the head's safety tokens followed
    by the safety projector's output) and two linear classifiers, for the risk level and the risk type.
    """

    def __init__(self, config: SafeLlavaConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.num_heads = config.safety_head_num_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.level_classifier = nn.Linear(hidden, len(config.safety_level_labels))
        self.category_classifier = nn.Linear(hidden, len(config.safety_type_labels))

    def forward(self, query: torch.Tensor, keys_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: `(num_images, hidden)`, the text embedding each image is judged with.
            keys_values: `(num_images, num_keys, hidden)`.

        Returns:
            level logits `(num_images, num_levels)` and type logits `(num_images, num_types)`.
        """
        num_images, num_keys, hidden = keys_values.shape
        q = self.q_proj(query).view(num_images, self.num_heads, 1, self.head_dim)
        k = self.k_proj(keys_values).view(num_images, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(keys_values).view(num_images, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, head_dim)
        pooled = self.o_proj(attended.reshape(num_images, hidden))
        return self.level_classifier(pooled), self.category_classifier(pooled)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: SafeLlavaConfig
    config_class = SafeLlavaConfig
    _no_split_modules = ["SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # Bare parameters are not covered by the generic init: without this they would keep uninitialised memory
        # whenever a checkpoint lacks them (e.g. when converting a stock LLaVA checkpoint).
        if isinstance(module, SafeLlavaModel):
            init.normal_(module.safety_tokens, mean=0.0, std=0.02)
            if module.llm_safety_tokens is not None:
                init.normal_(module.llm_safety_tokens, mean=0.0, std=0.02)


class SafeLlavaModel(LlavaModel, SafeLlavaPreTrainedModel):
    """
    LLaVA without the language-modeling head, plus the safety modules. The LLM safety tokens are put in front of
    each image's projected features by `get_image_features`, so stock LLaVA's merge and generation code handle
    them like image positions.
    """

    config: SafeLlavaConfig
    config_class = SafeLlavaConfig

    def __init__(self, config: SafeLlavaConfig):
        super().__init__(config)  # builds the vision tower, projector and language model, then post_init()
        text_hidden = config.text_config.hidden_size
        projector_input_dim = config.vision_config.hidden_size * self._num_vision_feature_layers()
        self.safety_projector = SAFETY_PROJECTOR_CLASSES[config.safety_projector_type](config, projector_input_dim)
        self.safety_tokens = nn.Parameter(torch.zeros(config.num_safety_tokens, text_hidden))
        if config.num_llm_safety_tokens > 0:
            self.llm_safety_tokens = nn.Parameter(torch.zeros(config.num_llm_safety_tokens, text_hidden))
        else:
            self.register_parameter("llm_safety_tokens", None)
        self.safety_head = SafeLlavaSafetyHead(config)
        # LlavaModel.__init__ already ran post_init() and marked this module initialised, which would skip
        # _init_weights for the safety tokens created since (they would stay all zeros).
        self._is_hf_initialized = False
        self.post_init()

    def _num_vision_feature_layers(self) -> int:
        layer = self.config.vision_feature_layer
        return 1 if isinstance(layer, int) else len(layer)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Runs the vision tower and LLaVA's projector once. `pooler_output` is a list with one
        `(num_llm_safety_tokens + num_patches, text_hidden)` tensor per image (LLM safety tokens first);
        `hidden_states` keeps the vision layer(s) the safety projector reads.
        """
        kwargs["return_dict"] = True
        image_outputs = super().get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            **kwargs,
        )
        if self.llm_safety_tokens is not None:
            image_outputs.pooler_output = [
                torch.cat([self.llm_safety_tokens.to(features.dtype), features], dim=0)
                for features in image_outputs.pooler_output
            ]
        return image_outputs

    def select_vision_features(self, image_outputs: BaseModelOutputWithPooling) -> torch.Tensor:
        """The vision features LLaVA projects, `(num_images, num_patches, vision_dim * num_layers)`."""
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        selected = [image_outputs.hidden_states[layer] for layer in layers]
        if self.config.vision_feature_select_strategy == "default":
            selected = [hidden[:, 1:] for hidden in selected]
        return torch.cat(selected, dim=-1)

    def count_images_per_row(self, input_ids: torch.LongTensor, num_images: int) -> torch.LongTensor:
        """Images in each row, from its `<image>` placeholders; raises if they do not add up to `num_images`."""
        placeholders = (input_ids == self.config.image_token_id).sum(dim=1)
        per_image = self.config.image_seq_length
        if bool((placeholders % per_image).any()) or int(placeholders.sum()) != num_images * per_image:
            raise ValueError(
                f"Image features and image tokens do not match: {num_images} image(s) need "
                f"{num_images * per_image} <image> placeholders ({per_image} each: "
                f"{self.config.num_llm_safety_tokens} LLM safety tokens + patches), the rows hold "
                f"{placeholders.tolist()}. Build inputs with SafeLlavaProcessor for this model's config."
            )
        return placeholders // per_image

    def first_token_embeddings(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embedding of each row's first non-padding token, `(batch, hidden)`: the safety head's query."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch_size = reference.shape[0]
        if attention_mask is None:
            first = torch.zeros(batch_size, dtype=torch.long, device=reference.device)
        else:
            first = attention_mask.to(torch.long).argmax(dim=1)  # index of the first 1 in each row
        rows = torch.arange(batch_size, device=reference.device)
        if input_ids is not None:
            return self.get_input_embeddings()(input_ids[rows, first])
        return inputs_embeds[rows, first]

    def get_safety_logits(
        self,
        image_outputs: BaseModelOutputWithPooling,
        images_per_row: torch.LongTensor,
        query_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Runs the safety projector and head on already-encoded images and reduces them to one verdict per row.

        Args:
            image_outputs: from `get_image_features` (its `hidden_states` hold the vision features).
            images_per_row: `(batch,)` image count of each row; images are in row order.
            query_embeds: `(batch, hidden)` from `first_token_embeddings`.

        Returns:
            `(batch, num_levels)` level logits and `(batch, num_types)` type logits of each row's riskiest image.
            A row without images gets a certain "level 0, clean" verdict (there is no image to judge).
        """
        vision_features = self.select_vision_features(image_outputs)
        safety_features = self.safety_projector(vision_features.to(self.safety_tokens.dtype))  # (N, L, hidden)
        num_images = safety_features.shape[0]
        tokens = self.safety_tokens.unsqueeze(0).expand(num_images, -1, -1)
        keys_values = torch.cat([tokens, safety_features], dim=1)  # (N, num_safety_tokens + L, hidden)
        image_rows = torch.repeat_interleave(torch.arange(len(images_per_row), device=images_per_row.device), images_per_row)
        query = query_embeds.to(keys_values.dtype)[image_rows.to(query_embeds.device)]
        image_level_logits, image_type_logits = self.safety_head(query, keys_values)
        _check_finite_safety_logits(image_level_logits, image_type_logits, image_rows)
        return self._riskiest_image_per_row(image_level_logits, image_type_logits, image_rows, len(images_per_row))

    def _riskiest_image_per_row(self, level_logits, type_logits, image_rows, batch_size):
        num_levels, num_types = level_logits.shape[-1], type_logits.shape[-1]
        fill = torch.finfo(level_logits.dtype).min
        row_level = level_logits.new_full((batch_size, num_levels), fill)
        row_type = type_logits.new_full((batch_size, num_types), fill)
        row_level[:, 0] = 0.0
        row_type[:, -1] = 0.0
        if level_logits.shape[0] == 0:
            return row_level, row_type
        image_risk = 1.0 - level_logits.float().softmax(-1)[:, 0]
        image_rows = image_rows.to(level_logits.device)
        best_risk = torch.full((batch_size,), -1.0, device=level_logits.device)
        best_risk = best_risk.scatter_reduce(0, image_rows, image_risk, reduce="amax")
        # The first image of a row that reaches the row's maximum risk (ties: earliest image wins).
        is_best = image_risk >= best_risk[image_rows]
        image_index = torch.arange(len(image_rows), device=level_logits.device)
        chosen = torch.full((batch_size,), len(image_rows), device=level_logits.device)
        chosen = chosen.scatter_reduce(0, image_rows[is_best], image_index[is_best], reduce="amin")
        has_image = chosen < len(image_rows)
        chosen = chosen.clamp(max=len(image_rows) - 1)
        row_level = torch.where(has_image[:, None], level_logits[chosen], row_level)
        row_type = torch.where(has_image[:, None], type_logits[chosen], row_type)
        return row_level, row_type

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
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
            images arrive pre-encoded in `mm_encoder_outputs` (as inside `generate`, which judges them beforehand).
        """
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs, not both.")
        if output_safety is None:
            output_safety = pixel_values is not None
        if pixel_values is not None:
            mm_encoder_outputs = {
                "image": self.get_image_features(
                    pixel_values,
                    vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=vision_feature_select_strategy,
                    image_sizes=image_sizes,
                )
            }
        image_outputs = (mm_encoder_outputs or {}).get("image")
        images_per_row = None
        if image_outputs is not None and input_ids is not None:
            images_per_row = self.count_images_per_row(input_ids, len(image_outputs.pooler_output))

        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **{**kwargs, "return_dict": True},
        )

        level_logits = type_logits = None
        if output_safety and image_outputs is not None:
            if images_per_row is None:
                raise ValueError("The safety head needs input_ids to find which row each image belongs to.")
            query = self.first_token_embeddings(input_ids, inputs_embeds, attention_mask)
            level_logits, type_logits = self.get_safety_logits(image_outputs, images_per_row, query)

        return SafeLlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            safety_level_logits=level_logits,
            safety_type_logits=type_logits,
            images_per_row=images_per_row,
        )


class SafeLlavaForConditionalGeneration(LlavaForConditionalGeneration, SafeLlavaPreTrainedModel):
    """
    SafeLlava with the language-modeling head: LLaVA-1.5 whose answers are steered by the safety head's verdict.

    Example:

    ```python
    >>> model = SafeLlavaForConditionalGeneration.from_llava("llava-hf/llava-1.5-7b-hf")  # safety modules untrained
    >>> processor = SafeLlavaProcessor.from_llava("llava-hf/llava-1.5-7b-hf", num_llm_safety_tokens=64)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety modules
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

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_llava(cls, model_or_path, processor=None, **config_overrides):
        """
        Builds a SafeLlava from a stock `LlavaForConditionalGeneration` (instance, local folder or Hub id). Every stock
        weight is kept bit-identical; the safety modules are freshly initialised (and marked untrained).

        Args:
            model_or_path: a `LlavaForConditionalGeneration`, or anything `from_pretrained` accepts.
            processor: optional `SafeLlavaProcessor` whose tokenizer encodes the safety texts (see
                `tokenize_safety_texts`).
            config_overrides: `SafeLlavaConfig` fields, e.g. `num_llm_safety_tokens=0` or
                `safety_hints=...`; `from_pretrained` kwargs such as `dtype` are passed on when loading a path.
        """
        load_kwargs = {k: config_overrides.pop(k) for k in _LOAD_KWARGS if k in config_overrides}
        if isinstance(model_or_path, LlavaForConditionalGeneration):
            model = cls._from_llava_model(model_or_path, config_overrides)
        else:
            model = cls._from_llava_checkpoint(model_or_path, config_overrides, load_kwargs)
        model.generation_config = _generation_config_with_threshold(model.generation_config, model.config)
        if processor is not None:
            model.tokenize_safety_texts(processor)
        return model

    @classmethod
    def _from_llava_model(cls, llava, config_overrides):
        config = SafeLlavaConfig(**_llava_config_dict(llava.config), **config_overrides)
        model = cls(config).to(dtype=llava.dtype, device=llava.device)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        _check_only_safety_weights_missing(missing, unexpected)
        model.generation_config = GenerationConfig.from_dict(llava.generation_config.to_dict())
        return model

    @classmethod
    def _from_llava_checkpoint(cls, path, config_overrides, load_kwargs):
        from transformers import AutoConfig

        llava_config = AutoConfig.from_pretrained(path, **{k: v for k, v in load_kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")})
        if llava_config.model_type != "llava":
            raise ValueError(f"from_llava expects a 'llava' checkpoint, {path!r} has model_type {llava_config.model_type!r}.")
        config = SafeLlavaConfig(**_llava_config_dict(llava_config), **config_overrides)
        model, info = super().from_pretrained(path, config=config, output_loading_info=True, **_safetensors_only(load_kwargs))
        _check_only_safety_weights_missing(info["missing_keys"], info["unexpected_keys"])
        model.config.safety_modules_trained = False
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus a loud warning (and `safety_modules_trained=False`) when the
        checkpoint lacks safety weights, so that a half-loaded model can never pass for a trained one. Weights are
        read from safetensors files only (never a pickle)."""
        kwargs = _safetensors_only(kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing_safety = sorted(k for k in info["missing_keys"] if k.startswith(SAFETY_PARAMETER_PREFIXES))
        if missing_safety:
            logger.warning(
                "The checkpoint has no weights for these safety parameters, which were freshly initialised and "
                "are untrained: %s. Safety-aware generation will refuse to run until they are trained.",
                ", ".join(missing_safety),
            )
            model.config.safety_modules_trained = False
        return (model, info) if want_info else model

    # -- safety texts and decisions ----------------------------------------------------------------------------

    def tokenize_safety_texts(self, processor) -> dict:
        """Encodes the configured hints, refusals and the assistant-turn marker with `processor`'s tokenizer and
        stores them in `config.safety_text_token_ids` (saved with the model), so `generate` needs no tokenizer."""
        self.config.safety_text_token_ids = processor.encode_safety_texts(
            hints=self.config.safety_hints, refusals=self.config.safety_refusals
        )
        return self.config.safety_text_token_ids

    def resolve_safety_threshold(self, safety_threshold=None) -> torch.Tensor:
        """
        Turns the `safety_threshold` argument into one threshold per risky type, `(num_types - 1,)`.

        Accepted: `None` (the default saved in the generation config), a number in [0, 1], or a dict
        `{risky type name: number in [0, 1]}` (types left out keep the default).
        """
        default = getattr(self.generation_config, "safety_threshold", None)
        default = self.config.safety_threshold if default is None else default
        risky = self.config.risky_type_labels
        accepted = "None, a number in [0, 1], or a dict {risky type name: number in [0, 1]}"
        if safety_threshold is None:
            safety_threshold = default
        if isinstance(safety_threshold, dict):
            unknown = sorted(set(safety_threshold) - set(risky), key=str)
            if unknown:
                raise ValueError(f"safety_threshold has unknown categories {unknown}; accepted names: {risky}.")
            values = [safety_threshold.get(name, default) for name in risky]
        else:
            values = [safety_threshold] * len(risky)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"safety_threshold {value!r} cannot be applied; accepted: {accepted}.")
        return torch.tensor([float(v) for v in values])

    def resolve_safety_actions(self, safety_actions=None) -> dict:
        """The configured `safety_actions`, with call-time overrides `{type name: action or list of 4}` applied."""
        actions = {name: list(per_level) for name, per_level in self.config.safety_actions.items()}
        if safety_actions is None:
            return actions
        if not isinstance(safety_actions, dict):
            raise ValueError(
                f"safety_actions must be a dict {{risky type name: action or list of 4 actions}}, got "
                f"{type(safety_actions).__name__}."
            )
        unknown = sorted(set(safety_actions) - set(actions), key=str)
        if unknown:
            raise ValueError(f"safety_actions has unknown categories {unknown}; accepted: {list(actions)}.")
        for name, per_level in safety_actions.items():
            actions[name] = check_action_list(name, per_level)
        return actions

    def decide(self, level_logits, type_logits, images_per_row, safety_threshold=None, safety_actions=None):
        """Applies the threshold and the per-category policy to safety logits: a [`SafeLlavaSafetyAssessment`]."""
        thresholds = self.resolve_safety_threshold(safety_threshold)
        actions = self.resolve_safety_actions(safety_actions)
        return decide_safety_actions(
            (level_logits.float() / self.config.safety_level_temperature).softmax(-1),
            (type_logits.float() / self.config.safety_type_temperature).softmax(-1),
            thresholds,
            actions,
            self.config.safety_level_labels,
            self.config.safety_type_labels,
            images_per_row,
        )

    def check_safety_ready(self, allow_untrained_safety: bool = False):
        """Fails closed: safety-aware calls on untrained safety modules raise unless explicitly allowed. Only the
        boolean `True` counts (a string such as `"False"` is truthy and must not unlock anything)."""
        if not isinstance(allow_untrained_safety, bool):
            raise ValueError(f"allow_untrained_safety must be True or False, got {allow_untrained_safety!r}.")
        if self.config.safety_modules_trained is not True and not allow_untrained_safety:
            raise ValueError(
                "The safety modules of this model are untrained (config.safety_modules_trained is "
                f"{self.config.safety_modules_trained!r}), so its safety verdicts are random. Train them (stage 1) or "
                "load a trained checkpoint; pass allow_untrained_safety=True only for tests and debugging."
            )

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
        The safety verdict alone: vision tower, safety projector and safety head, never the language model.
        Takes the processor's output (`**inputs`) and the same `safety_threshold` / `safety_actions` as `generate`.
        """
        self.check_safety_ready(allow_untrained_safety)
        if pixel_values is None:
            raise ValueError("assess_safety needs pixel_values: there is no image to assess.")
        level_logits, type_logits, images_per_row, _ = self._judge_images(
            input_ids, pixel_values, attention_mask, image_sizes, for_language_model=False
        )
        return self.decide(level_logits, type_logits, images_per_row, safety_threshold, safety_actions)

    def safety_forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        safety_labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **unused_batch_fields,
    ) -> SafeLlavaCausalLMOutputWithPast:
        """
        The safety branch alone (vision tower, safety projector, safety head; no language model), with gradients.
        Returns `loss = safety_loss_weight * safety_loss` when `safety_labels` is given, and the safety logits.
        Stage 1 can train on it when the LLM safety tokens stay frozen: it skips the language model's cost.
        """
        level_logits, type_logits, images_per_row, _ = self._judge_images(
            input_ids, pixel_values, attention_mask, image_sizes, for_language_model=False
        )
        safety_loss = loss = None
        if safety_labels is not None:
            safety_loss = self.safety_loss(level_logits, type_logits, safety_labels, images_per_row)
            loss = self.config.safety_loss_weight * safety_loss
        return SafeLlavaCausalLMOutputWithPast(
            loss=loss, safety_loss=safety_loss, safety_level_logits=level_logits, safety_type_logits=type_logits
        )

    def _judge_images(self, input_ids, pixel_values, attention_mask, image_sizes=None, for_language_model=True):
        """
        One vision pass: (level logits, type logits, images per row, image outputs). With `for_language_model`, the
        image outputs also hold what the language model needs (LLaVA's projection, LLM safety tokens first), so
        `generate` reuses them; without it only the vision tower runs, which is all the safety head reads.
        """
        if input_ids is None:
            raise ValueError("Safety-aware calls need input_ids (inputs_embeds cannot show where images are).")
        check_model_inputs(self, input_ids, pixel_values, attention_mask, max_length=None)
        if for_language_model:
            image_outputs = self.model.get_image_features(pixel_values, image_sizes=image_sizes)
        else:
            image_outputs = self.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        images_per_row = self.model.count_images_per_row(input_ids, pixel_values.shape[0])
        query = self.model.first_token_embeddings(input_ids, None, attention_mask)
        level_logits, type_logits = self.model.get_safety_logits(image_outputs, images_per_row, query)
        return level_logits, type_logits, images_per_row, image_outputs

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
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
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; -100 is ignored.
        safety_labels (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            `(level, type)` per row; a row whose two labels are -100 adds no safety loss.
        output_safety (`bool`, *optional*):
            Run the safety head (default: when `pixel_values` is given, or when `safety_labels` is given).
        """
        if safety_labels is not None:
            output_safety = True
            if pixel_values is None and mm_encoder_outputs is None:
                raise ValueError("safety_labels were given without pixel_values: there is no image to classify.")
        if past_key_values is None:  # a whole sequence (not a decoding step): check it as it enters
            check_model_inputs(self, input_ids, pixel_values, attention_mask)
            if mm_encoder_outputs is None:
                check_placeholders_have_images(self, input_ids, pixel_values)
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
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        lm_loss = safety_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = lm_loss
        if safety_labels is not None:
            safety_loss = self.safety_loss(
                outputs.safety_level_logits, outputs.safety_type_logits, safety_labels, outputs.images_per_row
            )
            weighted = self.config.safety_loss_weight * safety_loss
            loss = weighted if loss is None else loss + weighted

        return SafeLlavaCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            safety_loss=safety_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            safety_level_logits=outputs.safety_level_logits,
            safety_type_logits=outputs.safety_type_logits,
        )

    def safety_loss(self, level_logits, type_logits, safety_labels, images_per_row) -> torch.Tensor:
        """`CE(level) + CE(type)`, each averaged over the rows that carry that label (-100 rows add nothing)."""
        batch_size = level_logits.shape[0]
        if (
            not isinstance(safety_labels, torch.Tensor)
            or safety_labels.dtype not in (torch.int64, torch.int32)
            or tuple(safety_labels.shape) != (batch_size, 2)
        ):
            shape = tuple(safety_labels.shape) if isinstance(safety_labels, torch.Tensor) else type(safety_labels).__name__
            raise ValueError(
                f"safety_labels must be an integer tensor of shape (batch_size, 2) = ({batch_size}, 2) holding "
                f"(level, type) per row, -100 for none; got {shape}."
            )
        safety_labels = safety_labels.to(level_logits.device, torch.long)
        _check_label_range("level", safety_labels[:, 0], level_logits.shape[-1])
        _check_label_range("type", safety_labels[:, 1], type_logits.shape[-1])
        labelled_without_image = (safety_labels != IGNORE_INDEX).any(dim=1) & (images_per_row.to(safety_labels.device) == 0)
        if bool(labelled_without_image.any()):
            rows = labelled_without_image.nonzero().flatten().tolist()
            raise ValueError(f"Rows {rows} have safety labels but no image: label them -100 or add their image.")
        return _masked_cross_entropy(level_logits, safety_labels[:, 0]) + _masked_cross_entropy(
            type_logits, safety_labels[:, 1]
        )

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        safety_threshold=None,
        safety_actions: dict | None = None,
        allow_untrained_safety: bool = False,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` with the safety head in front. Images are encoded once: the safety head judges
        them, then the language model reuses the same features.

        Args:
            safety_threshold (`None`, `float` or `dict[str, float]`, *optional*):
                A row is flagged iff `risk = 1 - P(level 0)` exceeds the threshold of its most likely risky type.
                `None` uses the default saved in the generation config; a dict sets thresholds per type.
            safety_actions (`dict[str, str | list[str]]`, *optional*):
                Call-time overrides of `config.safety_actions`, e.g. `{"Illegal Risk": "allow"}`.
            allow_untrained_safety (`bool`, *optional*, defaults to `False`):
                Run even though `config.safety_modules_trained` is False (tests and debugging only).

        Returns:
            Like `GenerationMixin.generate`: the caller's prompt followed by each row's answer (a refused row
            holds the refusal; a hinted row's hint is internal). With `return_dict_in_generate=True`, a
            [`SafeLlavaGenerateOutput`] that also carries the [`SafeLlavaSafetyAssessment`].
        """
        max_new_tokens = kwargs.get("max_new_tokens")
        check_model_inputs(self, input_ids, pixel_values, attention_mask, max_length=max_new_tokens or 0)
        if pixel_values is None:
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError(
                    "generate judges images from pixel_values; pre-encoded mm_encoder_outputs would reach the "
                    "language model without a safety verdict. Pass pixel_values instead."
                )
            check_placeholders_have_images(self, input_ids, pixel_values)
            # Nothing to judge: stock generation (text-only rows).
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.check_safety_ready(allow_untrained_safety)
        generation_config = kwargs.get("generation_config")
        if safety_threshold is None and generation_config is not None:
            # A threshold set on the generation config passed to this call wins over the model's default.
            safety_threshold = getattr(generation_config, "safety_threshold", None)
        vision_kwargs = {k: kwargs.pop(k) for k in ("vision_feature_layer", "vision_feature_select_strategy") if k in kwargs}
        if vision_kwargs:
            raise ValueError(
                f"{sorted(vision_kwargs)} cannot change at generation time: the safety head was trained on "
                "config.vision_feature_layer / vision_feature_select_strategy."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        level_logits, type_logits, images_per_row, image_outputs = self._judge_images(
            input_ids, pixel_values, attention_mask, kwargs.pop("image_sizes", None)
        )
        assessment = self.decide(level_logits, type_logits, images_per_row, safety_threshold, safety_actions)
        plan = _SafetyPlan(self, input_ids, attention_mask, images_per_row, assessment, kwargs)
        return plan.run(image_outputs)


# ----------------------------------------------------------------------------------------------------------------
# Decision rule and generation plan (no learned parameters)
# ----------------------------------------------------------------------------------------------------------------


def decide_safety_actions(
    level_probs: torch.Tensor,
    type_probs: torch.Tensor,
    thresholds: torch.Tensor,
    actions: dict,
    level_names: list[str],
    type_names: list[str],
    images_per_row: torch.Tensor | None = None,
) -> SafeLlavaSafetyAssessment:
    """
    The decision rule of `safety_threshold` (DESIGN.md section 2), as a pure function of probabilities.

    - `risk = 1 - P(level 0)`.
    - A row's category is its most likely *risky* type (the clean type excluded), its threshold that type's.
    - Flagged iff `risk > threshold`: raising any threshold never adds a flag (the category does not depend on it).
    - A flagged row takes `actions[category][most likely risky level]`; an unflagged row is allowed.
    - Non-finite probabilities raise: `nan > threshold` is False, so they would silently allow the row.
    """
    for name, probs in (("level_probs", level_probs), ("type_probs", type_probs)):
        bad_rows = (~torch.isfinite(probs).all(dim=-1)).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError(f"{name} of rows {bad_rows} are not finite; no safety decision can be made for them.")
    risk = 1.0 - level_probs[:, 0]
    risky_category = type_probs[:, :-1].argmax(dim=-1)
    threshold = thresholds.to(risk.device, risk.dtype)[risky_category]
    flagged = risk > threshold
    risky_level = level_probs[:, 1:].argmax(dim=-1) + 1
    level = torch.where(flagged, risky_level, level_probs.argmax(dim=-1))
    category = torch.where(flagged, risky_category, type_probs.argmax(dim=-1))
    row_actions = [
        actions[type_names[int(c)]][int(lvl)] if bool(f) else "allow" for f, c, lvl in zip(flagged, category, level)
    ]
    return SafeLlavaSafetyAssessment(
        level_probs=level_probs,
        type_probs=type_probs,
        risk=risk,
        threshold=threshold,
        flagged=flagged,
        level=level,
        category=category,
        actions=row_actions,
        level_names=[level_names[int(i)] for i in level],
        category_names=[type_names[int(i)] for i in category],
        images_per_row=images_per_row,
    )


class _SafetyPlan:
    """Carries out one `generate` call's verdicts: allowed rows as LLaVA would, hinted rows with the safe hint
    before the assistant turn, refused rows without the language model. Each row gets what it would get alone."""

    def __init__(self, model, input_ids, attention_mask, images_per_row, assessment, generate_kwargs):
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.images_per_row = images_per_row.tolist()
        self.assessment = assessment
        self.kwargs = generate_kwargs
        generation_config = generate_kwargs.get("generation_config") or model.generation_config
        self.num_return = generate_kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1
        self.return_dict = generate_kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate)
        self.max_new_tokens = generate_kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        eos = generation_config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)

    def run(self, image_outputs):
        actions = self.assessment.actions
        lm_rows = [row for row, action in enumerate(actions) if action != "refuse"]
        if all(action == "allow" for action in actions):
            # Fast path: exactly stock generation on the whole batch, reusing the encoded images.
            output = self._generate(self.input_ids, self.attention_mask, image_outputs)
            return self._wrap(output, list(range(len(actions))), self._sequences_of(output))
        lm_output, new_tokens = None, {}
        if lm_rows:
            prompt_ids, prompt_mask = self._lm_prompts(lm_rows)
            lm_output = self._generate(prompt_ids, prompt_mask, _select_images(image_outputs, self.images_per_row, lm_rows))
            generated = self._sequences_of(lm_output)[:, prompt_ids.shape[1] :]
            for i, row in enumerate(lm_rows):
                new_tokens[row] = [generated[i * self.num_return + k] for k in range(self.num_return)]
        self._stream_refusal_if_needed(actions)
        return self._wrap(lm_output, lm_rows, self._assemble(new_tokens))

    def _generate(self, input_ids, attention_mask, image_outputs):
        return super(SafeLlavaForConditionalGeneration, self.model).generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_encoder_outputs={"image": image_outputs},
            **self.kwargs,
        )

    def _lm_prompts(self, rows):
        """Unpadded prompts of `rows` (hint inserted where asked), left-padded together."""
        prompts = []
        for row in rows:
            prompt = self.input_ids[row][self.attention_mask[row].bool()]
            if self.assessment.actions[row] == "hint":
                prompt = self._insert_hint(prompt, row)
            prompts.append(prompt)
        width = max(len(p) for p in prompts)
        ids = self.input_ids.new_full((len(prompts), width), self.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = prompt
            mask[i, width - len(prompt) :] = 1
        return ids, mask

    def _insert_hint(self, prompt, row):
        texts = self._text_token_ids()
        category = self.assessment.category_names[row]
        level = int(self.assessment.level[row])
        hint = texts["hints"].get(category, [[]] * 4)[level]
        if not hint:
            raise ValueError(
                f"No safe-hint text for ({category!r}, level {level}); set config.safety_hints (a preset from "
                "processors/) and call model.tokenize_safety_texts(processor), or choose another action."
            )
        marker = texts["assistant_prefix"]
        if len(prompt) < len(marker) or prompt[-len(marker) :].tolist() != marker:
            raise ValueError(
                f"Cannot place the safe hint in row {row}: the prompt does not end with the assistant-turn marker "
                f"{marker}. Build prompts with processor.apply_chat_template(..., add_generation_prompt=True)."
            )
        hint = torch.tensor(hint, dtype=prompt.dtype, device=prompt.device)
        return torch.cat([prompt[: -len(marker)], hint, prompt[-len(marker) :]])

    def _refusal(self, row):
        texts = self._text_token_ids()
        category = self.assessment.category_names[row]
        refusal = texts["refusals"].get(category)
        if not refusal:
            raise ValueError(
                f"No refusal text for {category!r}; set config.safety_refusals (a preset from processors/) and call "
                "model.tokenize_safety_texts(processor)."
            )
        tokens = list(refusal) + ([self.eos_token_id] if self.eos_token_id is not None else [])
        if self.max_new_tokens is not None:
            tokens = tokens[: self.max_new_tokens]
        return torch.tensor(tokens, dtype=self.input_ids.dtype, device=self.input_ids.device)

    def _text_token_ids(self):
        texts = self.model.config.safety_text_token_ids
        if not texts:
            raise ValueError(
                "This model has no tokenized safety texts (config.safety_text_token_ids is empty), so it cannot "
                "hint or refuse. Call model.tokenize_safety_texts(processor) once after setting the texts."
            )
        return texts

    def _assemble(self, new_tokens):
        """Caller's prompt + each row's answer, answers right-padded to the longest one."""
        answers = []
        for row, action in enumerate(self.assessment.actions):
            answers.extend(new_tokens[row] if action != "refuse" else [self._refusal(row)] * self.num_return)
        width = max(len(a) for a in answers)
        out = self.input_ids.new_full((len(answers), self.input_ids.shape[1] + width), self.pad_token_id)
        prompts = self.input_ids.repeat_interleave(self.num_return, dim=0)
        out[:, : prompts.shape[1]] = prompts
        for i, answer in enumerate(answers):
            out[i, prompts.shape[1] : prompts.shape[1] + len(answer)] = answer
        return out

    def _stream_refusal_if_needed(self, actions):
        streamer = self.kwargs.get("streamer")
        if streamer is None or actions != ["refuse"]:
            return
        streamer.put(self.input_ids.cpu())
        streamer.put(self._refusal(0).cpu())
        streamer.end()

    def _sequences_of(self, output):
        return output.sequences if isinstance(output, ModelOutput) else output

    def _wrap(self, lm_output, lm_rows, sequences):
        if not self.return_dict:
            return sequences
        fields = {}
        if lm_output is not None:
            for name in ("scores", "logits", "attentions", "hidden_states", "past_key_values"):
                fields[name] = getattr(lm_output, name, None)
        return SafeLlavaGenerateOutput(
            sequences=sequences, safety_assessment=self.assessment, lm_row_indices=lm_rows, **fields
        )


def check_model_inputs(model, input_ids=None, pixel_values=None, attention_mask=None, max_length: int | None = 0):
    """
    Rejects, with a message naming the bad input, what would otherwise crash deep inside torch or give a silently
    wrong result.

    Args:
        model: the [`SafeLlavaForConditionalGeneration`] the inputs are meant for.
        input_ids: `(batch_size, sequence_length)` int64/int32 token ids of this model's tokenizer.
        pixel_values: `(num_images, num_channels, height, width)` floating point, as the processor returns them.
        attention_mask: `(batch_size, sequence_length)`, every row attending to at least one token.
        max_length: `None` skips the length check (the safety head reads only the first token); otherwise the
            sequence length plus `max_length` new tokens must fit in `text_config.max_position_embeddings`.
    """
    for name, tensor in (("input_ids", input_ids), ("pixel_values", pixel_values), ("attention_mask", attention_mask)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}; use return_tensors='pt'.")
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the 'meta' device and holds no data; pass real tensors.")
        if getattr(model, "hf_device_map", None) is None and tensor.device != model.device:
            raise ValueError(
                f"{name} is on {tensor.device} but the model is on {model.device}; move the inputs with "
                "inputs.to(model.device)."
            )
    if input_ids is not None:
        _check_input_ids(model.config, input_ids, max_length)
        if attention_mask is not None:
            _check_attention_mask(input_ids, attention_mask)
    if pixel_values is not None:
        num_channels = model.config.vision_config.num_channels
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor normalised by the processor, got {pixel_values.dtype}; "
                "raw integer pixels would give wrong safety verdicts."
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
            raise ValueError(
                f"pixel_values must have shape (num_images, {num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )


def _check_input_ids(config, input_ids, max_length):
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.ndim != 2:
        raise ValueError(
            "input_ids must be an int64 or int32 tensor of shape (batch_size, sequence_length), got "
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0): a prompt needs at least one token, e.g. BOS.")
    vocab_size = config.text_config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids hold token ids outside [0, {vocab_size - 1}] (min {low}, max {high}); they do not come from "
            "this model's tokenizer."
        )
    limit = config.text_config.max_position_embeddings
    if max_length is not None and input_ids.shape[1] + max_length > limit:
        raise ValueError(
            f"The prompt has {input_ids.shape[1]} tokens (+ {max_length} new tokens), more than the language "
            f"model's max_position_embeddings ({limit}); shorten or truncate it."
        )


def _check_attention_mask(input_ids, attention_mask):
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must "
            "be equal."
        )
    empty_rows = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"attention_mask rows {empty_rows} attend to no token; every row needs a prompt.")


def check_placeholders_have_images(model, input_ids, pixel_values):
    """Raises when `input_ids` hold `<image>` placeholders but no `pixel_values` came with them: the image would be
    neither seen nor judged."""
    if pixel_values is not None or input_ids is None:
        return
    rows = (input_ids == model.config.image_token_id).any(dim=1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(
            f"Rows {rows} hold <image> placeholders but no pixel_values were given; pass the processor's "
            "pixel_values (the image must be judged) or remove the placeholders."
        )


def _check_finite_safety_logits(level_logits, type_logits, image_rows):
    finite = torch.isfinite(level_logits).all(dim=-1) & torch.isfinite(type_logits).all(dim=-1)
    if not bool(finite.all()):
        images = (~finite).nonzero().flatten()
        raise ValueError(
            f"The safety head produced non-finite logits for image(s) {images.tolist()} (rows "
            f"{image_rows[images.to(image_rows.device)].tolist()}); check pixel_values for NaN/inf and the model's "
            "dtype (float16 overflow). No verdict is given rather than a wrong one."
        )


def _safetensors_only(load_kwargs: dict) -> dict:
    """`from_pretrained` kwargs that read weights from safetensors files only, never from a pickle."""
    if load_kwargs.get("use_safetensors") is False or load_kwargs.get("weights_only") is False:
        raise ValueError(
            "SafeLlava loads weights from safetensors files only: use_safetensors=False and weights_only=False "
            "(pickle checkpoints) are refused. Convert the checkpoint to safetensors in a trusted environment."
        )
    return {**load_kwargs, "use_safetensors": True}


def _select_images(image_outputs, images_per_row, rows):
    """The encoded images of `rows` (pooler_output is a list with one tensor per image, in row order)."""
    starts = [sum(images_per_row[:row]) for row in range(len(images_per_row))]
    chosen = [image_outputs.pooler_output[starts[row] + i] for row in rows for i in range(images_per_row[row])]
    return BaseModelOutputWithPooling(pooler_output=chosen)


def _masked_cross_entropy(logits, targets):
    valid = targets != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.float().sum() * 0.0  # keeps the graph connected so DDP sees every parameter used
    return F.cross_entropy(logits.float()[valid], targets[valid])


def _check_label_range(name, labels, num_classes):
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"safety {name} labels must be in [0, {num_classes - 1}] or -100, got {labels[bad].unique().tolist()}."
        )


_LOAD_KWARGS = ("dtype", "device_map", "revision", "cache_dir", "local_files_only", "token", "attn_implementation")


def _llava_config_dict(llava_config) -> dict:
    config_dict = llava_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "image_seq_length"):
        config_dict.pop(key, None)
    return config_dict


def _check_only_safety_weights_missing(missing, unexpected):
    not_safety = sorted(k for k in missing if not k.startswith(SAFETY_PARAMETER_PREFIXES))
    if not_safety or unexpected:
        raise ValueError(
            "The LLaVA weights do not match this SafeLlava configuration: "
            f"missing {not_safety[:10]}, unexpected {sorted(unexpected)[:10]}."
        )


def _generation_config_with_threshold(generation_config, config) -> GenerationConfig:
    """A generation config that keeps `safety_threshold` through save/load (one built "from the model config"
    drops custom keys when reloaded)."""
    values = {k: v for k, v in generation_config.to_diff_dict().items() if not k.startswith("_")}
    values["safety_threshold"] = config.safety_threshold
    return GenerationConfig(**values)


__all__ = [
    "SafeLlavaPreTrainedModel",
    "SafeLlavaModel",
    "SafeLlavaForConditionalGeneration",
    "SafeLlavaCausalLMOutputWithPast",
    "SafeLlavaModelOutputWithPast",
    "SafeLlavaSafetyAssessment",
    "SafeLlavaGenerateOutput",
]
