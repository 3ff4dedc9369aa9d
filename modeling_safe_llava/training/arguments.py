"""Arguments of the two training stages: dataclasses for `HfArgumentParser`, and recipes kept as data.

A recipe (`configuration/recipe_*.json`) groups values for three dataclasses:

```json
{"stage": 1,
 "training_arguments": {"learning_rate": 1e-05, "num_train_epochs": 3, ...},   # transformers.TrainingArguments
 "data_arguments": {"clean_subsample": 3000, ...},                             # DataArguments
 "lora_arguments": {"lora_r": 256, ...}}                                       # LoraArguments (stage 2 only)
```

Precedence: dataclass default < recipe < explicit override (a keyword of `train_stage1` or a command-line flag).
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..presets import load_json_preset


DEFAULT_RECIPES = {1: "recipe_stage1_tiny.json", 2: "recipe_stage2_tiny.json"}
LABEL_NAMES = ["labels", "safety_labels"]
RECIPE_GROUPS = ("training_arguments", "data_arguments", "lora_arguments")


@dataclass
class ModelArguments:
    """Which model the scripts start from (the Python API takes a model object instead)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stage 1: a SafeLlava folder or Hub id, or a stock LLaVA-1.5 checkpoint (e.g. "
            "llava-hf/llava-1.5-7b-hf) whose safety modules are then freshly added. Stage 2: the stage-1 output "
            "folder. Stage 1 without it builds a tiny random model offline (a demo, not a real model)."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype to load the model in: float32, bfloat16 or float16. Trainable parameters are kept in "
            "float32 either way (e.g. --dtype bfloat16 --bf16 for the 7B model)."
        },
    )
    safety_policy: str = field(
        default="paper_safety_policy.json",
        metadata={"help": "Safety-policy preset in processors/ used when converting a stock LLaVA checkpoint."},
    )
    seed_for_tiny_model: int = field(
        default=0, metadata={"help": "Seed of the tiny random model built when --model_name_or_path is not given."}
    )


@dataclass
class DataArguments:
    """Training data in the paper's schema and how it is checked."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training records: a .json (list) or .jsonl file with image, conversations, safe_level, "
            "safe_type. Without it a small built-in synthetic dataset is used (offline demo only)."
        },
    )
    eval_file: str | None = field(default=None, metadata={"help": "Optional evaluation records, same schema."})
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder that relative image paths start from; unset: the data file's folder."},
    )
    allow_images_outside_root: bool = field(
        default=False,
        metadata={
            "help": "Accept image paths that leave the data root (absolute paths elsewhere, or '..' climbing out of "
            "--image_root or the data file's folder). Off: such rows are bad rows, so that a downloaded data file "
            "cannot make training read files such as ~/.ssh or /etc. Only for data files you trust."
        },
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop rows that cannot be trained on (listed in <output_dir>/skipped_rows.json) instead of "
            "stopping with a report of every bad row."
        },
    )
    clean_subsample: int | None = field(
        default=None,
        metadata={
            "help": "Keep this many clean rows (safe_type = Clean), chosen at random; the paper keeps 3000 in stage 1."
        },
    )
    clean_subsample_seed: int = field(default=42, metadata={"help": "Seed of the clean-row choice (paper: 42)."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Cut each training row to this many tokens (a cut into image placeholders is an error)."},
    )
    validation_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for the row check before training (it decodes every image); unset: one."},
    )
    synthetic_rows: int = field(
        default=64, metadata={"help": "Rows of the built-in synthetic dataset used without --train_file."}
    )
    image_augmentation: str | None = field(
        default=None,
        metadata={
            "help": "Label-preserving augmentation of training images: a comma-separated subset of invert, affine "
            "(modeling_safe_llava/training/augment.py); unset: none. Evaluation images are never augmented."
        },
    )

    def __post_init__(self):
        from .augment import parse_augmentations  # a typo fails here, before any row is loaded

        parse_augmentations(self.image_augmentation)


@dataclass
class StageArguments:
    """Which recipe a script starts from."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Recipe in configuration/ (e.g. recipe_stage1_7b.json) or a JSON file path; its values are the "
            "defaults of every other flag. Default: the stage's tiny CPU recipe."
        },
    )


