# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""The safety module SafeLlava adds to a vision-language base (arXiv 2405.13581): the safety projector (Honeybee's
C-Abstractor in plain torch, or an MLP), two sets of safety tokens and the safety head; and the checks of the inputs a
verdict is computed from. Nothing here depends on the base: the module reads a grid of vision states per image, which
each base supplies (`safety_vision_states`, see `safety_model_safe_llava.py`).

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import torch
import torch.nn.functional as F
from torch import nn



IGNORE_INDEX = -100
SAFETY_PARAMETER_PREFIXES = ("model.safety_module.",)

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
    Honeybee's C-Abstractor: RegStage -> adaptive average pool -> RegStage -> 2-layer MLP readout, on any grid.

    Input `(num_images, grid_height, grid_width, vision_dim)`; output `(num_images, out_h * out_w, text_hidden_size)`,
    where `(out_h, out_w)` is `config.safety_projector_grid_size` squared, or the input grid when that is `None` (the
    paper keeps LLaVA-1.5's 24x24 grid: nothing is pooled away).
    """

    def __init__(self, config, input_dim: int):
        super().__init__()
        hidden = config.safety_projector_hidden_size
        text_hidden = config.get_text_config().hidden_size
        self.grid_size = config.safety_projector_grid_size
        self.stage1 = SafeLlavaRegStage(config.safety_projector_depth, input_dim, hidden)
        self.stage2 = SafeLlavaRegStage(config.safety_projector_depth, hidden, hidden)
        self.readout_in = nn.Linear(hidden, text_hidden)
        self.readout_act = nn.SiLU()
        self.readout_out = nn.Linear(text_hidden, text_hidden)

    def forward(self, vision_states: torch.Tensor) -> torch.Tensor:
        grid = vision_states.permute(0, 3, 1, 2)  # (N, C, H, W)
        grid = self.stage1(grid)
        pooled_size = grid.shape[-2:] if self.grid_size is None else (self.grid_size, self.grid_size)
        grid = self.stage2(F.adaptive_avg_pool2d(grid, pooled_size))  # (N, hidden, out_h, out_w)
        tokens = grid.flatten(2).transpose(1, 2)  # (N, out_h * out_w, hidden)
        return self.readout_out(self.readout_act(self.readout_in(tokens)))


class SafeLlavaMLPSafetyProjector(nn.Module):
    """The cheap alternative: the same 2-layer MLP shape as LLaVA's own projector, on every grid cell."""

    def __init__(self, config, input_dim: int):
        super().__init__()
        text_hidden = config.get_text_config().hidden_size
        self.linear_1 = nn.Linear(input_dim, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, vision_states: torch.Tensor) -> torch.Tensor:
        tokens = vision_states.flatten(1, 2)  # (N, H * W, vision_dim)
        return self.linear_2(self.act(self.linear_1(tokens)))


SAFETY_PROJECTOR_CLASSES = {"cabstractor": SafeLlavaCAbstractor, "mlp": SafeLlavaMLPSafetyProjector}


# ----------------------------------------------------------------------------------------------------------------
# Safety head: cross-attention from one text query to [safety tokens ; safety features], then two classifiers
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaSafetyHead(nn.Module):
    """
    Multi-head cross-attention (query: one text embedding per image; keys/values: the head's safety tokens followed
    by the safety projector's output) and two linear classifiers, for the risk level and the risk type.
    """

    # Named apart from language-model attention (`q_proj`, ...), so that the usual LoRA recipe
    # (`target_modules=["q_proj", "v_proj"]`) wraps the language model's projections and none of the head's.
    # Checkpoints saved with the old names load through the conversion mapping (`safety_loading_safe_llava.py`).
    def __init__(self, config):
        super().__init__()
        hidden = config.get_text_config().hidden_size
        self.num_heads = config.safety_head_num_heads
        self.head_dim = hidden // self.num_heads
        self.query_projection = nn.Linear(hidden, hidden)
        self.key_projection = nn.Linear(hidden, hidden)
        self.value_projection = nn.Linear(hidden, hidden)
        self.output_projection = nn.Linear(hidden, hidden)
        self.level_classifier = nn.Linear(hidden, len(config.safety_level_labels))
        self.category_classifier = nn.Linear(hidden, len(config.safety_type_labels))

    def forward(
        self, query: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: `(num_images, hidden)`, the text embedding each image is judged with.
            keys_values: `(num_images, num_keys, hidden)`.
            key_mask: `(num_images, num_keys)` bool, `True` at each image's own keys (its grid's tokens; the padding
                of smaller grids is `False`), or `None`: every key is the image's.

        Returns:
            level logits `(num_images, num_levels)` and type logits `(num_images, num_types)`.
        """
        num_images, num_keys, hidden = keys_values.shape
        q = self.query_projection(query).view(num_images, self.num_heads, 1, self.head_dim)
        k = self.key_projection(keys_values).view(num_images, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value_projection(keys_values).view(num_images, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, 1, head_dim)
        pooled = self.output_projection(attended.reshape(num_images, hidden))
        return self.level_classifier(pooled), self.category_classifier(pooled)


# ----------------------------------------------------------------------------------------------------------------
# The safety module: everything SafeLlava adds to a base
# ----------------------------------------------------------------------------------------------------------------


class SafeLlavaSafetyModule(nn.Module):
    """
    The safety projector, both sets of safety tokens and the safety head. `tokens` are keys/values of the head
    only; `llm_tokens` (absent with `num_llm_safety_tokens=0`) sit before each image's features in the LLM input.
    """

    def __init__(self, config):
        super().__init__()
        hidden = config.get_text_config().hidden_size
        self.projector = SAFETY_PROJECTOR_CLASSES[config.safety_projector_type](config, config.safety_vision_dim)
        self.tokens = nn.Parameter(torch.zeros(config.num_safety_tokens, hidden))
        if config.num_llm_safety_tokens > 0:
            self.llm_tokens = nn.Parameter(torch.zeros(config.num_llm_safety_tokens, hidden))
        else:
            self.register_parameter("llm_tokens", None)
        self.head = SafeLlavaSafetyHead(config)

    def forward(self, vision_states, query_embeds, images_per_row) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            vision_states (`torch.FloatTensor` of shape `(num_units, grid_height, grid_width, vision_dim)`, or a list
                of `(grid_height_i, grid_width_i, vision_dim)` tensors, one per unit, for grids of different sizes):
                what the base's `safety_vision_states` gives, in row order (a unit is an image, or one of its crops).
            query_embeds (`torch.FloatTensor` of shape `(batch_size, hidden)`): the base's `safety_query`.
            images_per_row (`torch.LongTensor` of shape `(batch_size,)`): units per row, units in row order.

        Returns:
            Level logits `(batch_size, num_levels)` and type logits `(batch_size, num_types)` of each row's riskiest
            unit; a row without images gets a certain "level 0, clean" verdict (there is nothing to judge).
        """
        safety_features, feature_mask = self.project(vision_states)
        num_images = safety_features.shape[0]
        keys_values = torch.cat([self.tokens.unsqueeze(0).expand(num_images, -1, -1), safety_features], dim=1)
        key_mask = None
        if feature_mask is not None:  # each image attends over the safety tokens and its own grid's features
            token_mask = feature_mask.new_ones(num_images, self.tokens.shape[0])
            key_mask = torch.cat([token_mask, feature_mask], dim=1)
        batch_size = images_per_row.shape[0]
        rows = torch.arange(batch_size, device=images_per_row.device)
        image_rows = torch.repeat_interleave(rows, images_per_row, output_size=num_images)
        query = query_embeds.to(keys_values.dtype)[image_rows.to(query_embeds.device)]
        level_logits, type_logits = self.head(query, keys_values, key_mask)
        return riskiest_image_per_row(level_logits, type_logits, image_rows.to(level_logits.device), batch_size)

    def project(self, vision_states) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The safety projector on every grid: `(num_units, max_tokens, hidden)` and, for a list of grids, the mask
        `(num_units, max_tokens)` of each unit's own tokens (`None` for one stacked grid: all tokens are real).
        """
        if isinstance(vision_states, torch.Tensor):
            return self.projector(vision_states.to(self.tokens.dtype)), None
        features = self.project_grids(vision_states)
        if not features:
            return self.tokens.new_zeros(0, 0, self.tokens.shape[-1]), self.tokens.new_zeros(0, 0, dtype=torch.bool)
        lengths = torch.tensor([len(tokens) for tokens in features], device=self.tokens.device)
        padded = nn.utils.rnn.pad_sequence(features, batch_first=True)
        mask = torch.arange(padded.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        return padded, mask

    def project_grids(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The projector on grids of different sizes, in their order: one call per size, its grids stacked (sizes are
        shapes, known on the host: no device sync)."""
        by_shape = {}
        for index, grid in enumerate(grids):
            by_shape.setdefault(tuple(grid.shape), []).append(index)
        features = [None] * len(grids)
        for indices in by_shape.values():
            projected = self.projector(torch.stack([grids[index] for index in indices]).to(self.tokens.dtype))
            for index, tokens in zip(indices, projected):
                features[index] = tokens
        return features


def riskiest_image_per_row(level_logits, type_logits, image_rows, batch_size: int):
    """Each row's image with the highest `1 - P(level 0)` (ties: the earliest), without host syncs."""
    no_level, no_type = _certain_clean(level_logits, type_logits, batch_size)
    if level_logits.shape[0] == 0:
        return no_level, no_type
    # A NaN image counts as the riskiest, so that its logits reach the decision rule, which refuses to decide on NaN.
    image_risk = torch.nan_to_num(1.0 - level_logits.float().softmax(-1)[:, 0], nan=2.0)
    best_risk = torch.full((batch_size,), -1.0, device=level_logits.device)
    best_risk = best_risk.scatter_reduce(0, image_rows, image_risk, reduce="amax")
    is_best = image_risk >= best_risk[image_rows]
    num_images = image_rows.shape[0]
    image_index = torch.arange(num_images, device=level_logits.device)
    candidates = torch.where(is_best, image_index, torch.full_like(image_index, num_images))
    chosen = torch.full((batch_size,), num_images, device=level_logits.device)
    chosen = chosen.scatter_reduce(0, image_rows, candidates, reduce="amin")
    has_image = chosen < num_images
    chosen = chosen.clamp(max=num_images - 1)
    return (
        torch.where(has_image[:, None], level_logits[chosen], no_level),
        torch.where(has_image[:, None], type_logits[chosen], no_type),
    )


def _certain_clean(level_logits, type_logits, batch_size):
    fill = torch.finfo(level_logits.dtype).min
    no_level = level_logits.new_full((batch_size, level_logits.shape[-1]), fill)
    no_type = type_logits.new_full((batch_size, type_logits.shape[-1]), fill)
    no_level[:, 0] = 0.0
    no_type[:, -1] = 0.0
    return no_level, no_type


# ----------------------------------------------------------------------------------------------------------------
# Checks of the inputs a verdict is computed from
# ----------------------------------------------------------------------------------------------------------------


def check_model_inputs(model, input_ids=None, pixel_values=None, attention_mask=None):
    """
    Rejects, with a message naming the bad input, what would give a silently wrong verdict or crash deep inside torch.
    The images' layout is the base's to check (its headless model's `check_image_inputs`).

    Args:
        model: a SafeLlava ForConditionalGeneration.
        input_ids: `(batch_size, sequence_length)` int64/int32 ids of this model's tokenizer.
        pixel_values: floating point, as the processor returns them (LLaVA: `(num_images, 3, 336, 336)`; bases with
            crops add a crop dimension; flat-patch bases give `(num_patches, patch_dim)`).
        attention_mask: `(batch_size, sequence_length)`, every row attending to at least one token.
    """
    if input_ids is None or pixel_values is None:
        raise ValueError("A safety verdict needs input_ids and pixel_values (the processor's output).")
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
    check_input_ids(model.config, input_ids)
    if attention_mask is not None:
        _check_attention_mask(input_ids, attention_mask)
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor normalised by the processor, got {pixel_values.dtype}; "
            "raw integer pixels would give wrong safety verdicts."
        )


