"""The Hub model card of a SafeLlava export, rendered from `hub_cards/model_card_template.md`.

Everything here but `model_facts` and `load_card_template` is a pure function of its arguments, so the card can be
built and tested without a model: `render_model_card(config, evaluation, training, facts=...)`.
"""

import json
import math
from dataclasses import dataclass

import jinja2
from huggingface_hub import ModelCardData

from ..checks_safe_llava import is_number
from ..bases import base_for_model_type
from ..safety_module_safe_llava import SAFETY_PARAMETER_PREFIXES
from ..presets import preset_path

TEMPLATE_NAME = "model_card_template.md"
DEFAULT_BASE_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_LICENSE = "llama2"
CARD_TAGS = ("safety", "llava", "vision-language", "custom_code", "safe-llava")
DEMO_TAG = "tiny-demo"
# A language model below this size is a toy: the card says so loudly and never lets its numbers pass for the 7B's.
DEMO_LANGUAGE_MODEL_PARAMETERS = 1_000_000_000
REPO_ID_PLACEHOLDER = "<org>/<this-repo>"
TRAINING_STAGES = {
    "stage1": "Stage 1: safety concept extraction (safety modules only)",
    "stage2": "Stage 2: safety alignment of the language model (LoRA)",
}
TRAINING_KEYS = (*TRAINING_STAGES, "notes")
# Threshold sweeps longer than this are shown as a spread of rows (plus the best and the default threshold).
MAX_SWEEP_ROWS = 11


@dataclass(frozen=True)
class ModelFacts:
    """What the card says about the exported weights (counted once from the model by `model_facts`)."""

    total_parameters: int
    language_model_parameters: int
    safety_parameters: int
    dtype: str

    @property
    def is_demo(self) -> bool:
        """True for a toy model (language model below `DEMO_LANGUAGE_MODEL_PARAMETERS`)."""
        return self.language_model_parameters < DEMO_LANGUAGE_MODEL_PARAMETERS


def model_facts(model) -> ModelFacts:
    """Parameter counts (total; language model with its LM head; safety modules) and dtype of a SafeLlava model."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None:
        raise ValueError(
            f"Cannot find the language model of {type(model).__name__} (expected `model.model.language_model`); "
            "export takes a SafeLlavaForConditionalGeneration."
        )
    seen, language_model_parameters = set(), 0
    for module in (language_model, getattr(model, "lm_head", None)):
        for parameter in module.parameters() if module is not None else []:
            if id(parameter) not in seen:  # tied embeddings count once
                seen.add(id(parameter))
                language_model_parameters += parameter.numel()
    return ModelFacts(
        total_parameters=sum(p.numel() for p in model.parameters()),
        language_model_parameters=language_model_parameters,
        safety_parameters=sum(
            p.numel() for name, p in model.named_parameters() if name.startswith(SAFETY_PARAMETER_PREFIXES)
        ),
        dtype=str(model.dtype).removeprefix("torch."),
    )


# -- formatting -------------------------------------------------------------------------------------------------


def format_metric(value) -> str:
    """How the card writes a metric: floats with 4 decimals, ints as they are, `None`/NaN as `n/a`."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    raise ValueError(f"A metric must be a number or None, got {value!r} ({type(value).__name__}).")


def format_value(value) -> str:
    """How the card writes a setting (learning rate, data description...): compact, JSON for containers."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def format_count(count: int) -> str:
    """`6738415616` -> `"6.74B"`, `112448` -> `"112.4K"`."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.2f}B" if suffix == "B" else f"{count / size:.1f}{suffix}"
    return str(count)


def table_cell(text) -> str:
    """A string that cannot break a Markdown table row (pipes escaped, newlines as <br>)."""
    return str(text).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _label(key) -> str:
    text = str(key).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _is_number(value) -> bool:
    """A metric value: a real number or None (missing)."""
    return value is None or _is_real(value)


def _is_real(value) -> bool:
    return is_number(value)


# -- metadata, model details, taxonomy and policy ----------------------------------------------------------------


