"""High-level training entry points: `train_stage1` and `train_stage2` with the stock `transformers.Trainer`.

```python
from modeling_safe_llava.training import train_stage1, train_stage2

model = train_stage1(model, processor, "risk_data.jsonl", "out/stage1", recipe="recipe_stage1_7b.json")
model = train_stage2(SafeLlavaForConditionalGeneration.from_pretrained("out/stage1"), processor,
                     "all_data.jsonl", "out/stage2", recipe="recipe_stage2_7b.json", merge_adapter=True)
```

Keyword overrides are fields of `transformers.TrainingArguments`, `DataArguments` or (stage 2) `LoraArguments`
(e.g. `max_steps=10`, `skip_bad_rows=True`, `resume_from_checkpoint="latest"`).
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction

from ..safety_loading_safe_llava import DTYPES
from .arguments import DataArguments, LoraArguments, ModelArguments, load_recipe, resolve_stage_arguments
from .augment import with_augmentation
from .collator import IGNORE_INDEX, SafeLlavaTrainingCollator
from .data import data_root, load_safety_dataset, prepare_safety_dataset
from .stages import prepare_for_stage, restore_checkpoint_weights, save_stage1, save_stage2, stage2_lora_config


logger = logging.getLogger(__name__)

LATEST_CHECKPOINT = "latest"


def train_stage1(
    model: nn.Module,
    processor,
    train_dataset,
    output_dir: str | Path,
    recipe="recipe_stage1_tiny.json",
    eval_dataset=None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides,
) -> nn.Module:
    """
    Stage 1: trains only the safety modules, then saves a full SafeLlava (with remote code and the processor) in
    `output_dir`, marked `config.safety_modules_trained = True`. With `eval_dataset`, the final evaluation (loss and
    the safety head's level/type accuracy) is logged and written to `output_dir/eval_results.json`.

    Args:
        model: a `SafeLlavaForConditionalGeneration`.
        processor: its `SafeLlavaProcessor` (with the chat template).
        train_dataset, eval_dataset: anything `load_safety_dataset` accepts (file path, list of records,
            `datasets.Dataset`); rows are validated first.
        recipe: a recipe name in `configuration/`, a JSON path or a dict.
        callbacks: extra `TrainerCallback`s.
        overrides: fields of `TrainingArguments` / `DataArguments` (and `LoraArguments` in stage 2).

    Returns:
        The trained model (the same object).
    """
    return _train_stage(1, model, processor, train_dataset, output_dir, recipe, eval_dataset, callbacks, overrides)


def train_stage2(
    model: nn.Module,
    processor,
    train_dataset,
    output_dir: str | Path,
    recipe="recipe_stage2_tiny.json",
    eval_dataset=None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides,
) -> nn.Module:
    """
    Stage 2: LoRA on the language model of a stage-1 model; saves the adapter and the processor in `output_dir`
    (and with `merge_adapter=True` a merged full model in `output_dir/merged`).

    Args: as `train_stage1`; `model` is the stage-1 model (e.g. loaded from the stage-1 folder).

    Returns:
        The `peft.PeftModel`, or the merged `SafeLlavaForConditionalGeneration` with `merge_adapter=True`.
    """
    return _train_stage(2, model, processor, train_dataset, output_dir, recipe, eval_dataset, callbacks, overrides)


def _train_stage(stage, model, processor, train_dataset, output_dir, recipe, eval_dataset, callbacks, overrides):
    training_args, data_args, lora_args = resolve_stage_arguments(stage, recipe, output_dir, **overrides)
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    train = _prepare_split(train_dataset, model.config, data_args, training_args, "train")
    train = with_augmentation(train, data_args.image_augmentation, training_args.seed)
    evaluation = None
    if eval_dataset is not None:
        evaluation = _prepare_split(eval_dataset, model.config, data_args, training_args, "eval")
    model, _ = _prepare_model(stage, model, lora_args)
    objective = load_recipe(recipe, stage)["objective"]
    trained = SafetyHeadObjective(model) if objective == "safety_head" else model
    trainer = build_trainer(trained, processor, training_args, train, evaluation, data_args.max_length, callbacks)
    if checkpoint is not None and stage == 1 and trained is model:
        restore_checkpoint_weights(model, checkpoint)  # the Trainer's own resume skips renamed (frozen) weights
    trainer.train(resume_from_checkpoint=checkpoint)
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)  # <output_dir>/eval_results.json
    return _save_stage(stage, trainer, model, processor, output_dir, lora_args)


class SafetyHeadObjective(nn.Module):
    """
    The stage-1 objective `"safety_head"`: the safety loss alone, through `model.safety_forward` (vision tower,
    safety projector and head; the language model never runs). The Trainer trains this wrapper; its parameters are
    the model's own, so the model is trained in place.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, pixel_values, attention_mask=None, safety_labels=None, labels=None, **image_fields):
        # `labels` (LM targets) are accepted and unused: the collator is the same for both objectives. The base's
        # other image fields (LLaVA-NeXT: `image_sizes`) go to its image encoder.
        return self.model.safety_forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            safety_labels=safety_labels,
            **image_fields,
        )