@dataclass
class LoraArguments:
    """Stage 2 only: the LoRA adapter on the language model, and what else trains."""

    lora_r: int = field(default=256, metadata={"help": "LoRA rank (paper: 256)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (paper: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper: 0.05)."})
    train_safety_modules: bool = field(
        default=False,
        metadata={"help": "Keep training the safety modules next to LoRA (the paper freezes them in stage 2)."},
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also write the merged model to <output_dir>/merged."}
    )


# Stage-1 objectives: "full" = LM loss + weighted safety loss (the paper); "safety_head" = the safety loss alone
# through `model.safety_forward`, which never runs the language model (much cheaper; the LLM safety tokens then get
# no gradient and stay as initialised).
STAGE1_OBJECTIVES = ("full", "safety_head")

_GROUP_CLASSES = {
    "training_arguments": TrainingArguments,
    "data_arguments": DataArguments,
    "lora_arguments": LoraArguments,
}


def recipe_groups(stage: int) -> tuple[str, ...]:
    """The argument groups a recipe of `stage` may hold (`lora_arguments` only in stage 2)."""
    return RECIPE_GROUPS if stage == 2 else RECIPE_GROUPS[:2]


def init_field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------


def load_recipe(recipe, stage: int | None = None) -> dict:
    """
    Reads and checks a recipe.

    Args:
        recipe: a preset name in `configuration/` (`"recipe_stage1_7b.json"`), a JSON file path, or a dict.
        stage: when given, the recipe's `"stage"` must equal it.

    Returns:
        `{"stage": int, "training_arguments": {...}, "data_arguments": {...}}`, plus `"lora_arguments"` in stage 2.
    """
    if isinstance(recipe, dict):
        raw = dict(recipe)
    elif isinstance(recipe, (str, Path)) and Path(recipe).is_file():
        raw = json.loads(Path(recipe).read_text())
    elif isinstance(recipe, str):
        raw = load_json_preset("configuration", recipe)
    else:
        raise ValueError(f"A recipe is a preset name, a JSON file path or a dict, got {type(recipe).__name__}.")
    if raw.get("stage") not in (1, 2):
        raise ValueError(
            f"Recipe {recipe!r} must say which stage it is for ('stage': 1 or 2), got {raw.get('stage')!r}."
        )
    if stage is not None and raw["stage"] != stage:
        raise ValueError(f"Recipe {recipe!r} is for stage {raw['stage']}, not stage {stage}.")
    groups = recipe_groups(raw["stage"])
    unknown = sorted(set(raw) - {"stage", "_comment", "objective", *groups})
    if unknown:
        raise ValueError(f"Recipe {recipe!r} has unknown keys {unknown}; accepted: 'stage', {list(groups)}.")
    objective = raw.get("objective", "full")
    if objective not in STAGE1_OBJECTIVES or (objective != "full" and raw["stage"] != 1):
        raise ValueError(
            f"Recipe {recipe!r}: objective {objective!r} is not supported; accepted: {list(STAGE1_OBJECTIVES)} "
            "(anything but 'full' in stage 1 only)."
        )
    loaded = {"stage": raw["stage"], "objective": objective}
    for group in groups:
        values = dict(raw.get(group, {}))
        cls = _GROUP_CLASSES[group]
        bad = sorted(set(values) - set(init_field_names(cls)))
        if bad:
            raise ValueError(f"Recipe {recipe!r}: {group} has unknown fields {bad} (not fields of {cls.__name__}).")
        loaded[group] = values
    return loaded


def flat_recipe_values(recipe: dict) -> dict:
    """The values of every group of a loaded recipe in one dict (field names are unique across the groups)."""
    return {key: value for group in recipe_groups(recipe["stage"]) for key, value in recipe[group].items()}