def card_metadata(base_model: str, license: str, is_demo: bool) -> ModelCardData:
    """The card's YAML header (what the Hub indexes)."""
    for name, value in (("base_model", base_model), ("license", license)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string (e.g. {DEFAULT_BASE_MODEL!r}), got {value!r}.")
    tags = [*CARD_TAGS, DEMO_TAG] if is_demo else list(CARD_TAGS)
    return ModelCardData(
        license=license,
        base_model=base_model,
        pipeline_tag="image-text-to-text",
        library_name="transformers",
        tags=tags,
    )


def detail_rows(config, facts: ModelFacts, base_model: str, threshold: float) -> list[tuple[str, str]]:
    """The "Model details" table: architecture, sizes and safety settings, read from the config."""
    vision, text = config.vision_config, config.get_text_config()
    base = base_for_model_type(config.model_type)
    demo_note = " (architecture family only: this demo is not built from its weights)" if facts.is_demo else ""
    return [
        ("Architecture", f"{base.model_class.__name__}: stock {base.model_class.stock_class.__name__} + safety "
                         "projector, safety tokens, safety head"),
        ("Base model (metadata)", f"`{base_model}`{demo_note}"),
        ("Vision tower", vision_tower_description(vision)),
        ("Language model", f"{text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
                           f"{format_count(facts.language_model_parameters)} parameters"),
        ("Safety projector", f"{config.safety_projector_type}, hidden {config.safety_projector_hidden_size}, "
                             f"depth {config.safety_projector_depth}"),
        ("Safety tokens", f"{config.num_safety_tokens} (safety head) + {config.num_llm_safety_tokens} "
                          "(language model, before each image)"),
        ("Safety head", f"{config.safety_head_num_heads}-head cross-attention -> {len(config.safety_level_labels)} "
                        f"levels, {len(config.safety_type_labels)} types"),
        ("Parameters", f"{format_count(facts.total_parameters)} total, {format_count(facts.safety_parameters)} "
                       "in the safety modules"),
        ("Weights", f"safetensors, {facts.dtype}"),
        ("Safety modules trained", "yes" if config.safety_modules_trained else "**NO (random safety verdicts)**"),
        ("Default `safety_threshold`", format_value(float(threshold))),
    ]


def vision_tower_description(vision) -> str:
    """The vision tower's family and sizes, and where its pretrained weights come from when its config says so."""
    layers = getattr(vision, "num_hidden_layers", None)
    image_size = getattr(vision, "image_size", None)  # None: images of any size (Qwen2.5-VL)
    parts = [vision.model_type, *([f"{layers} layers"] if layers is not None else []), f"hidden {vision.hidden_size}",
             f"{image_size}px images" if image_size else "images of any size", f"patch {vision.patch_size}"]  # fmt: skip
    source = getattr(vision, "pretrained_weights", None)
    return ", ".join(parts) + (f"; weights: {source}" if source else "")


def taxonomy_rows(config) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """`(levels, types)`: `(index, name)` per level and `(index, name, "risky" | "clean")` per type."""
    levels = [(index, table_cell(name)) for index, name in enumerate(config.safety_level_labels)]
    last = len(config.safety_type_labels) - 1
    types = [
        (index, table_cell(name), "clean" if index == last else "risky")
        for index, name in enumerate(config.safety_type_labels)
    ]
    return levels, types


def policy_table(config) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """`(columns, rows)`: one column per risky level (1-3), one row `(type, [action per risky level])` per type."""
    columns = [f"{index}: {table_cell(name)}" for index, name in enumerate(config.safety_level_labels)][1:]
    rows = []
    for type_name in config.risky_type_labels:
        actions = config.safety_actions.get(type_name)
        if actions is None:
            raise ValueError(f"config.safety_actions has no policy for risk type {type_name!r}.")
        rows.append((table_cell(type_name), [f"`{action}`" for action in actions[1:]]))
    return columns, rows


def policy_texts(config) -> list[dict]:
    """Per risky type: its non-empty safe hints `[(level name, text)]` and its refusal (or "not set")."""
    hints, refusals = config.safety_hints or {}, config.safety_refusals or {}
    entries = []
    for type_name in config.risky_type_labels:
        texts = hints.get(type_name, [""] * len(config.safety_level_labels))
        entries.append(
            {
                "type_name": type_name,
                "hints": [
                    (config.safety_level_labels[level], " ".join(text.split()))
                    for level, text in enumerate(texts)
                    if level > 0 and text.strip()
                ],
                "refusal": " ".join(refusals[type_name].split()) if type_name in refusals else "not set",
            }
        )
    return entries


# -- training ----------------------------------------------------------------------------------------------------


def training_context(training: dict | None) -> dict | None:
    """
    The "Training" section from a dict describing both stages:
    `{"stage1": {"data": ..., "recipe": {...}, "steps": int, ...}, "stage2": {...}, "notes": str}` (each key
    optional; a stage that is absent or `None` is shown as not run; other keys of a stage are listed as they are).
    """
    if training is None:
        return None
    if not isinstance(training, dict):
        raise ValueError(f"training must be a dict with keys {list(TRAINING_KEYS)}, got {type(training).__name__}.")
    unknown = sorted(set(training) - set(TRAINING_KEYS), key=str)
    if unknown:
        raise ValueError(f"training has unknown keys {unknown}; accepted: {list(TRAINING_KEYS)}.")
    notes = training.get("notes")
    if notes is not None and not isinstance(notes, str):
        raise ValueError(f"training['notes'] must be a string, got {notes!r}.")
    stages = [_stage_context(key, title, training.get(key)) for key, title in TRAINING_STAGES.items()]
    return {"stages": stages, "notes": notes}


def _stage_context(key: str, title: str, stage) -> dict:
    if stage is None:
        return {"title": title, "ran": False}
    if not isinstance(stage, dict):
        raise ValueError(f"training[{key!r}] must be a dict (data, recipe, steps, ...) or None, got {stage!r}.")
    recipe = stage.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"training[{key!r}]['recipe'] must be a dict of settings, got {recipe!r}.")
    data = stage.get("data")
    return {
        "title": title,
        "ran": True,
        "data": None if data is None else format_value(data),
        "steps": None if stage.get("steps") is None else format_value(stage["steps"]),
        "recipe_rows": [(table_cell(_label(name)), table_cell(format_value(value))) for name, value in recipe.items()],
        "other_rows": [
            (_label(name), format_value(value))
            for name, value in stage.items()
            if name not in ("data", "recipe", "steps")
        ],
    }