def _prepare_split(source, config, data_args: DataArguments, training_args: TrainingArguments, split_name: str):
    """Loads (the main process first, so that others reuse its `datasets` cache), then checks rows on every rank."""
    with training_args.main_process_first(desc=f"loading the {split_name} data"):
        dataset = load_safety_dataset(source, data_args.image_root)
    return prepare_safety_dataset(
        dataset,
        num_levels=len(config.safety_level_labels),
        num_types=len(config.safety_type_labels),
        image_root=data_root(source, data_args.image_root),  # image paths must stay in it (unless allowed)
        allow_images_outside_root=data_args.allow_images_outside_root,
        skip_bad_rows=data_args.skip_bad_rows,
        output_dir=training_args.output_dir if training_args.process_index == 0 else None,
        clean_subsample=data_args.clean_subsample if split_name == "train" else None,
        clean_subsample_seed=data_args.clean_subsample_seed,
        split_name=split_name,
        num_proc=data_args.validation_workers,
    )


def _prepare_model(stage: int, model: nn.Module, lora_args: LoraArguments | None):
    if stage == 1:
        model, trainable = prepare_for_stage(model, 1)
    else:
        lora = stage2_lora_config(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout)
        model, trainable = prepare_for_stage(model, 2, lora, train_safety_modules=lora_args.train_safety_modules)
    upcast_trainable_parameters(model)
    return model, trainable


def upcast_trainable_parameters(model: nn.Module) -> list[str]:
    """Casts trainable half-precision parameters to float32 (the optimizer needs it); frozen ones keep their dtype."""
    upcast = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
            upcast.append(name)
    if upcast:
        logger.info("Trainable parameters kept in float32: %d tensors.", len(upcast))
    return upcast