def check_input_ids(config, input_ids):
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.ndim != 2:
        raise ValueError(
            "input_ids must be an int64 or int32 tensor of shape (batch_size, sequence_length), got "
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (sequence length 0): a prompt needs at least one token, e.g. BOS.")
    vocab_size = config.get_text_config().vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids hold token ids outside [0, {vocab_size - 1}] (min {low}, max {high}); they do not come from "
            "this model's tokenizer."
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


# ----------------------------------------------------------------------------------------------------------------
# The safety loss
# ----------------------------------------------------------------------------------------------------------------


def safety_loss(level_logits, type_logits, safety_labels, images_per_row) -> torch.Tensor:
    """
    `CE(level) + CE(type)`, each averaged over the rows that carry that label (-100 rows add nothing).

    Args:
        level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`), type_logits (`(batch_size, num_types)`).
        safety_labels (`torch.LongTensor` of shape `(batch_size, 2)`): `(level, type)` per row, -100 for none.
        images_per_row (`torch.LongTensor` of shape `(batch_size,)`): a labelled row needs an image.
    """
    safety_labels = _checked_safety_labels(safety_labels, level_logits, type_logits, images_per_row)
    return _masked_cross_entropy(level_logits, safety_labels[:, 0]) + _masked_cross_entropy(type_logits, safety_labels[:, 1])


def _checked_safety_labels(safety_labels, level_logits, type_logits, images_per_row):
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
    return safety_labels


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


_SHAPE_FIELDS = {
    "model.safety_module.tokens": "num_safety_tokens",
    "model.safety_module.llm_tokens": "num_llm_safety_tokens",
    "model.safety_module.head.level_classifier": "safety_level_labels",
    "model.safety_module.head.category_classifier": "safety_type_labels",
    "model.safety_module.head": "text_config.hidden_size",
    "model.safety_module.projector": "safety_projector_type / safety_projector_hidden_size / safety_projector_depth",
}


def shape_field(name: str) -> str:
    """The config field that sets the shape of safety parameter `name`."""
    return next(field for prefix, field in _SHAPE_FIELDS.items() if name.startswith(prefix))


__all__ = ["SafeLlavaSafetyModule", "check_model_inputs", "check_input_ids", "safety_loss"]