# -- evaluation --------------------------------------------------------------------------------------------------


def evaluation_context(evaluation: dict | None, default_threshold: float) -> dict | None:
    """
    The "Evaluation" section from an evaluation dict, e.g. the metrics.json of `modeling_safe_llava.tools.evaluation`
    (`level`/`type`: accuracy, macro F1, per-class precision/recall/F1, confusion matrix; `threshold_sweep`;
    `per_source`; ...). Any schema is shown, walked generically:

    - a head with an `accuracy` (and `macro_f1`) also gets a headline row ("Level accuracy", "Type accuracy");
    - numbers -> summary rows (top level) or a `Name | Value` table (nested);
    - strings, booleans, short lists -> description lines;
    - `labels` + `confusion_matrix` -> a confusion table; dicts whose values are all dicts of numbers (per class,
      per source) -> one table with a row per key;
    - a list of rows with a `threshold` (or a dict keyed by threshold under a key containing "sweep") -> a
      threshold-sweep summary (range, best score, the default threshold's row);
    - anything else is named as not shown. Every number is written with `format_metric`.
    """
    if evaluation is None:
        return None
    if not isinstance(evaluation, dict):
        raise ValueError(
            f"evaluation must be a dict (an evaluate run's metrics.json), got {type(evaluation).__name__}."
        )
    context = {"meta_rows": [], "summary_rows": headline_rows(evaluation), "tables": [], "sweeps": [], "omitted": []}
    _walk(evaluation, None, context, default_threshold)
    return context


def headline_rows(evaluation: dict) -> list[tuple[str, str]]:
    """`("Level accuracy", "0.8125")`, `("Level macro F1", ...)` for each top-level head that has an accuracy."""
    rows = []
    for key, value in evaluation.items():
        if isinstance(value, dict) and _is_real(value.get("accuracy")):
            rows.append((table_cell(f"{_label(key)} accuracy"), format_metric(value["accuracy"])))
            if "macro_f1" in value and _is_number(value["macro_f1"]):
                rows.append((table_cell(f"{_label(key)} macro F1"), format_metric(value["macro_f1"])))
    return rows


