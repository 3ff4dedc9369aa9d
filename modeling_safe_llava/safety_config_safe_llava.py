# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""The safety fields every SafeLlava base configuration carries, validated in one place.

A base's config (`SafeLlavaConfig`, ...) is `class SafeXConfig(SafetyConfigMixin, XConfig)`: the mixin adds the
safety projector, safety tokens and safety head fields, bounds-checks their sizes and fills in the paper's policy.
What depends on the base (its image placeholder count, the width of the vision states the head reads) stays in the
base's config.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

from dataclasses import dataclass

from .checks_safe_llava import check_bool, check_integer, check_number
from .policy_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS, SafetyPolicy
from .efficientnet_lite_safe_llava import SafeLlavaEfficientNetLiteConfig  # noqa: F401 (registers its model_type)


SAFETY_PROJECTOR_TYPES = ("cabstractor", "mlp")
# Upper bounds of the sizes a config sets: far above any published model (the paper: 64 tokens, depth 3, 8 heads),
# low enough that a typo gets a clear error here instead of a raw allocation error in the first `torch.zeros`.
MAX_SAFETY_TOKENS = 4096
MAX_SAFETY_PROJECTOR_HIDDEN_SIZE = 65536
MAX_SAFETY_PROJECTOR_DEPTH = 64
MAX_SAFETY_PROJECTOR_GRID_SIZE = 256
MAX_SAFETY_TYPES = 256


