"""The two training stages of arXiv 2405.13581 in one place: what trains, the LoRA setup, and what is saved.

- Stage 1 ("safety concept extraction"): only the safety modules train (both safety-token sets, the safety
  projector and the safety head); the vision tower, LLaVA's projector and the language model stay frozen.
- Stage 2: LoRA on every linear layer of the language model (paper: r 256, alpha 16, dropout 0.05), starting from
  the saved stage-1 model; the safety modules stay frozen unless asked otherwise.
"""

import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from ..checks_safe_llava import is_integer
from ..modeling_safe_llava import SAFETY_PARAMETER_PREFIXES


logger = logging.getLogger(__name__)

STAGES = (1, 2)
PAPER_LORA = {"r": 256, "lora_alpha": 16, "lora_dropout": 0.05}
SAFETY_MODULES_FILE = "safety_modules.safetensors"
MERGED_SUBFOLDER = "merged"
_PEFT_PREFIX = "base_model.model."


def check_stage(stage) -> int:
    """`1`, `2`, `"1"`, `"2"`, `"stage1"` or `"stage2"` -> 1 or 2; anything else raises."""
    aliases = {1: 1, 2: 2, "1": 1, "2": 2, "stage1": 1, "stage2": 2}
    if not (is_integer(stage) or isinstance(stage, str)) or stage not in aliases:
        raise ValueError(f"Unknown training stage {stage!r}; accepted: 1, 2, 'stage1', 'stage2'.")
    return aliases[stage]


def unwrapped_name(name: str) -> str:
    """A parameter name without the `base_model.model.` prefix a `PeftModel` adds."""
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def is_safety_parameter(name: str) -> bool:
    """Whether a parameter (of SafeLlava, or of a PeftModel around it) belongs to the safety modules."""
    return unwrapped_name(name).startswith(SAFETY_PARAMETER_PREFIXES)


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients, in `named_parameters` order."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def language_model_prefix(model: nn.Module) -> str:
    """Qualified name of the language model inside `model` (`"model.language_model"` for SafeLlava)."""
    language_model = model.model.language_model
    for name, module in model.named_modules():
        if module is language_model:
            return name
    raise ValueError(f"{type(model).__name__} holds no language model at model.model.language_model.")


def language_model_lora_targets(model: nn.Module) -> str:
    """
    A `target_modules` regex matching every `nn.Linear` of the language model and nothing else (not `lm_head`,
    the vision tower, LLaVA's projector or the safety modules), e.g.
    `r".*language_model\\..*\\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"` for Llama.
    """
    prefix = language_model_prefix(model)
    leaf_names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix + ".")
        }
    )
    if not leaf_names:
        raise ValueError(f"The language model ({prefix}) has no nn.Linear layer for LoRA.")
    return rf".*{re.escape(prefix.rsplit('.', 1)[-1])}\..*\.({'|'.join(leaf_names)})"