def _walk(table: dict, title: str | None, context: dict, default_threshold: float | None):
    """Adds what `table` holds to `context` (see `evaluation_context`); `title` is None at the top level."""
    if title is not None and _is_matrix(table):
        context["tables"].append(_matrix_table(title, table))
        return
    scalars = [(table_cell(_label(key)), format_metric(value)) for key, value in table.items() if _is_number(value)]
    if title is None:
        context["summary_rows"].extend(scalars)
    elif scalars:
        context["tables"].append({"title": title, "columns": ["Name", "Value"], "rows": [list(r) for r in scalars]})
    prefix = "" if title is None else f"{title} / "
    confusion = _confusion_table(f"{prefix}Confusion matrix (rows: true, columns: predicted)", table)
    if confusion is not None:
        context["tables"].append(confusion)
    for key, value in table.items():
        name = f"{prefix}{_label(key)}"
        if _is_number(value) or (confusion is not None and key in ("labels", "confusion_matrix")):
            continue
        if isinstance(value, (str, bool)) or _is_short_list(value):
            context["meta_rows"].append((name, _describe(value)))
        elif _sweep_rows(key, value) is not None:
            context["sweeps"].append(sweep_summary(name, _sweep_rows(key, value), default_threshold))
        elif isinstance(value, dict) and value:
            _walk(value, name, context, None)
        else:
            context["omitted"].append(f"`{name}`")


def _is_matrix(table: dict) -> bool:
    """A dict of dicts of numbers (e.g. `{class: {precision, recall, f1, support}}`)."""
    return bool(table) and all(
        isinstance(inner, dict) and inner and all(_is_number(v) for v in inner.values()) for inner in table.values()
    )


def _matrix_table(title: str, table: dict) -> dict:
    columns = list(dict.fromkeys(column for inner in table.values() for column in inner))
    rows = [
        [table_cell(name)] + [format_metric(inner.get(column)) for column in columns] for name, inner in table.items()
    ]
    return {"title": title, "columns": [""] + [table_cell(_label(c)) for c in columns], "rows": rows}


def _confusion_table(title: str, table: dict) -> dict | None:
    """A confusion matrix with its class names, when `table` has `labels` and a matching square `confusion_matrix`."""
    labels, matrix = table.get("labels"), table.get("confusion_matrix")
    if not (isinstance(labels, list) and isinstance(matrix, list) and len(matrix) == len(labels) > 0):
        return None
    if not all(isinstance(row, list) and len(row) == len(labels) and all(map(_is_real, row)) for row in matrix):
        return None
    rows = [[table_cell(name)] + [format_metric(v) for v in row] for name, row in zip(labels, matrix)]
    return {"title": title, "columns": ["true \\ predicted"] + [table_cell(name) for name in labels], "rows": rows}


def _is_short_list(value) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= 16
        and all(isinstance(v, str) or _is_number(v) for v in value)
    )


