# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava's safety policy: what the safety head's verdict does to an answer.

The model (`modeling_safe_llava.py`) is LLaVA plus one safety module that rates each image. What turns those
ratings into a decision per row lives here, beside the model, as data and pure functions:

- [`SafetyPolicy`]: thresholds, actions, safe-hint and refusal texts and their token ids, validated in one place and
  saved with the model (as `SafeLlavaConfig` fields). The paper's policy is the default.
- [`decide_safety_actions`]: the decision rule of `safety_threshold`.

The generation plan that carries a verdict out (hints, refusals, row handling) is `generation_safe_llava.py`.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import copy
from dataclasses import dataclass, field, replace

import torch
from transformers.modeling_outputs import ModelOutput

from .chat_template_safe_llava import hint_marker_ids, rendered_hint
from .checks_safe_llava import is_real


SAFETY_LEVEL_LABELS = ["Safe to answer", "Answer carefully", "Answer or reject", "Reject"]
SAFETY_TYPE_LABELS = ["Politics", "Illegal Risk", "Insults and Bullying", "Fairness", "Privacy", "Misleading", "Clean"]
SAFETY_ACTIONS = ("allow", "hint", "refuse")
# The paper's behaviour: level 1-2 get a safe hint, level 3 a refusal. Index = risk level; level 0 is never acted on.
DEFAULT_ACTIONS_BY_LEVEL = ["allow", "hint", "hint", "refuse"]
DEFAULT_SAFETY_THRESHOLD = 0.5

# The safe hints and refusals of arXiv 2405.13581 (supplement Fig. 6); `processors/paper_safety_policy.json` holds the
# same texts as an editable preset.
_PAPER_RISKS = {
    "Politics": "politically sensitive information",
    "Illegal Risk": "illegal content, such as pornography or violence",
    "Insults and Bullying": "cyberbullying, abuse, and hate content",
    "Fairness": "prejudicial discrimination content",
    "Privacy": "personal privacy",
    "Misleading": "false rumors or malicious misleading content",
}
_CAUTION = "As an artificial intelligence model, please handle and respond cautiously, do not involve such content in answers,"
_PAPER_LEVEL_HINTS = [
    "",
    f"This image may contain risks of {{risk}}. {_CAUTION} and provide positive guidance to users.",
    f"This image contains risks of {{risk}}. {_CAUTION} and actively guide users. You can refuse to answer questions "
    "if necessary.",
    "This image contains serious risks of {risk}. As an artificial intelligence model, you must refuse to give the "
    "answer, and say: I'm sorry, but I can't help with content that involves {risk}.",
]
_PAPER_HINT_OVERRIDES = {"Fairness": {2: f"This image contains risks of {{risk}}. {_CAUTION} and actively guide users."}}
_PAPER_REFUSAL = "I'm sorry, but I can't help with this request: the image appears to contain {risk}."


def paper_safety_texts(risky_types: list[str]) -> tuple[dict, dict]:
    """The paper's `(hints, refusals)` for `risky_types`; a type the paper does not name is described by its name."""
    hints, refusals = {}, {}
    for name in risky_types:
        risk = _PAPER_RISKS.get(name, name.lower())
        overrides = _PAPER_HINT_OVERRIDES.get(name, {})
        texts = [overrides.get(level, template) for level, template in enumerate(_PAPER_LEVEL_HINTS)]
        hints[name] = [f"Safe Hint: {text.format(risk=risk)}\n" if text else "" for text in texts]
        refusals[name] = _PAPER_REFUSAL.format(risk=risk)
    return hints, refusals


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------


# The config fields a policy is made of, and the policies last validated from them (`SafetyPolicy.from_config`):
# `id(config) -> (copy of the fields, policy)`. A reused id is harmless: the fields are compared too.
_POLICY_FIELDS = (
    "safety_type_labels", "safety_threshold", "safety_thresholds", "safety_actions", "safety_hints",
    "safety_refusals", "safety_text_token_ids",
)  # fmt: skip
_VALIDATED_POLICIES: dict = {}
_MAX_VALIDATED_POLICIES = 16