def _save_stage(stage, trainer: Trainer, model, processor, output_dir, lora_args: LoraArguments | None):
    if trainer.is_world_process_zero():
        if stage == 1:
            save_stage1(model, processor, output_dir)
        else:
            model = save_stage2(model, processor, output_dir, lora_args.merge_adapter, lora_args.train_safety_modules)
    elif stage == 1:
        model.config.safety_modules_trained = True
    elif lora_args.merge_adapter:
        model = model.merge_and_unload()
    trainer.accelerator.wait_for_everyone()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def build_trainer(
    model: nn.Module,
    processor,
    training_args: TrainingArguments,
    train_dataset,
    eval_dataset=None,
    max_length: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """
    The stock `Trainer` with the training collator; evaluation reports the safety head's accuracy.

    The model is marked `accepts_loss_kwargs = False`: SafeLlava's loss adds a per-row mean safety loss to the LM
    loss, so it must not be treated as normalized by the Trainer's global token count (which would multiply the
    safety term by the gradient-accumulation steps and the number of processes). The Trainer then averages the
    returned loss over accumulation steps and DDP averages over processes, as for any per-batch mean loss.
    """
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_model.accepts_loss_kwargs = False
    return Trainer(
        model=model,
        args=training_args,
        data_collator=SafeLlavaTrainingCollator(processor, max_length=max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=safety_accuracy,
        preprocess_logits_for_metrics=safety_predictions,
        callbacks=callbacks,
    )


def safety_predictions(logits, labels) -> torch.Tensor:
    """
    Keeps only what the metrics need from a batch's outputs (never the `(B, T, vocab)` LM logits).

    `logits` is the tuple of the model output's tensors (loss left out), in field order, which ends with the
    safety level logits `(B, 4)` and type logits `(B, 7)`. Returns `(B, 2)`: predicted (level, type).
    """
    if not isinstance(logits, (tuple, list)) or len(logits) < 2:
        raise ValueError("Expected the model outputs to end with safety_level_logits and safety_type_logits.")
    level_logits, type_logits = logits[-2], logits[-1]
    return torch.stack([level_logits.argmax(dim=-1), type_logits.argmax(dim=-1)], dim=-1)


def safety_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`safety_level_accuracy`, `safety_type_accuracy` and `safety_both_accuracy` over labelled rows."""
    predicted = np.asarray(prediction.predictions)
    safety_labels = np.asarray(prediction.label_ids[1])
    labelled = (safety_labels != IGNORE_INDEX).all(axis=1)
    if not labelled.any():
        return {}
    predicted, safety_labels = predicted[labelled], safety_labels[labelled]
    level_ok = predicted[:, 0] == safety_labels[:, 0]
    type_ok = predicted[:, 1] == safety_labels[:, 1]
    return {
        "safety_level_accuracy": float(level_ok.mean()),
        "safety_type_accuracy": float(type_ok.mean()),
        "safety_both_accuracy": float((level_ok & type_ok).mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Loading the starting model (scripts)
# ----------------------------------------------------------------------------------------------------------------



def load_model_and_processor(model_args: ModelArguments, stage: int):
    """
    The model and processor a stage starts from.

    - no `model_name_or_path` (stage 1 only): a tiny random SafeLlava built offline, for demos;
    - a stock checkpoint of a base (stage 1 only; LLaVA-1.5, ...: `bases.BASES`): converted with `from_base`, safety
      modules freshly added, policy texts from `model_args.safety_policy`;
    - a SafeLlava folder or Hub id of any base (for stage 2: the stage-1 output folder).
    """
    from transformers import AutoConfig

    from ..bases import base_for_model_type, base_for_stock_model_type
    from ..presets import load_safety_policy
    from ..tiny import build_tiny_safe_llava

    path = model_args.model_name_or_path
    if path is None:
        if stage == 2:
            raise ValueError(
                "Stage 2 starts from the stage-1 model: pass --model_name_or_path <stage-1 output folder>."
            )
        logger.warning("No model_name_or_path: building a tiny random SafeLlava (a demo, not a real model).")
        return build_tiny_safe_llava(seed=model_args.seed_for_tiny_model)
    if model_args.dtype not in DTYPES:
        raise ValueError(f"dtype={model_args.dtype!r} is not supported; accepted: {sorted(DTYPES)}.")
    dtype = DTYPES[model_args.dtype]
    model_type = AutoConfig.from_pretrained(path).model_type
    stock_base = base_for_stock_model_type(model_type)
    if stock_base is not None:
        if stage == 2:
            raise ValueError(f"{path} is a stock {model_type} checkpoint; stage 2 starts from the stage-1 output folder.")
        policy = load_safety_policy(model_args.safety_policy)
        model = stock_base.model_class.from_base(path, dtype=dtype, **policy)
        processor = stock_base.processor_class.from_base(path, num_llm_safety_tokens=model.config.num_llm_safety_tokens)
        model.tokenize_safety_texts(processor)
        return model, processor
    base = base_for_model_type(model_type)
    return base.model_class.from_pretrained(path, dtype=dtype), base.processor_class.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------------


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """
    The newest `checkpoint-N` folder of `output_dir` that was written completely (its `trainer_state.json`, the
    last file the Trainer writes, parses), or `None`. A run killed while saving leaves a partial folder behind.
    """
    candidates = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        step = folder.name.split("-", 1)[1]
        if not step.isdigit():
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring incomplete checkpoint %s.", folder)
            continue
        candidates.append((int(step), folder))
    return max(candidates)[1] if candidates else None


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir) -> str | None:
    """`"latest"` -> the last complete checkpoint in `output_dir` (raises if there is none); a path is kept."""
    if resume_from_checkpoint in (None, "", False):
        return None
    if resume_from_checkpoint in (LATEST_CHECKPOINT, True):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint='latest' but {output_dir} holds no complete checkpoint-N folder."
            )
        logger.info("Resuming from %s.", checkpoint)
        return str(checkpoint)
    if not Path(resume_from_checkpoint).is_dir():
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is not a folder; accepted: a checkpoint-N folder or "
            f"{LATEST_CHECKPOINT!r}."
        )
    return str(resume_from_checkpoint)


__all__ = [
    "train_stage1",
    "train_stage2",
    "build_trainer",
    "safety_predictions",
    "safety_accuracy",
    "upcast_trainable_parameters",
    "load_model_and_processor",
    "last_complete_checkpoint",
    "resolve_resume_checkpoint",
]