def _describe(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(v if isinstance(v, str) else format_metric(v) for v in value)
    return str(value) if value.strip() else "(empty)"


def _sweep_rows(key, value) -> list[dict] | None:
    """A threshold sweep as rows `{"threshold": t, metric: number, ...}`, or None if `value` is not one."""
    if not value:
        return None
    if isinstance(value, list) and all(isinstance(row, dict) and _is_real(row.get("threshold")) for row in value):
        return [dict(row) for row in value]
    if isinstance(value, dict) and "sweep" in str(key).lower() and all(isinstance(v, dict) for v in value.values()):
        try:
            return [{"threshold": float(threshold), **row} for threshold, row in value.items()]
        except ValueError:
            return None
    return None


def sweep_summary(title: str, rows: list[dict], default_threshold: float | None) -> dict:
    """
    A threshold sweep as a short summary (range; columns equal on every row; the best F1 or balanced accuracy; the
    row at the default threshold) and a table of at most `MAX_SWEEP_ROWS` evenly spread thresholds (the best and
    the default rows always included).
    """
    rows = sorted(rows, key=lambda row: row["threshold"])
    metrics = list(dict.fromkeys(c for row in rows for c in row if c != "threshold" and _is_number(row[c])))
    constant = [c for c in metrics if len(rows) > 1 and all(row.get(c) == rows[0].get(c) for row in rows)]
    varying = [c for c in metrics if c not in constant]
    summary = [
        f"{len(rows)} thresholds from {format_metric(float(rows[0]['threshold']))} "
        f"to {format_metric(float(rows[-1]['threshold']))}."
    ]
    if constant:
        summary.append("On every row: " + ", ".join(f"{c} {format_metric(rows[0].get(c))}" for c in constant) + ".")
    keep = _spread_indices(len(rows), MAX_SWEEP_ROWS)
    preferred = [c for c in ("f1", "balanced_accuracy") if c in varying] + [c for c in varying if "f1" in c]
    score = preferred[0] if preferred else None
    scored = [i for i, row in enumerate(rows) if score is not None and row.get(score) is not None]
    if scored:
        best = max(scored, key=lambda i: (rows[i][score], -i))  # ties: the lowest threshold
        keep.add(best)
        summary.append(
            f"Highest {score}: {format_metric(rows[best][score])} at threshold "
            f"{format_metric(float(rows[best]['threshold']))}."
        )
    at_default = [
        i
        for i, row in enumerate(rows)
        if default_threshold is not None and math.isclose(float(row["threshold"]), default_threshold, abs_tol=1e-9)
    ]
    if at_default:
        keep.add(at_default[0])
        values = ", ".join(f"{c} {format_metric(rows[at_default[0]].get(c))}" for c in varying)
        summary.append(f"At the default threshold {format_metric(float(default_threshold))}: {values}.")
    if len(keep) < len(rows):
        summary.append(f"{len(keep)} of the {len(rows)} thresholds are shown below; the evaluation JSON has them all.")
    table = [
        [format_metric(float(rows[i]["threshold"]))] + [format_metric(rows[i].get(c)) for c in varying]
        for i in sorted(keep)
    ]
    columns = [table_cell(c) for c in ["threshold", *varying]]
    return {"title": title, "summary": summary, "columns": columns, "rows": table}


def _spread_indices(count: int, limit: int) -> set[int]:
    if count <= limit:
        return set(range(count))
    return {round(i * (count - 1) / (limit - 1)) for i in range(limit)}


# -- calibration -------------------------------------------------------------------------------------------------


def calibration_context(calibration: dict | None) -> dict | None:
    """
    The "Calibration" section from a `safe-llava calibrate` report (`modeling_safe_llava.tools.calibration`):
    temperatures, ECE before/after, the false-flag guarantee (rate, confidence, method, counts, upper bound), the
    per-category thresholds when chosen, and recall per risky type with its interval.
    """
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be a dict (a calibration.json), got {type(calibration).__name__}.")
    counts = calibration["counts"]
    recall = [
        (table_cell(name), entry["risky_rows"], entry["flagged"], format_metric(entry["recall"]),
         _interval_cell(entry.get("interval")))
        for name, entry in (calibration.get("recall") or {}).items()
    ]
    per_category = [
        (table_cell(name), format_value(float(entry["threshold"])), entry["clean_rows"], entry["allowed_exceedances"])
        for name, entry in (calibration.get("category_guarantees") or {}).items()
    ]
    return {
        "rate": format_value(float(calibration["target_false_flag_rate"])),
        "confidence": format_value(float(calibration["confidence"])),
        "threshold": format_value(float(calibration["threshold"])),
        "method": calibration["method"],
        "interval_method": calibration.get("interval_method", "n/a"),
        "ece_rows": [
            ("ECE of risk before", format_metric(calibration["ece_before"])),
            ("ECE of risk after", format_metric(calibration["ece_after"])),
            ("Level temperature", format_value(float(calibration["temperatures"]["level"]))),
            ("Type temperature", format_value(float(calibration["temperatures"]["type"]))),
        ],
        "ece_bins": calibration.get("ece_bins", "n/a"),
        "clean_rows": counts["clean"],
        "risky_rows": counts["risky"],
        "minimum_clean_rows": counts.get("minimum_clean_rows", "n/a"),
        "allowed_exceedances": counts.get("allowed_exceedances", "n/a"),
        "clean_flagged": counts.get("clean_flagged_at_default_threshold", counts.get("clean_flagged", "n/a")),
        "upper_bound": format_metric(calibration.get("clean_flag_rate_upper_bound")),
        "per_category": per_category,
        "recall": recall,
    }


def _interval_cell(interval) -> str:
    if not interval:
        return "n/a"
    return f"[{format_metric(float(interval[0]))}, {format_metric(float(interval[1]))}]"


# -- the card ----------------------------------------------------------------------------------------------------


def load_card_template(name: str = TEMPLATE_NAME) -> jinja2.Template:
    """A card template from `hub_cards/`; undefined variables raise instead of rendering as empty text."""
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        autoescape=False,
    )
    return environment.from_string(preset_path("hub_cards", name).read_text())