@dataclass
class SafetyPolicy:
    """
    What a verdict does: validated once, here. Saved with the model as `SafeLlavaConfig` fields (`safety_threshold`,
    `safety_thresholds`, `safety_actions`, `safety_hints`, `safety_refusals`, `safety_text_token_ids`).

    Args:
        type_names (`list[str]`): Every risk type, the clean type last.
        threshold (`float`): Default threshold: a row is flagged iff `1 - P(level 0) > threshold`.
        thresholds (`dict[str, float]`): Per risky type defaults that override `threshold`.
        actions (`dict[str, list[str]]`): Per risky type, the action at each of the 4 levels (paper's by default).
        hints (`dict[str, list[str]]`): Per risky type, the safe hint of each level (paper's by default).
        refusals (`dict[str, str]`): Per risky type, the refusal (paper's by default).
        text_token_ids (`dict`, *optional*): The texts as token ids (`tokenize`), so that `generate` needs no tokenizer.
    """

    type_names: list[str] = field(default_factory=lambda: list(SAFETY_TYPE_LABELS))
    threshold: float = DEFAULT_SAFETY_THRESHOLD
    thresholds: dict | None = None
    actions: dict | None = None
    hints: dict | None = None
    refusals: dict | None = None
    text_token_ids: dict | None = None

    def __post_init__(self):
        risky = self.risky_types
        self.threshold = check_probability("safety_threshold", self.threshold)
        self.thresholds = {
            name: check_probability(f"safety_thresholds[{name!r}]", value)
            for name, value in _check_type_keys("safety_thresholds", self.thresholds or {}, risky).items()
        }
        actions = _check_type_keys("safety_actions", self.actions or {}, risky)
        self.actions = {name: check_action_list(name, actions.get(name, DEFAULT_ACTIONS_BY_LEVEL)) for name in risky}
        paper_hints, paper_refusals = paper_safety_texts(risky)
        self.hints = {**paper_hints, **_check_hints(_check_type_keys("safety_hints", self.hints or {}, risky))}
        self.refusals = {**paper_refusals, **_check_refusals(_check_type_keys("safety_refusals", self.refusals or {}, risky))}
        if self.text_token_ids is not None and not isinstance(self.text_token_ids, dict):
            raise ValueError(f"safety_text_token_ids must be a dict, got {type(self.text_token_ids).__name__}.")
        self.check_texts_for(self.actions)

    @property
    def risky_types(self) -> list[str]:
        return list(self.type_names[:-1])

    @classmethod
    def from_config(cls, config) -> "SafetyPolicy":
        """
        The policy saved in `config`, validated once per set of field values: the policies last validated are kept,
        each keyed on its config and on a copy of the config's policy fields, so that a changed field (in place too)
        is validated again. The policy is shared by the calls that read it: treat it as read-only (`copy.copy` it
        before setting an attribute, e.g. before `tokenize`).
        """
        fields = tuple(getattr(config, name) for name in _POLICY_FIELDS)
        cached = _VALIDATED_POLICIES.get(id(config))
        if cached is not None and cached[0] == fields:
            return cached[1]
        type_names, threshold, thresholds, actions, hints, refusals, text_token_ids = fields
        policy = cls(
            type_names=list(type_names),
            threshold=threshold,
            thresholds=thresholds,
            actions=actions,
            hints=hints,
            refusals=refusals,
            text_token_ids=text_token_ids,
        )
        if len(_VALIDATED_POLICIES) >= _MAX_VALIDATED_POLICIES:
            _VALIDATED_POLICIES.pop(next(iter(_VALIDATED_POLICIES)))
        _VALIDATED_POLICIES[id(config)] = (copy.deepcopy(fields), policy)
        return policy

    def config_fields(self) -> dict:
        """The policy as `SafeLlavaConfig` fields."""
        return {
            "safety_threshold": self.threshold,
            "safety_thresholds": dict(self.thresholds),
            "safety_actions": {name: list(levels) for name, levels in self.actions.items()},
            "safety_hints": {name: list(texts) for name, texts in self.hints.items()},
            "safety_refusals": dict(self.refusals),
            "safety_text_token_ids": self.text_token_ids,
        }

    def resolve_thresholds(self, safety_threshold=None, default=None) -> torch.Tensor:
        """
        One threshold per risky type, `(num_risky_types,)`.

        Args:
            safety_threshold: `None` (the defaults), a number in [0, 1] (numpy numbers too), or a dict
                `{risky type name: number}` whose missing types keep their default.
            default: a default that overrides `self.threshold` (e.g. a generation config's `safety_threshold`),
                checked where it applies (a number for `safety_threshold` leaves no default to apply).
        """
        if safety_threshold is not None and not isinstance(safety_threshold, dict):
            value = check_probability("safety_threshold", safety_threshold)
            return torch.full((len(self.risky_types),), value, dtype=torch.float32)
        base = self.threshold if default is None else check_probability("safety_threshold", default)
        values = {name: self.thresholds.get(name, base) for name in self.risky_types}
        if isinstance(safety_threshold, dict):
            overrides = _check_type_keys("safety_threshold", safety_threshold, self.risky_types)
            values.update({name: check_probability("safety_threshold", v) for name, v in overrides.items()})
        return torch.tensor([values[name] for name in self.risky_types], dtype=torch.float32)

    def resolve_actions(self, safety_actions=None) -> dict:
        """The configured actions with call-time overrides `{risky type name: action or list of 4}` applied."""
        actions = {name: list(levels) for name, levels in self.actions.items()}
        if safety_actions is None:
            return actions
        if not isinstance(safety_actions, dict):
            raise ValueError(
                "safety_actions must be a dict {risky type name: action or list of 4 actions}, got "
                f"{type(safety_actions).__name__}."
            )
        for name, levels in _check_type_keys("safety_actions", safety_actions, self.risky_types).items():
            actions[name] = check_action_list(name, levels)
        self.check_texts_for(actions)
        return actions

    def check_texts_for(self, actions: dict):
        """Raises unless every `hint` in `actions` has a non-empty hint text at its level (refusal texts are never
        empty: `__post_init__` checks them)."""
        for name, per_level in actions.items():
            for level, action in enumerate(per_level):
                if action == "hint" and not self.hints[name][level].strip():
                    raise ValueError(
                        f"The policy hints at ({name!r}, level {level}) but safety_hints[{name!r}][{level}] is empty; "
                        "give that level a hint text or another action."
                    )

    def needs_texts(self) -> bool:
        """Whether any action is a hint or a refusal (then `text_token_ids` must be set before `generate`)."""
        return any(action != "allow" for per_level in self.actions.values() for action in per_level)

    def check_tokenized_by(self, processor_or_tokenizer):
        """Raises unless `text_token_ids` are this policy's texts as tokenized by `processor_or_tokenizer` (a policy
        that never hints or refuses needs none)."""
        if not self.needs_texts():
            return
        expected = replace(self, text_token_ids=None).tokenize(processor_or_tokenizer)
        if (self.text_token_ids or {}) != expected:
            raise ValueError(
                "safety_text_token_ids do not match the hints/refusals tokenized by this processor; call "
                "model.tokenize_safety_texts(processor) after the last change of the policy texts."
            )

    def for_call(self, safety_threshold=None, safety_actions=None, generation_config=None, batch_size=None):
        """What one `generate` / `assess_safety` call applies (a [`SafetyCallRule`]): its thresholds and actions,
        resolved once. The default threshold is `generation_config.safety_threshold` when set, else the policy's.
        With `batch_size` (`assess_safety`), either may be a list with one entry per row: see `for_rows`."""
        if batch_size is not None and (isinstance(safety_threshold, list) or isinstance(safety_actions, list)):
            return self.for_rows(safety_threshold, safety_actions, generation_config, batch_size)
        default = getattr(generation_config, "safety_threshold", None)
        return SafetyCallRule(self, self.resolve_thresholds(safety_threshold, default), self.resolve_actions(safety_actions))

    def for_rows(self, safety_threshold, safety_actions, generation_config, batch_size: int) -> "SafetyCallRule":
        """One rule per row: `safety_threshold` and `safety_actions` each one value for every row or a list with one
        entry per row (each a form `for_call` accepts). Each row's rule is the one `for_call` gives it alone; a bad
        entry raises naming its row."""
        thresholds = _per_row("safety_threshold", safety_threshold, batch_size)
        actions = _per_row("safety_actions", safety_actions, batch_size)
        rules = [self._row_rule(row, thresholds[row], actions[row], generation_config) for row in range(batch_size)]
        return SafetyCallRule(self, torch.stack([rule.thresholds for rule in rules]), [rule.actions for rule in rules])

    def _row_rule(self, row: int, safety_threshold, safety_actions, generation_config) -> "SafetyCallRule":
        try:
            return self.for_call(safety_threshold, safety_actions, generation_config)
        except ValueError as error:
            raise ValueError(f"Row {row}'s safety rule cannot be applied: {error} Per row: {ROW_RULE_FORMS}.") from error

    def tokenize(self, processor_or_tokenizer) -> dict:
        """The hints, refusals and the hint's marker as token ids of `processor_or_tokenizer` (anything with a
        `chat_template` and a tokenizer); stored in `text_token_ids` and returned. `"assistant_prefix"` is what the
        chat template puts after the user message's text (`hint_marker_ids`), and each hint is tokenized as the
        template renders it there (`rendered_hint`), so that a hinted prompt is the one a chat client gets by
        appending the hint to the user's message."""
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
        render = lambda text: rendered_hint(processor_or_tokenizer, text) if text else text  # noqa: E731
        self.text_token_ids = {
            "assistant_prefix": hint_marker_ids(processor_or_tokenizer),
            "hints": {name: [encode(render(text)) for text in texts] for name, texts in self.hints.items()},
            "refusals": {name: encode(text) for name, text in self.refusals.items()},
        }
        return self.text_token_ids


