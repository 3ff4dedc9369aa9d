"""Trainable setups for the training-step benchmark, built with the project's own stage code
(`modeling_safe_llava.training.stages.prepare_for_stage`) so that the benchmark measures what training runs."""

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from modeling_safe_llava.training.stages import language_model_lora_targets, prepare_for_stage, stage2_lora_config

TRAINING_KINDS = ("stock_lora", "stage1", "stage2")
LEARNING_RATE = 1e-5


@dataclass
class TrainingSetup:
    """A model ready to train, its AdamW optimizer over the trainable parameters, and what was made trainable."""

    model: torch.nn.Module
    base_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable_parameters: int
    source: str


def prepare_training(model, kind: str, lora: dict) -> TrainingSetup:
    """
    Args:
        model: stock `LlavaForConditionalGeneration` for `"stock_lora"`, else `SafeLlavaForConditionalGeneration`.
        kind: `"stock_lora"` (LoRA on every linear layer of the language model, the same targets and settings as
            stage 2), `"stage1"` (only the safety modules train) or `"stage2"` (LoRA, safety modules frozen).
        lora: `{"r", "lora_alpha", "lora_dropout"}`.
    """
    if kind not in TRAINING_KINDS:
        raise ValueError(f"Unknown training setup {kind!r}; accepted: {', '.join(TRAINING_KINDS)}.")
    lora = {k: v for k, v in lora.items() if not k.startswith("_")}
    base_model = model
    if kind == "stock_lora":
        model = _stock_lora(model, lora)
        source = "peft LoRA on language_model_lora_targets(stock), as stages.stage2_lora_config"
    elif kind == "stage1":
        model, _ = prepare_for_stage(model, 1)
        source = "modeling_safe_llava.training.stages.prepare_for_stage(model, 1)"
    else:
        model, _ = prepare_for_stage(model, 2, lora_config=stage2_lora_config(model, **lora))
        source = "modeling_safe_llava.training.stages.prepare_for_stage(model, 2, stage2_lora_config(model, **lora))"
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    return TrainingSetup(model, base_model, optimizer, sum(p.numel() for p in trainable), source)


def _stock_lora(model, lora: dict):
    """Stock LLaVA wrapped like stage 2 (`stages._wrap_in_lora`): everything frozen, input grads on, LoRA."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.enable_input_require_grads()
    config = LoraConfig(target_modules=language_model_lora_targets(model), bias="none", **lora)
    return get_peft_model(model, config)