def render_model_card(
    config,
    evaluation: dict | None = None,
    training: dict | None = None,
    *,
    facts: ModelFacts,
    threshold: float | None = None,
    base_model: str = DEFAULT_BASE_MODEL,
    license: str = DEFAULT_LICENSE,
    model_name: str | None = None,
    repo_id: str | None = None,
    evaluation_source: str | None = None,
    evaluation_copied: bool = False,
    template_name: str = TEMPLATE_NAME,
    calibration: dict | None = None,
) -> str:
    """
    The model card (Markdown with a YAML header) of a SafeLlava checkpoint.

    Args:
        config: the model's `SafeLlavaConfig` (taxonomy, policies, `safety_modules_trained`).
        evaluation: an evaluation dict (see `evaluation_context`), or None for "not evaluated".
        training: a dict describing both training stages (see `training_context`), or None.
        facts: parameter counts and dtype (`model_facts(model)`); a language model under 1B parameters makes the
            card a loud "tiny demo model" card.
        threshold: the default `safety_threshold` (the generation config's); defaults to `config.safety_threshold`.
        base_model, license: YAML metadata.
        model_name: the card's title; repo_id: the Hub id in the usage snippet (a placeholder when None).
        evaluation_source: where the evaluation came from (shown in the card); evaluation_copied: whether the
            export folder carries it as `evaluation_metrics.json`.
        calibration: a `safe-llava calibrate` report (see `calibration_context`), or None for "not calibrated".
    """
    threshold = config.safety_threshold if threshold is None else threshold
    levels, types = taxonomy_rows(config)
    policy_columns, policy_rows = policy_table(config)
    metadata = card_metadata(base_model, license, facts.is_demo)
    context = {
        "metadata_yaml": metadata.to_yaml(),
        "model_name": model_name or repo_id or "SafeLlava",
        "is_demo": facts.is_demo,
        "untrained": not config.safety_modules_trained,
        "language_model_parameters": format_count(facts.language_model_parameters),
        "details": [
            (table_cell(name), table_cell(value)) for name, value in detail_rows(config, facts, base_model, threshold)
        ],
        "repo_id": repo_id or REPO_ID_PLACEHOLDER,
        "threshold": format_value(float(threshold)),
        "level_rows": levels,
        "level_zero_name": config.safety_level_labels[0],
        "type_rows": types,
        "num_risky_types": len(config.risky_type_labels),
        "policy_columns": policy_columns,
        "policy_rows": policy_rows,
        "policy_texts": policy_texts(config),
        "training": training_context(training),
        "evaluation": evaluation_context(evaluation, float(threshold)),
        "evaluation_source": evaluation_source,
        "evaluation_copied": evaluation_copied,
        "calibration": calibration_context(calibration),
        "base_model": base_model,
    }
    return load_card_template(template_name).render(**context)


__all__ = [
    "ModelFacts",
    "model_facts",
    "format_metric",
    "card_metadata",
    "training_context",
    "evaluation_context",
    "calibration_context",
    "sweep_summary",
    "render_model_card",
]