@dataclass
class SafetyCallRule:
    """The policy of one call, resolved once (`SafetyPolicy.for_call`) and passed down.

    Args:
        policy (`SafetyPolicy`): the model's policy (texts and their token ids).
        thresholds (`torch.FloatTensor` of shape `(num_risky_types,)`, or `(batch_size, num_risky_types)` for one rule
            per row): the call's threshold per risky type.
        actions (`dict[str, list[str]]`, or a list of them, one per row): the call's action per risky type and level.

    `safety_off` (`bool`) is set from `thresholds`: `risk <= 1` is never `> 1`, so with every threshold at 1 nothing
    can be flagged. `allows_everything` (`bool`): every action is `allow`, so a flag changes no answer.
    """

    policy: SafetyPolicy
    thresholds: torch.Tensor
    actions: dict
    safety_off: bool = field(init=False)
    allows_everything: bool = field(init=False)

    def __post_init__(self):
        self.safety_off = bool((self.thresholds >= 1.0).all())
        tables = self.actions if isinstance(self.actions, list) else [self.actions]
        self.allows_everything = all(a == "allow" for table in tables for levels in table.values() for a in levels)

    @classmethod
    def from_config(cls, config, safety_threshold=None, safety_actions=None, generation_config=None, batch_size=None):
        """The rule of one `generate` / `assess_safety` call of a model with `config`: the policy saved in `config`,
        validated, then resolved with the call's arguments (`SafetyPolicy.for_call`)."""
        policy = SafetyPolicy.from_config(config)
        return policy.for_call(safety_threshold, safety_actions, generation_config, batch_size)

    def assess(self, config, level_logits, type_logits, images_per_row) -> "SafeLlavaSafetyAssessment":
        """The verdict of the safety head's logits under this rule (see [`assess_logits`])."""
        return assess_logits(config, level_logits, type_logits, self.thresholds, self.actions, images_per_row)