def stage2_lora_config(
    model: nn.Module,
    r: int = PAPER_LORA["r"],
    lora_alpha: int = PAPER_LORA["lora_alpha"],
    lora_dropout: float = PAPER_LORA["lora_dropout"],
) -> LoraConfig:
    """The paper's stage-2 LoRA (r 256, alpha 16, dropout 0.05) on every linear layer of the language model."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=language_model_lora_targets(model),
        bias="none",
    )


def lora_module_names(model: nn.Module) -> list[str]:
    """Unwrapped names of the modules that carry a LoRA adapter."""
    lora_names = [unwrapped_name(name) for name, _ in model.named_parameters() if is_lora_parameter(name)]
    return sorted({name.rsplit(".lora_", 1)[0] for name in lora_names})


def prepare_for_stage(
    model: nn.Module,
    stage,
    lora_config: LoraConfig | None = None,
    train_safety_modules: bool = False,
) -> tuple[nn.Module, list[str]]:
    """
    Sets up `model` for a training stage.

    Args:
        model: a `SafeLlavaForConditionalGeneration` (for stage 2: the stage-1 model, not yet wrapped).
        stage: 1 or 2 (see `check_stage`).
        lora_config: stage 2 only; defaults to `stage2_lora_config(model)` (the paper's settings). Its targets
            must all sit in the language model.
        train_safety_modules: stage 2 only; also train the safety modules (the paper keeps them frozen).

    Returns:
        `(model, trainable_names)`: for stage 1 the same model with only the safety parameters trainable; for
        stage 2 a `peft.PeftModel` around it with only the LoRA parameters (and, if asked, the safety
        parameters) trainable. `trainable_names` are parameter names of the returned model.
    """
    stage = check_stage(stage)
    if isinstance(model, PeftModel):
        raise ValueError("prepare_for_stage expects the bare SafeLlava model, got a PeftModel (already prepared?).")
    if stage == 1:
        if lora_config is not None or train_safety_modules:
            raise ValueError(
                "lora_config and train_safety_modules apply to stage 2 only (stage 1 trains only the safety modules)."
            )
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_safety_parameter(name))
    else:
        model = _wrap_in_lora(model, lora_config or stage2_lora_config(model), train_safety_modules)
    trainable = trainable_parameter_names(model)
    if not trainable:
        raise ValueError(f"Stage {stage} found nothing to train in {type(model).__name__}.")
    count = sum(parameter.numel() for name, parameter in model.named_parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Stage %d: training %d tensors, %d of %d parameters.", stage, len(trainable), count, total)
    return model, trainable


def _wrap_in_lora(model: nn.Module, lora_config: LoraConfig, train_safety_modules: bool) -> PeftModel:
    _check_lora_targets(model, lora_config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # Activation checkpointing with frozen embeddings needs the embedding output to require grad (reentrant mode).
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config)
    if train_safety_modules:
        for name, parameter in peft_model.named_parameters():
            if is_safety_parameter(name):
                parameter.requires_grad_(True)
    return peft_model


def _check_lora_targets(model: nn.Module, lora_config: LoraConfig):
    """Raises (before anything is changed) unless the config targets modules, all inside the language model."""
    targets = [name for name, _ in model.named_modules() if name and check_target_module_exists(lora_config, name)]
    prefix = language_model_prefix(model) + "."
    outside = [name for name in targets if not name.startswith(prefix)]
    if not targets or outside:
        raise ValueError(
            f"LoRA targets must sit in the language model ({prefix[:-1]}); {lora_config.target_modules!r} "
            f"matches {len(targets)} module(s), these outside it: {outside[:10]}. Use stage2_lora_config(model) or "
            "a target_modules regex limited to the language model."
        )


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def save_stage1(model: nn.Module, processor, output_dir: str | Path) -> Path:
    """
    Marks the safety modules trained and saves a full SafeLlava (safetensors, remote code, processor):
    the folder loads with `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`.
    """
    output_dir = Path(output_dir)
    model.config.safety_modules_trained = True
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def save_stage2(
    peft_model: PeftModel,
    processor,
    output_dir: str | Path,
    merge_adapter: bool = False,
    train_safety_modules: bool = False,
) -> nn.Module:
    """
    Saves the LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) and the processor in `output_dir`.

    Safety modules trained in stage 2 are not part of a LoRA adapter: with `train_safety_modules` they are saved
    next to it as `safety_modules.safetensors` (`load_stage2_model` applies them). With `merge_adapter`, the
    adapter is merged and a full model written to `output_dir/merged`.

    Returns:
        The `PeftModel`, or the merged `SafeLlavaForConditionalGeneration` with `merge_adapter` (merging consumes
        the adapter).
    """
    output_dir = Path(output_dir)
    base_config = peft_model.get_base_model().config
    if train_safety_modules:
        base_config.safety_modules_trained = True
        safety_state = {
            unwrapped_name(name): parameter.detach().to("cpu").contiguous()
            for name, parameter in peft_model.named_parameters()
            if is_safety_parameter(name)
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        save_file(safety_state, str(output_dir / SAFETY_MODULES_FILE), metadata={"format": "pt"})
    elif not base_config.safety_modules_trained:
        logger.warning(
            "Stage 2 ran on a model whose safety modules are untrained (config.safety_modules_trained is False); "
            "start stage 2 from a saved stage-1 model."
        )
    peft_model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if not merge_adapter:
        return peft_model
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output_dir / MERGED_SUBFOLDER)
    processor.save_pretrained(output_dir / MERGED_SUBFOLDER)
    return merged


def load_stage2_model(base, adapter_dir: str | Path, merge: bool = False, **from_pretrained_kwargs) -> nn.Module:
    """
    The stage-2 model: the stage-1 model plus the LoRA adapter (and stage-2 safety weights if they were trained).

    Args:
        base: the stage-1 model, or its folder.
        adapter_dir: a folder written by `save_stage2`.
        merge: return the merged SafeLlava model instead of a `PeftModel`.
        from_pretrained_kwargs: passed to the base's `from_pretrained` when `base` is a path (any base).
    """
    from ..bases import load_safe_model

    if isinstance(base, (str, Path)):
        base = load_safe_model(base, **from_pretrained_kwargs)
    safety_path = Path(adapter_dir) / SAFETY_MODULES_FILE
    if safety_path.is_file():
        state = load_file(str(safety_path))
        parameters = dict(base.named_parameters())
        unexpected = [key for key in state if key not in parameters]
        if unexpected:
            raise ValueError(f"{safety_path} holds parameters this model lacks: {unexpected[:10]}.")
        with torch.no_grad():
            for key, value in state.items():
                parameters[key].copy_(value)
        base.config.safety_modules_trained = True
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    return peft_model.merge_and_unload() if merge else peft_model


def restore_checkpoint_weights(model: nn.Module, checkpoint_dir: str | Path) -> int:
    """
    Copies every weight of a Trainer checkpoint (`model.safetensors`, sharded or not) into `model`.

    `save_pretrained` writes LLaVA's weights under their original (legacy) names, and the stock Trainer resumes
    with a plain `load_state_dict(strict=False)` that skips every renamed key (transformers issue #43701): the
    frozen weights would silently stay those of the model the resumed run was started with. Names are mapped back
    with transformers' own conversion (a probe through `revert_weight_conversion`). Returns the tensors copied;
    0 for an adapter-only (stage-2) checkpoint.
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = _checkpoint_weight_files(checkpoint_dir)
    if not files:
        return 0
    own = model.state_dict()
    names = list(own)
    probe = {name: torch.tensor([index]) for index, name in enumerate(names)}
    saved_to_own = {saved: names[int(index[0])] for saved, index in revert_weight_conversion(model, probe).items()}
    copied = 0
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as weights:
                unknown = [key for key in weights.keys() if key not in saved_to_own]
                if unknown:
                    raise ValueError(f"{path} holds weights this model lacks: {unknown[:10]}.")
                for key in weights.keys():
                    own[saved_to_own[key]].copy_(weights.get_tensor(key))
                    copied += 1
    return copied


def _checkpoint_weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({checkpoint_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = checkpoint_dir / "model.safetensors"
    return [single] if single.is_file() else []


__all__ = [
    "STAGES",
    "PAPER_LORA",
    "check_stage",
    "is_safety_parameter",
    "is_lora_parameter",
    "trainable_parameter_names",
    "language_model_prefix",
    "language_model_lora_targets",
    "stage2_lora_config",
    "lora_module_names",
    "prepare_for_stage",
    "save_stage1",
    "save_stage2",
    "load_stage2_model",
    "restore_checkpoint_weights",
]
