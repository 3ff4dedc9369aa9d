# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Safe Qwen2.5-VL: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) plus the safety module of arXiv 2405.13581.

Qwen2.5-VL's side of the seam (`safety_model_safe_llava.py`, `docs/bases.md`): its config, processor and model
classes. The safety module, the policy, the generation plan, loading and construction are shared with every base.

This file is remote code: it is copied next to the weights on the Hub and imports only torch, transformers and its
sibling files (flat, relative imports).

Pipeline (Qwen/Qwen2.5-VL-7B-Instruct shapes; every image has its own size):

    pixel_values (total_patches, 3*2*14*14), image_grid_thw (N_img, 3) = (1, h_i, w_i) per image
      -> Qwen2.5-VL's vision tower (window attention, 2x2 patch merger) -> f_i (h_i/2 * w_i/2, 3584) per image
      |-> LLM input at each image: <|vision_start|> [safety_module.llm_tokens (64, 3584) ; f_i] <|vision_end|>
      |      (the LLM safety tokens' placeholders are `<|image_pad|>` tokens of the text kind in `mm_token_type_ids`,
      |      so `get_rope_index` gives them text positions and the image its own 3-D grid positions after them)
      '-> f_i as its grid (h_i/2, w_i/2, 3584) -> safety_module.projector, one grid at a time -> h_s,i
             safety_module.head: query = embedding of the row's first non-padding token (`<|im_start|>`),
             keys/values = [safety_module.tokens (64, 3584) ; h_s,i], masked to image i's own tokens
             -> level (N_img, 4), type (N_img, 7); a row's verdict is its riskiest image's

What the head reads: the merged vision features the language model reads (before the LLM safety tokens), as each
image's own grid. The verdict needs the vision tower alone (its merger included), never the language model.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
from transformers import modeling_outputs
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.cache_utils import Cache
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_torchvision_available
from transformers.utils.generic import can_return_tuple

from .generation_safe_llava import selected_image_indices
from .safety_config_safe_llava import SafetyConfigMixin
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_module_safe_llava import SafeLlavaSafetyModule
from .safety_processing_safe_llava import SafetyProcessorMixin


AUTO_MAP = {
    "AutoConfig": "qwen2_5_vl_safe_llava.SafeQwen2_5_VLConfig",
    "AutoModel": "qwen2_5_vl_safe_llava.SafeQwen2_5_VLForConditionalGeneration",
    "AutoModelForImageTextToText": "qwen2_5_vl_safe_llava.SafeQwen2_5_VLForConditionalGeneration",
}
# `mm_token_type_ids` values, as stock Qwen2.5-VL's processor writes them.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


class SafeQwen2_5_VLConfig(SafetyConfigMixin, Qwen2_5_VLConfig):
    r"""
    Configuration of a [`SafeQwen2_5_VLForConditionalGeneration`]: every field of [`Qwen2_5_VLConfig`] plus the safety
    fields of [`SafetyConfigMixin`]. An image's placeholder count depends on its size (`image_grid_thw`), so it is the
    processor's to count; it grows by `num_llm_safety_tokens`.
    """

    model_type = "safe_qwen2_5_vl"
    safety_auto_map = AUTO_MAP

    @property
    def safety_vision_dim(self) -> int:
        """The merged vision features the head reads: the vision tower's `out_hidden_size`."""
        return self.vision_config.out_hidden_size


def image_token_types(input_ids, image_token_id: int, video_token_id: int, num_llm_safety_tokens: int):
    """
    `mm_token_type_ids` of `input_ids` (`(batch_size, sequence_length)`): 1 at image placeholders, 2 at video
    placeholders, 0 elsewhere, and 0 at the first `num_llm_safety_tokens` placeholders of each image (its LLM safety
    tokens), so that `get_rope_index` gives them text positions.
    """
    is_image = input_ids == image_token_id
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    previous = torch.nn.functional.pad(is_image[..., :-1], (1, 0), value=False)
    run_starts = torch.where(is_image & ~previous, positions, torch.full_like(positions, -1))
    offset_in_image = positions - run_starts.cummax(dim=-1).values
    types = torch.where(is_image & (offset_in_image >= num_llm_safety_tokens), IMAGE_TYPE, TEXT_TYPE)
    return torch.where(input_ids == video_token_id, VIDEO_TYPE, types).to(torch.int32)