THRESHOLD_FORMS = "None, a number in [0, 1], or a dict {risky type name: number in [0, 1]}"
ROW_RULE_FORMS = "safety_threshold and safety_actions each one value for every row, or a list with one entry per row"


def _per_row(name: str, value, batch_size: int) -> list:
    """`value` for each of `batch_size` rows: a list with one entry per row, or one value for every row."""
    if isinstance(value, list) and len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} entries for a batch of {batch_size} rows; accepted: {ROW_RULE_FORMS}")
    return value if isinstance(value, list) else [value] * batch_size


def check_probability(name: str, value, accepted: str = THRESHOLD_FORMS) -> float:
    """`value` as a float in [0, 1]: Python and numpy numbers of every width; bools, NaN and the rest raise, naming
    `accepted` forms. The project's one [0, 1] check (thresholds, generation configs, evaluation sweeps)."""
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} {value!r} cannot be applied; accepted: {accepted}.")
    return float(value)


def check_action_list(type_name: str, per_level) -> list[str]:
    """One type's actions: a list of 4 of `allow`/`hint`/`refuse` (level 0 `allow`), or one action for levels 1-3."""
    if isinstance(per_level, str):
        per_level = ["allow"] + [per_level] * 3
    if not isinstance(per_level, (list, tuple)) or len(per_level) != 4:
        raise ValueError(
            f"Actions for {type_name!r} must be one action or a list of 4 (one per level), got {per_level!r}; "
            f"accepted actions: {', '.join(SAFETY_ACTIONS)}."
        )
    for action in per_level:
        if action not in SAFETY_ACTIONS:
            raise ValueError(f"Unknown safety action {action!r} for {type_name!r}; accepted: {', '.join(SAFETY_ACTIONS)}.")
    if per_level[0] != "allow":
        raise ValueError(f"Level 0 ('safe to answer') of {type_name!r} must be 'allow', got {per_level[0]!r}.")
    return list(per_level)