def resolve_stage_arguments(
    stage: int, recipe, output_dir: str | Path, **overrides
) -> tuple[TrainingArguments, DataArguments, LoraArguments | None]:
    """
    The arguments of one run: dataclass defaults, then the recipe, then `overrides` (fields of
    `TrainingArguments`, `DataArguments` or, in stage 2, `LoraArguments`).

    `remove_unused_columns` must stay False (the collators read the raw record columns) and `label_names`
    defaults to `["labels", "safety_labels"]`.

    Returns:
        `(training_arguments, data_arguments, lora_arguments)`; `lora_arguments` is `None` in stage 1.
    """
    loaded = load_recipe(DEFAULT_RECIPES[stage] if recipe is None else recipe, stage)
    values = {**flat_recipe_values(loaded), **overrides}
    groups = recipe_groups(stage)
    owners = {name: group for group in groups for name in init_field_names(_GROUP_CLASSES[group])}
    unknown = sorted(key for key in values if key not in owners)
    if unknown:
        accepted = ", ".join(f"{_GROUP_CLASSES[group].__name__}" for group in groups)
        raise ValueError(f"Unknown stage-{stage} training option(s) {unknown}; accepted: fields of {accepted}.")
    grouped = {group: {} for group in groups}
    for key, value in values.items():
        grouped[owners[key]][key] = value
    training = grouped["training_arguments"]
    if training.get("remove_unused_columns", False):
        raise ValueError("remove_unused_columns must be False: the collators need the raw record columns.")
    training.update(output_dir=str(output_dir), remove_unused_columns=False)
    training.setdefault("label_names", list(LABEL_NAMES))
    lora = LoraArguments(**grouped["lora_arguments"]) if stage == 2 else None
    return TrainingArguments(**training), DataArguments(**grouped["data_arguments"]), lora


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def script_dataclasses(stage: int) -> tuple[type, ...]:
    """What a stage's script parses (LoRA options only in stage 2)."""
    common = (ModelArguments, DataArguments, StageArguments)
    return (*common, LoraArguments, TrainingArguments) if stage == 2 else (*common, TrainingArguments)


def build_parser(stage: int, recipe=None) -> HfArgumentParser:
    """`HfArgumentParser` over the stage's dataclasses, with the recipe's values as defaults (so `--help` shows what
    a run will use)."""
    parser = HfArgumentParser(
        script_dataclasses(stage),
        description=f"SafeLlava stage-{stage} training with transformers.Trainer (recipe values are the defaults).",
    )
    loaded = load_recipe(DEFAULT_RECIPES[stage] if recipe is None else recipe, stage)
    parser.set_defaults(**flat_recipe_values(loaded), recipe=recipe or DEFAULT_RECIPES[stage])
    return parser


def parse_command_line(stage: int, args: list[str] | None = None) -> tuple[ModelArguments, str, dict]:
    """
    Parses a script's command line.

    Returns:
        `(model_arguments, recipe, overrides)` where `overrides` holds only the flags given explicitly (fields of
        `TrainingArguments`, `DataArguments`, `LoraArguments`), ready for `train_stage1(..., **overrides)`.
    """
    args = sys.argv[1:] if args is None else list(args)
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", default=None)
    recipe = recipe_parser.parse_known_args(args)[0].recipe or DEFAULT_RECIPES[stage]
    parser = build_parser(stage, recipe)
    parser.parse_args_into_dataclasses(args)  # full check (and --help) with the recipe's defaults
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(args))
    model_fields = init_field_names(ModelArguments)
    model_arguments = ModelArguments(**{key: value for key, value in explicit.items() if key in model_fields})
    overrides = {key: value for key, value in explicit.items() if key not in model_fields and key != "recipe"}
    return model_arguments, recipe, overrides


__all__ = [
    "DEFAULT_RECIPES",
    "LABEL_NAMES",
    "ModelArguments",
    "DataArguments",
    "StageArguments",
    "LoraArguments",
    "load_recipe",
    "resolve_stage_arguments",
    "build_parser",
    "parse_command_line",
]