class SafeQwen2_5_VLProcessor(SafetyProcessorMixin, Qwen2_5_VLProcessor):
    r"""
    [`Qwen2_5_VLProcessor`] for Safe Qwen2.5-VL: each image expands to `num_llm_safety_tokens` + its own
    `image_grid_thw.prod() / merge_size**2` `<|image_pad|>` tokens, and `mm_token_type_ids` marks the first
    `num_llm_safety_tokens` of them as text, where [`SafeQwen2_5_VLForConditionalGeneration`] puts its LLM safety
    tokens. Works without torchvision: `video_processor=None` gives an images-only processor (stock's video processor
    needs torchvision), and video inputs then get an error that says so.

    Args:
        num_llm_safety_tokens (`int`, *optional*, defaults to 0): Must equal the model's `config.num_llm_safety_tokens`.
            With 0 the processor is stock's, token for token.
        (the other arguments are [`Qwen2_5_VLProcessor`]'s.)
    """

    stock_class = Qwen2_5_VLProcessor

    def __init__(
        self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, num_llm_safety_tokens=0, **kwargs
    ):
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            chat_template=chat_template,
            num_llm_safety_tokens=num_llm_safety_tokens,
            **kwargs,
        )
        if not hasattr(self, "video_processor"):
            self.video_processor = None

    @classmethod
    def get_attributes(cls):
        """Stock's sub-processors, without the video processor where torchvision is missing (it cannot be built or
        loaded then): the processor saves and loads as images-only."""
        attributes = super().get_attributes()
        if not is_torchvision_available():
            attributes = [name for name in attributes if name != "video_processor"]
        return attributes

    def check_argument_for_proper_class(self, argument_name, argument):
        """Stock's check, except that no video processor (`None`) is accepted: an images-only processor."""
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None and getattr(self, "video_processor", None) is None:
            raise ValueError(
                f"This {type(self).__name__} has no video processor, so it takes images only: Qwen2.5-VL's video "
                "processor (Qwen2VLVideoProcessor) needs torchvision. Install torchvision and build the processor "
                "with video_processor=Qwen2VLVideoProcessor(), or pass the video as images."
            )
        if videos is not None:
            kwargs["videos"] = videos
        return super().__call__(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        placeholders = super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * self.num_llm_safety_tokens + placeholders

    def create_mm_token_type_ids(self, input_ids: list) -> list[list[int]]:
        """Stock's types, with each image's first `num_llm_safety_tokens` placeholders of the text kind."""
        types = super().create_mm_token_type_ids(input_ids)
        safety_types = [
            image_token_types(torch.tensor([list(row)]), self.image_token_id, self.video_token_id, self.num_llm_safety_tokens)
            for row in input_ids
        ]
        return [[min(a, int(b)) for a, b in zip(row, fixed[0].tolist())] for row, fixed in zip(types, safety_types)]

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [n + self.num_llm_safety_tokens for n in data["num_image_tokens"]]
        return data


@dataclass
class SafeQwen2_5_VLImageOutput(BaseModelOutputWithPooling):
    r"""
    Qwen2.5-VL's image features, as `get_image_features` returns them, plus what the safety head reads.

    pooler_output (`tuple[torch.FloatTensor]`): per image, `(num_llm_safety_tokens + tokens_i, text_hidden)`, the
        language model's input at its placeholders.
    vision_features (`tuple[torch.FloatTensor]`): per image, the merged features `(tokens_i, out_hidden_size)` without
        the LLM safety tokens.
    image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): each image's patch grid.
    """

    vision_features: tuple | None = None
    image_grid_thw: torch.LongTensor | None = None


# Stock Qwen2.5-VL's output classes: the multimodal ones where transformers has them (they add `image_outputs`,
# `video_outputs`, ...), the plain ones before. Feature-detected: remote code runs on the user's transformers.
_StockModelOutput = getattr(
    modeling_outputs, "MultimodalBaseModelOutputWithPast", modeling_outputs.BaseModelOutputWithPast
)
_StockCausalLMOutput = getattr(
    modeling_outputs, "MultimodalCausalLMOutputWithPast", modeling_outputs.CausalLMOutputWithPast
)


@dataclass
class SafeQwen2_5_VLModelOutputWithPast(_StockModelOutput):
    r"""
    Stock Qwen2.5-VL's model output plus the safety head's verdict, computed when the call encodes
    `pixel_values`.

    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    images_per_row (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Images found in each row.
    """

    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None
    images_per_row: torch.LongTensor | None = None


@dataclass
class SafeQwen2_5_VLCausalLMOutputWithPast(_StockCausalLMOutput):
    r"""
    Stock Qwen2.5-VL's causal-LM output plus the safety fields (after stock's, also in the
    `return_dict=False` tuple).

    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): Next-token cross-entropy, when `labels` is given.
    safety_loss (`torch.FloatTensor` of shape `()`, *optional*): `CE(level) + CE(type)`, when `safety_labels` is given.
    safety_level_logits (`torch.FloatTensor` of shape `(batch_size, num_levels)`, *optional*): Risk-level logits.
    safety_type_logits (`torch.FloatTensor` of shape `(batch_size, num_types)`, *optional*): Risk-type logits.
    """

    lm_loss: torch.FloatTensor | None = None
    safety_loss: torch.FloatTensor | None = None
    safety_level_logits: torch.FloatTensor | None = None
    safety_type_logits: torch.FloatTensor | None = None


class SafeQwen2_5_VLPreTrainedModel(SafetyPreTrainedMixin, Qwen2_5_VLPreTrainedModel):
    config: SafeQwen2_5_VLConfig
    config_class = SafeQwen2_5_VLConfig
    safety_vision_tower_prefix = "model.visual."  # what the gate loads for a verdict (with the safety module, embeddings)
    _no_split_modules = [*Qwen2_5_VLModel._no_split_modules, "SafeLlavaSafetyHead", "SafeLlavaCAbstractor"]


class SafeQwen2_5_VLModel(SafetyModelMixin, Qwen2_5_VLModel, SafeQwen2_5_VLPreTrainedModel):
    """Qwen2.5-VL without the language-modeling head, plus the safety module. The LLM safety tokens are put in front of
    each image's merged features by `get_image_features`, so stock Qwen2.5-VL's merge and `get_rope_index` place
    them."""

    config: SafeQwen2_5_VLConfig
    config_class = SafeQwen2_5_VLConfig
    stock_class = Qwen2_5_VLModel
    safety_output_class = SafeQwen2_5_VLModelOutputWithPast
    safety_image_kwargs = ("image_grid_thw",)

    def __init__(self, config: SafeQwen2_5_VLConfig):
        # Qwen2_5_VLModel's modules, then the safety module, then one post_init().
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.safety_module = SafeLlavaSafetyModule(config)
        self.post_init()

    @property
    def vision_tower(self):
        """Qwen2.5-VL's vision tower (`visual`, the patch merger included), under the name SafeLlava's tools read."""
        return self.visual

    @can_return_tuple
    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs) -> SafeQwen2_5_VLImageOutput:
        """Qwen2.5-VL's image features with the LLM safety tokens first in each image's `pooler_output`; the merged
        features without them (`vision_features`) and `image_grid_thw` are what the safety head reads."""
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL images need `image_grid_thw` next to `pixel_values` (the processor returns both).")
        outputs = super().get_image_features(pixel_values, image_grid_thw, **{**kwargs, "return_dict": True})
        features = tuple(outputs.pooler_output)
        return SafeQwen2_5_VLImageOutput(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=tuple(self.add_llm_safety_tokens(list(features))),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            vision_features=features,
            image_grid_thw=image_grid_thw,
        )

    def safety_vision_states(self, image_outputs) -> list[torch.Tensor]:
        """Each image's merged features as its own grid, `(t * h / merge, w / merge, out_hidden_size)`: a list, the
        grids differ in size."""
        features = getattr(image_outputs, "vision_features", None)
        grids = getattr(image_outputs, "image_grid_thw", None)
        if features is None or grids is None:
            raise ValueError(
                "These pre-encoded images carry no vision_features / image_grid_thw, so the safety head cannot judge "
                "them. Pass pixel_values and image_grid_thw, encode with model.model.get_image_features, or set "
                "safety_threshold=1.0 to turn safety off."
            )
        merge = self.config.vision_config.spatial_merge_size
        return [
            image.reshape(t * (h // merge), w // merge, image.shape[-1])
            for image, (t, h, w) in zip(features, grids.tolist())
        ]

    def images_per_row(self, input_ids, inputs_embeds, image_outputs) -> torch.LongTensor:
        """Images in each row: its runs of image placeholders (each image's run, LLM safety tokens included, sits
        between `<|vision_start|>` and `<|vision_end|>`)."""
        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds)
        previous = torch.nn.functional.pad(placeholders[:, :-1], (1, 0), value=False)
        return (placeholders & ~previous).sum(dim=1)

    def check_image_inputs(self, pixel_values, image_grid_thw=None, **image_kwargs):
        """Qwen2.5-VL's flat patches: `pixel_values` `(total_patches, channels * temporal_patch * patch * patch)` with
        `image_grid_thw` `(num_images, 3)` whose products sum to `total_patches`."""
        vision = self.config.vision_config
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if pixel_values.ndim != 2 or pixel_values.shape[-1] != patch_dim:
            raise ValueError(
                f"pixel_values must have shape (total_patches, {patch_dim}) (Qwen2.5-VL's flat patches, as its "
                f"processor returns them), got {tuple(pixel_values.shape)}."
            )
        if not isinstance(image_grid_thw, torch.Tensor) or image_grid_thw.ndim != 2 or image_grid_thw.shape[-1] != 3:
            shape = tuple(image_grid_thw.shape) if isinstance(image_grid_thw, torch.Tensor) else image_grid_thw
            raise ValueError(f"image_grid_thw must be a (num_images, 3) tensor next to pixel_values, got {shape}.")
        if int(image_grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"image_grid_thw {image_grid_thw.tolist()} holds {int(image_grid_thw.prod(-1).sum())} patches, "
                f"pixel_values {pixel_values.shape[0]}; they must come from the same processor call."
            )

    def select_image_inputs(self, kwargs, images_per_row: list[int], rows: list[int]) -> dict:
        """`image_grid_thw` of the images of `rows` (`None` when they hold none, as for text-only prompts)."""
        grids = kwargs.get("image_grid_thw")
        if grids is None:
            return {}
        chosen = selected_image_indices(images_per_row, rows)
        return {"image_grid_thw": grids[torch.tensor(chosen, dtype=torch.long, device=grids.device)] if chosen else None}

    def prompt_inputs(self, input_ids, attention_mask) -> dict:
        """`mm_token_type_ids` of prompts the generation plan rebuilds, as `SafeQwen2_5_VLProcessor` writes them."""
        config = self.config
        types = image_token_types(input_ids, config.image_token_id, config.video_token_id, config.num_llm_safety_tokens)
        return {"mm_token_type_ids": types}

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        output_safety: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeQwen2_5_VLModelOutputWithPast:
        r"""Stock `Qwen2_5_VLModel.forward` restated (docs/bases.md, "What a `forward` names"), plus the safety logits
        ([`SafetyModelMixin.forward`], `output_safety`). Where stock's output carries `image_outputs` (transformers
        5.24+), they are stock's fields only, so that `return_dict=False` gives stock's tuple."""
        outputs = super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs, output_safety=output_safety,
            **_present(pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts),
            **kwargs,
        )  # fmt: skip
        if isinstance(getattr(outputs, "image_outputs", None), SafeQwen2_5_VLImageOutput):
            outputs.image_outputs = _stock_image_outputs(outputs.image_outputs)
        return outputs