def _check_type_keys(field_name: str, table, risky_types: list[str]) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{field_name} must be a dict keyed by risk type name, got {type(table).__name__}.")
    unknown = sorted((set(table) - set(risky_types)), key=str)
    if unknown:
        raise ValueError(f"{field_name} has unknown risk type(s) {unknown}; accepted: {risky_types}.")
    return dict(table)


def _check_hints(hints: dict) -> dict:
    for name, texts in hints.items():
        if not isinstance(texts, list) or len(texts) != 4 or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"safety_hints[{name!r}] must be a list of 4 strings (one per level), got {texts!r}.")
    return hints


def _check_refusals(refusals: dict) -> dict:
    for name, text in refusals.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"safety_refusals[{name!r}] must be a non-empty string, got {text!r}.")
    return refusals


# ----------------------------------------------------------------------------------------------------------------
# The decision rule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SafeLlavaSafetyAssessment(ModelOutput):
    r"""
    The safety head's verdict for each row of a batch (a row with several images takes its riskiest image).

    Args:
        level_probs (`torch.FloatTensor` of shape `(batch_size, num_levels)`): P(level) per row (calibrated).
        type_probs (`torch.FloatTensor` of shape `(batch_size, num_types)`): P(type) per row (calibrated).
        risk (`torch.FloatTensor` of shape `(batch_size,)`): `1 - P(level 0)`.
        threshold (`torch.FloatTensor` of shape `(batch_size,)`): The threshold applied to each row.
        flagged (`torch.BoolTensor` of shape `(batch_size,)`): `risk > threshold`.
        level (`torch.LongTensor` of shape `(batch_size,)`): Most likely risky level (1-3) if flagged, else level.
        category (`torch.LongTensor` of shape `(batch_size,)`): Most likely risky type if flagged, else type.
        actions (`list[str]`): `"allow"`, `"hint"` or `"refuse"` per row.
        level_names (`list[str]`), category_names (`list[str]`): Names of `level` and `category` per row.
        images_per_row (`torch.LongTensor` of shape `(batch_size,)`): Images judged in each row (0: nothing judged).
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
    The decision rule of `safety_threshold`, as a pure function of probabilities.

    - `risk = 1 - P(level 0)`; a row's category is its most likely *risky* type, its threshold that type's
      (`thresholds` `(num_risky_types,)`, or `(batch_size, num_risky_types)` with `actions` a list: a rule per row).
    - Flagged iff `risk > threshold`: raising a threshold never adds a flag (the category does not depend on it).
    - A flagged row takes `actions[category][most likely risky level]`; an unflagged row is allowed.
    - Non-finite probabilities raise: `nan > threshold` is False, so they would silently allow the row.
    """
    for name, probs in (("level_probs", level_probs), ("type_probs", type_probs)):
        bad_rows = (~torch.isfinite(probs).all(dim=-1)).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError(
                f"{name} of rows {bad_rows} are not finite (NaN/inf pixel values, or float16 overflow?); no safety "
                "decision can be made for them, and none is given rather than a wrong one."
            )
    risk = 1.0 - level_probs[:, 0]
    risky_category = type_probs[:, :-1].argmax(dim=-1)
    thresholds = thresholds.to(risk.device, risk.dtype)
    tables = actions if isinstance(actions, list) else [actions] * len(risk)
    if len(tables) != len(risk) or (thresholds.ndim == 2 and len(thresholds) != len(risk)):
        rows = f"{len(thresholds)} rows of thresholds and {len(tables)} of actions"
        raise ValueError(f"A rule per row needs {len(risk)} rows (one per row of probabilities), got {rows}.")
    per_row = thresholds.ndim == 2
    threshold = thresholds.gather(1, risky_category[:, None])[:, 0] if per_row else thresholds[risky_category]
    flagged = risk > threshold
    level = torch.where(flagged, level_probs[:, 1:].argmax(dim=-1) + 1, level_probs.argmax(dim=-1))
    category = torch.where(flagged, risky_category, type_probs.argmax(dim=-1))
    row_actions = [
        table[type_names[c]][lvl] if f else "allow"
        for table, f, c, lvl in zip(tables, flagged.tolist(), category.tolist(), level.tolist())
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
        level_names=[level_names[i] for i in level.tolist()],
        category_names=[type_names[i] for i in category.tolist()],
        images_per_row=images_per_row,
    )


