"""Two-stage training of SafeLlava (arXiv 2405.13581) with the stock `transformers.Trainer`.

- `data`: the paper's record schema, row validation, bad-row reports, clean subsampling.
- `collator`: records -> exactly what `SafeLlavaForConditionalGeneration.forward` takes.
- `stages`: `prepare_for_stage` (what trains in stage 1 / 2, LoRA), saving and loading.
- `arguments`: dataclasses for `HfArgumentParser` and recipes from `configuration/`.
- `run`: `train_stage1` / `train_stage2`.

Needs the `train` extra (`peft`, `datasets`, `accelerate`).
"""

from .arguments import (
    DEFAULT_RECIPES,
    DataArguments,
    LoraArguments,
    ModelArguments,
    StageArguments,
    build_parser,
    load_recipe,
    parse_command_line,
    resolve_stage_arguments,
)
from .collator import SafeLlavaPromptCollator, SafeLlavaTrainingCollator, safety_labels_of
from .data import (
    BadRow,
    check_record,
    drop_bad_rows,
    find_bad_rows,
    load_image,
    load_safety_dataset,
    prepare_safety_dataset,
    subsample_clean_rows,
    synthetic_safety_records,
    to_chat_messages,
)
from .run import (
    build_trainer,
    last_complete_checkpoint,
    load_model_and_processor,
    resolve_resume_checkpoint,
    safety_accuracy,
    train_stage1,
    train_stage2,
)
from .stages import (
    PAPER_LORA,
    is_lora_parameter,
    is_safety_parameter,
    language_model_lora_targets,
    load_stage2_model,
    lora_module_names,
    prepare_for_stage,
    restore_checkpoint_weights,
    save_stage1,
    save_stage2,
    stage2_lora_config,
    trainable_parameter_names,
)


__all__ = [
    "DEFAULT_RECIPES",
    "ModelArguments",
    "DataArguments",
    "LoraArguments",
    "StageArguments",
    "build_parser",
    "load_recipe",
    "parse_command_line",
    "resolve_stage_arguments",
    "SafeLlavaTrainingCollator",
    "SafeLlavaPromptCollator",
    "safety_labels_of",
    "BadRow",
    "check_record",
    "drop_bad_rows",
    "find_bad_rows",
    "load_image",
    "load_safety_dataset",
    "prepare_safety_dataset",
    "subsample_clean_rows",
    "synthetic_safety_records",
    "to_chat_messages",
    "build_trainer",
    "last_complete_checkpoint",
    "load_model_and_processor",
    "resolve_resume_checkpoint",
    "safety_accuracy",
    "train_stage1",
    "train_stage2",
    "PAPER_LORA",
    "is_lora_parameter",
    "is_safety_parameter",
    "language_model_lora_targets",
    "load_stage2_model",
    "lora_module_names",
    "prepare_for_stage",
    "restore_checkpoint_weights",
    "save_stage1",
    "save_stage2",
    "stage2_lora_config",
    "trainable_parameter_names",
]