class SafeQwen2_5_VLForConditionalGeneration(
    SafetyForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration, SafeQwen2_5_VLPreTrainedModel
):
    """
    Qwen2.5-VL with the safety module. `forward` is stock Qwen2.5-VL's plus the safety logits; `generate` is stock's
    with the verdict in front; `assess_safety` is the verdict alone (see [`SafetyForConditionalGenerationMixin`]).

    Example:

    ```python
    >>> processor = SafeQwen2_5_VLProcessor.from_base("Qwen/Qwen2.5-VL-7B-Instruct", num_llm_safety_tokens=64)
    >>> model = SafeQwen2_5_VLForConditionalGeneration.from_base("Qwen/Qwen2.5-VL-7B-Instruct", processor=processor)
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
    ...                                        return_tensors="pt")
    >>> out = model.generate(**inputs, safety_threshold=0.5, max_new_tokens=64)  # after training the safety module
    ```
    """

    config: SafeQwen2_5_VLConfig
    config_class = SafeQwen2_5_VLConfig
    stock_class = Qwen2_5_VLForConditionalGeneration
    safety_output_class = SafeQwen2_5_VLCausalLMOutputWithPast

    def __init__(self, config: SafeQwen2_5_VLConfig):
        # Skip Qwen2_5_VLForConditionalGeneration.__init__ (it would build a stock model), keep PreTrainedModel's.
        super(Qwen2_5_VLForConditionalGeneration, self).__init__(config)
        self.model = SafeQwen2_5_VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        safety_labels: torch.LongTensor | None = None,
        output_safety: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SafeQwen2_5_VLCausalLMOutputWithPast:
        r"""
        Stock `Qwen2_5_VLForConditionalGeneration.forward` restated (docs/bases.md, "What a `forward` names"), plus the
        safety logits and loss ([`SafetyForConditionalGenerationMixin.causal_lm_output`]). `cache` is
        transformers 5.24+'s name of `past_key_values`.

        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): each image's patch grid.
        mm_token_type_ids (`torch.IntTensor` of shape `(batch_size, sequence_length)`): 0 text (the LLM safety
            tokens included), 1 image, 2 video; `get_rope_index` reads it.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, second_per_grid_ts=second_per_grid_ts,
            mm_encoder_outputs=mm_encoder_outputs, output_safety=True if safety_labels is not None else output_safety,
            return_dict=True, **_present(cache=cache), **kwargs,
        )  # fmt: skip
        return self.causal_lm_output(outputs, labels, safety_labels, logits_to_keep, **kwargs)


def _stock_image_outputs(image_outputs: SafeQwen2_5_VLImageOutput) -> BaseModelOutputWithPooling:
    """`image_outputs` without the fields only the safety head reads (`vision_features`, `image_grid_thw`)."""
    own = ("vision_features", "image_grid_thw")
    return BaseModelOutputWithPooling(**{name: value for name, value in image_outputs.items() if name not in own})


def _present(**arguments) -> dict:
    """The arguments that were given (not `None`): Qwen2.5-VL's own image and position inputs pass through the mixin's
    `**kwargs` to the headless model only when the caller set them."""
    return {name: value for name, value in arguments.items() if value is not None}


__all__ = [
    "SafeQwen2_5_VLConfig",
    "SafeQwen2_5_VLProcessor",
    "SafeQwen2_5_VLPreTrainedModel",
    "SafeQwen2_5_VLModel",
    "SafeQwen2_5_VLForConditionalGeneration",
    "SafeQwen2_5_VLCausalLMOutputWithPast",
    "SafeQwen2_5_VLModelOutputWithPast",
]