def no_image_logits(config, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The certain "level 0, clean" logits of rows without an image, `(batch_size, num_levels)` and
    `(batch_size, num_types)`: there is nothing to judge."""
    level = torch.full((batch_size, len(config.safety_level_labels)), -1e4)
    kind = torch.full((batch_size, len(config.safety_type_labels)), -1e4)
    level[:, 0] = 0.0
    kind[:, -1] = 0.0
    return level, kind


def assess_logits(config, level_logits, type_logits, thresholds, actions, images_per_row) -> SafeLlavaSafetyAssessment:
    """The verdict from the safety head's logits: calibrated probabilities (`softmax(logits / temperature)`, the
    temperatures saved in `config`), then [`decide_safety_actions`]."""
    return decide_safety_actions(
        (level_logits.float() / config.safety_level_temperature).softmax(-1),
        (type_logits.float() / config.safety_type_temperature).softmax(-1),
        thresholds,
        actions,
        config.safety_level_labels,
        config.safety_type_labels,
        images_per_row,
    )


def generation_config_with_threshold(generation_config, default_threshold: float):
    """
    The one builder of a SafeLlava generation config: a copy of `generation_config` whose `safety_threshold` (its own,
    else `default_threshold`, e.g. `config.safety_threshold`) is checked to be in [0, 1] and survives save/load (a
    config built "from the model config" drops custom keys when reloaded). Used by `from_llava`, export and
    calibration alike.
    """
    values = {k: v for k, v in generation_config.to_diff_dict().items() if not k.startswith("_")}
    values.pop("transformers_version", None)
    threshold = values.get("safety_threshold")
    values["safety_threshold"] = check_probability(
        "generation_config.safety_threshold", default_threshold if threshold is None else threshold
    )
    return type(generation_config)(**values)


__all__ = [
    "SafetyPolicy",
    "SafetyCallRule",
    "SafeLlavaSafetyAssessment",
    "decide_safety_actions",
    "generation_config_with_threshold",
    "paper_safety_texts",
]