@dataclass(kw_only=True, repr=False)
class SafetyConfigMixin:
    r"""
    The safety fields of every SafeLlava base config (dataclass fields, so `to_dict` / `from_pretrained` carry them).

    Args:
        num_safety_tokens (`int`, *optional*, defaults to 64):
            Learnable tokens prepended to the safety projector's output; keys/values of the safety head only.
        num_llm_safety_tokens (`int`, *optional*, defaults to 64):
            Learnable tokens placed before each image's features in the language model input. With 0 the
            language-model path is exactly the stock base's.
        safety_projector_type (`str`, *optional*, defaults to `"cabstractor"`):
            `"cabstractor"` (Honeybee's C-Abstractor, as in the paper) or `"mlp"` (a cheaper 2-layer MLP).
        safety_projector_hidden_size (`int`, *optional*):
            Channels inside the C-Abstractor. Defaults to the vision hidden size plus `num_safety_tokens`
            (1024 + 64 = 1088 in the paper).
        safety_projector_depth (`int`, *optional*, defaults to 3):
            Residual blocks in each of the C-Abstractor's two stages.
        safety_projector_grid_size (`int`, *optional*):
            Side of the grid the C-Abstractor pools the vision states to; `None` keeps the base's grid (the paper:
            24x24, nothing pooled away).
        safety_head_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the safety head's cross-attention; must divide the text hidden size.
        safety_level_labels (`list[str]`, *optional*):
            Names of the 4 risk levels, from "safe to answer" (index 0) to "reject" (index 3).
        safety_type_labels (`list[str]`, *optional*):
            Names of the risk types; the last one is the clean (no risk) type.
        safety_loss_weight (`float`, *optional*, defaults to 10.0):
            `loss = lm_loss + safety_loss_weight * (CE(level) + CE(type))`.
        safety_threshold (`float`, *optional*, defaults to 0.5):
            Default threshold of `generate`: a row is flagged iff `1 - P(level 0) > safety_threshold`.
        safety_thresholds (`dict[str, float]`, *optional*):
            Per risky type default thresholds that override `safety_threshold` (e.g. from `safe-llava calibrate`).
        safety_actions (`dict[str, list[str]]`, *optional*):
            For each risky type, the action (`"allow"`, `"hint"` or `"refuse"`) taken at each of the 4 levels.
            Types left out get the paper's default `["allow", "hint", "hint", "refuse"]`.
        safety_hints (`dict[str, list[str]]`, *optional*):
            For each risky type, the safe-hint text of each level (index 0 unused). Types left out get the paper's.
        safety_refusals (`dict[str, str]`, *optional*):
            For each risky type, the answer given when the action is `"refuse"`. Types left out get the paper's.
        safety_text_token_ids (`dict`, *optional*):
            The hints, refusals and assistant-turn marker as token ids; written by `model.tokenize_safety_texts`
            so that `generate` needs no tokenizer.
        safety_level_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the level head: `P(level) = softmax(level_logits / safety_level_temperature)`. Fitted by
            `safe-llava calibrate` so that `risk` is a calibrated probability.
        safety_type_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the type head, likewise.
        safety_modules_trained (`bool`, *optional*, defaults to `False`):
            Set by the training code once the safety modules have been trained. Safety-aware generation refuses
            to run on untrained safety modules unless explicitly allowed.
    """

    # What the Trainer's evaluation leaves out of the predictions: the cache and the image features (the metrics read
    # the safety logits). Every transformers in range: the cache is `past_key_values` (5.23) or `cache` (5.24).
    keys_to_ignore_at_inference = ["past_key_values", "cache", "image_hidden_states", "image_outputs"]
    # `auto_map` of the base's remote code; always SafeLlava's own classes (an `auto_map` read from a checkpoint
    # could name another repository's code).
    safety_auto_map = None

    num_safety_tokens: int = 64
    num_llm_safety_tokens: int = 64
    safety_projector_type: str = "cabstractor"
    safety_projector_hidden_size: int | None = None
    safety_projector_depth: int = 3
    safety_projector_grid_size: int | None = None
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

    def __post_init__(self, **kwargs):
        if self.safety_level_labels is None:
            self.safety_level_labels = list(SAFETY_LEVEL_LABELS)
        if self.safety_type_labels is None:
            self.safety_type_labels = list(SAFETY_TYPE_LABELS)
        super().__post_init__(**kwargs)
        self._validate_safety_fields()
        # The policy is validated in one place (policy_safe_llava.SafetyPolicy), which also fills in the paper's
        # actions, hints and refusals for every type left out.
        for name, value in SafetyPolicy.from_config(self).config_fields().items():
            setattr(self, name, value)
        if self.safety_projector_hidden_size is None:
            self.safety_projector_hidden_size = self.vision_config.hidden_size + self.num_safety_tokens
        if self.safety_auto_map is not None:
            self.auto_map = dict(self.safety_auto_map)

    @classmethod
    def from_base_config(cls, base_config, **safety_fields):
        """A config of this class with every field of the stock base config (its image sequence length recomputed)
        and the given safety fields."""
        fields = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "image_seq_length"):
            fields.pop(key, None)
        return cls(**fields, **safety_fields)

    @property
    def safety_vision_dim(self) -> int:
        """Channels of the vision states the safety projector reads (the base's `safety_vision_states`)."""
        return self.vision_config.hidden_size

    @property
    def risky_type_labels(self) -> list[str]:
        """Every type name but the last (clean) one."""
        return list(self.safety_type_labels[:-1])

    @property
    def clean_type_label(self) -> str:
        return self.safety_type_labels[-1]

    def _validate_safety_fields(self):
        check_integer("num_safety_tokens", self.num_safety_tokens, 1, MAX_SAFETY_TOKENS)
        check_integer("num_llm_safety_tokens", self.num_llm_safety_tokens, 0, MAX_SAFETY_TOKENS)
        check_integer("safety_projector_depth", self.safety_projector_depth, 1, MAX_SAFETY_PROJECTOR_DEPTH)
        text_hidden = self.get_text_config().hidden_size
        check_integer("safety_head_num_heads", self.safety_head_num_heads, 1, text_hidden)
        if self.safety_projector_hidden_size is not None:
            check_integer("safety_projector_hidden_size", self.safety_projector_hidden_size, 1, MAX_SAFETY_PROJECTOR_HIDDEN_SIZE)
        if self.safety_projector_grid_size is not None:
            check_integer("safety_projector_grid_size", self.safety_projector_grid_size, 1, MAX_SAFETY_PROJECTOR_GRID_SIZE)
        if self.safety_projector_type not in SAFETY_PROJECTOR_TYPES:
            raise ValueError(
                f"safety_projector_type={self.safety_projector_type!r} is not supported; "
                f"accepted values: {', '.join(repr(t) for t in SAFETY_PROJECTOR_TYPES)}."
            )
        if text_hidden % self.safety_head_num_heads != 0:
            raise ValueError(
                f"safety_head_num_heads={self.safety_head_num_heads} must divide the text hidden size ({text_hidden})."
            )
        _check_labels("safety_level_labels", self.safety_level_labels, exact_length=4)
        _check_labels("safety_type_labels", self.safety_type_labels, exact_length=None)
        check_number("safety_loss_weight", self.safety_loss_weight)
        for name in ("safety_level_temperature", "safety_type_temperature"):
            check_number(name, getattr(self, name), strict=True)
        check_bool("safety_modules_trained", self.safety_modules_trained)


def _check_labels(name: str, labels, exact_length: int | None):
    if not isinstance(labels, list) or not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"{name} must be a list of non-empty strings, got {labels!r}.")
    if exact_length is not None and len(labels) != exact_length:
        raise ValueError(f"{name} must have {exact_length} names, got {len(labels)}: {labels!r}.")
    if exact_length is None and not 2 <= len(labels) <= MAX_SAFETY_TYPES:
        raise ValueError(
            f"{name} needs at least one risky type and the clean type (last), at most {MAX_SAFETY_TYPES} names; got "
            f"{labels!r}."
        )
    if len(set(labels)) != len(labels):
        raise ValueError(f"{name} has duplicate names: {labels!r}.")


__all__ = ["SafetyConfigMixin", "SAFETY_PROJECTOR_TYPES"]
