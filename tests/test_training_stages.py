"""Stage setup and the stock-Trainer runs: what trains in stage 1 and 2, LoRA placement, saving, adapter merging,
activation checkpointing with LoRA, gradient-accumulation semantics, stage 1 learning, recipes and the scripts."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES
from modeling_safe_llava.presets import load_json_preset
from modeling_safe_llava.bases import base_for_model_type
from modeling_safe_llava.tools.hub import REMOTE_CODE_FILES
from modeling_safe_llava.tiny import build_tiny_llava, build_tiny_safe_llava
from modeling_safe_llava.training import (
    ModelArguments,
    SafeLlavaPromptCollator,
    SafeLlavaTrainingCollator,
    build_parser,
    is_lora_parameter,
    language_model_lora_targets,
    load_model_and_processor,
    load_recipe,
    load_stage2_model,
    lora_module_names,
    prepare_for_stage,
    resolve_stage_arguments,
    stage2_lora_config,
    train_stage1,
    train_stage2,
)
from modeling_safe_llava.training.stages import SAFETY_MODULES_FILE, unwrapped_name

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Four (level, type) classes, each a solid colour: simple, clearly separable images.
CLASSES = [(0, 6, (40, 160, 60)), (3, 0, (200, 30, 30)), (2, 1, (30, 30, 200)), (1, 5, (220, 200, 40))]


def colour_records(rows_per_class: int, seed: int, answer: str = "Fine.") -> list[dict]:
    rng = np.random.RandomState(seed)
    records = []
    for _ in range(rows_per_class):
        for level, type_index, colour in CLASSES:
            pixels = np.clip(np.array(colour) + rng.randint(-25, 26, size=(16, 16, 3)), 0, 255).astype("uint8")
            records.append(
                {
                    "image": Image.fromarray(pixels),
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": answer},
                    ],
                    "safe_level": level,
                    "safe_type": type_index,
                }
            )
    return records


def snapshot(model) -> dict[str, torch.Tensor]:
    """Parameters under SafeLlava's names (a PeftModel's prefix and `.base_layer` removed)."""
    return {unwrapped_name(n).replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def is_safety(name: str) -> bool:
    return name.startswith(SAFETY_PARAMETER_PREFIXES)


QUIET = {"disable_tqdm": True, "logging_steps": 1000}


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A tiny SafeLlava trained 3 stage-1 steps by the stock Trainer: (initial weights, model, processor, folder)."""
    model, processor = build_tiny_safe_llava(seed=0)
    initial = snapshot(model)
    folder = tmp_path_factory.mktemp("stage1")
    model = train_stage1(model, processor, colour_records(4, seed=0), folder, max_steps=3, **QUIET)
    return initial, model, processor, folder


@pytest.fixture(scope="module")
def stage2_run(stage1_run, tmp_path_factory):
    """Stage 2 (LoRA, 3 steps) from the saved stage-1 folder: (base weights before, PeftModel, folder)."""
    _, _, processor, stage1_folder = stage1_run
    base = SafeLlavaForConditionalGeneration.from_pretrained(stage1_folder)
    before = snapshot(base)
    folder = tmp_path_factory.mktemp("stage2")
    peft_model = train_stage2(base, processor, colour_records(4, seed=1), folder, max_steps=3, **QUIET)
    return before, peft_model, folder


# ----------------------------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------------------------


def test_stage1_changes_only_the_safety_parameters(stage1_run):
    initial, model, _, _ = stage1_run
    after = snapshot(model)
    assert after.keys() == initial.keys()
    safety = [name for name in initial if is_safety(name)]
    modules = {"tokens", "llm_tokens", "projector", "head"}
    assert {name.split(".")[2] for name in safety} == modules
    for name in initial:
        if is_safety(name):
            assert not torch.equal(after[name], initial[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], initial[name]), f"{name} changed in stage 1"


def test_stage1_trainable_names_are_exactly_the_safety_parameters():
    model, _ = build_tiny_safe_llava(seed=0)
    prepared, trainable = prepare_for_stage(model, 1)
    assert prepared is model
    assert trainable == [name for name, _ in model.named_parameters() if is_safety(name)]
    assert all(p.requires_grad == is_safety(n) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="Unknown training stage"):
        prepare_for_stage(model, 3)


def test_stage1_saves_a_full_safe_llava_marked_trained(stage1_run):
    _, model, _, folder = stage1_run
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= files
    remote_code = set(base_for_model_type(model.config.model_type).remote_code_files())
    assert remote_code <= files and remote_code <= set(REMOTE_CODE_FILES)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["safety_modules_trained"] is True and "AutoModelForImageTextToText" in config["auto_map"]
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(folder)
    assert reloaded.config.safety_modules_trained is True
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------------


def test_stage2_changes_only_lora_parameters(stage2_run):
    before, peft_model, _ = stage2_run
    lora = {name: p for name, p in peft_model.named_parameters() if is_lora_parameter(name)}
    assert lora and all(p.requires_grad for p in lora.values())
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == list(lora)
    after = snapshot(peft_model)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed in stage 2"
    lora_b = [name for name in lora if ".lora_B." in name]
    assert all(bool(lora[name].abs().sum() > 0) for name in lora_b)  # B starts at zero: every B was trained


def test_stage2_lora_targets_are_every_linear_layer_of_the_language_model_and_nothing_else(stage2_run):
    _, peft_model, _ = stage2_run
    targets = lora_module_names(peft_model)
    base = peft_model.get_base_model()
    language_linears = sorted(
        name
        for name, module in base.named_modules()
        if name.startswith("model.language_model.") and type(module).__name__ == "Linear" and "lora_" not in name
    )
    assert all(name.startswith("model.language_model.layers.") for name in targets)
    assert targets == sorted({name.rsplit(".base_layer", 1)[0] for name in language_linears})
    assert len(targets) == 7 * base.config.text_config.num_hidden_layers  # q k v o gate up down per layer
    assert not any("safety_head" in n or "lm_head" in n or "vision_tower" in n for n in targets)


def test_stage2_refuses_lora_targets_outside_the_language_model():
    model, _ = build_tiny_safe_llava(seed=0)
    config = stage2_lora_config(model, r=2)
    config.target_modules = r".*(q_proj|k_proj)"  # also matches the safety head's q_proj / k_proj
    with pytest.raises(ValueError, match="must sit in the language model"):
        prepare_for_stage(model, 2, lora_config=config)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # refused before changing anything
    assert language_model_lora_targets(model).startswith(r".*language_model\.")


def test_stage2_keeps_the_trained_flag_and_saves_only_safetensors_adapter(stage2_run):
    _, peft_model, folder = stage2_run
    files = {path.name for path in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert peft_model.get_base_model().config.safety_modules_trained is True
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8  # the tiny recipe's rank


def test_adapter_loads_on_the_stage1_model_and_merges_to_equal_outputs(stage1_run, stage2_run):
    _, _, processor, stage1_folder = stage1_run
    _, trained, folder = stage2_run
    batch = SafeLlavaTrainingCollator(processor)(colour_records(1, seed=5))
    trained.eval()
    with torch.no_grad():
        reference = trained(**batch)
        stage1_logits = SafeLlavaForConditionalGeneration.from_pretrained(stage1_folder).eval()(**batch).logits
        loaded = load_stage2_model(stage1_folder, folder).eval()
        from_adapter = loaded(**batch)
        merged = loaded.merge_and_unload().eval()
        from_merged = merged(**batch)
    assert isinstance(merged, SafeLlavaForConditionalGeneration)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert float((reference.logits - stage1_logits).abs().max()) > 1e-4  # the adapter matters
    torch.testing.assert_close(from_adapter.logits, reference.logits, rtol=0, atol=1e-6)
    for field in ("logits", "safety_level_logits", "safety_type_logits"):
        torch.testing.assert_close(getattr(from_merged, field), getattr(reference, field), rtol=0, atol=1e-5)


def test_stage2_can_keep_training_the_safety_modules(stage1_run, tmp_path):
    _, _, processor, stage1_folder = stage1_run
    base = SafeLlavaForConditionalGeneration.from_pretrained(stage1_folder)
    before = snapshot(base)
    trained = train_stage2(
        base, processor, colour_records(2, seed=2), tmp_path, max_steps=2, train_safety_modules=True, **QUIET
    )
    after = snapshot(trained)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert {name for name in before if is_safety(name)} <= changed
    assert not any(not is_safety(name) for name in changed)  # base weights only change through LoRA
    saved = load_file(str(tmp_path / SAFETY_MODULES_FILE))
    assert set(saved) == {name for name in before if is_safety(name)}
    reloaded = load_stage2_model(stage1_folder, tmp_path).eval()
    batch = SafeLlavaTrainingCollator(processor)(colour_records(1, seed=6))
    with torch.no_grad():
        expected = trained.eval()(**batch).safety_level_logits
        torch.testing.assert_close(reloaded(**batch).safety_level_logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_with_lora_gives_the_same_gradients(use_reentrant):
    records = colour_records(1, seed=3)

    def lora_gradients(checkpointing: bool):
        model, processor = build_tiny_safe_llava(seed=0)
        peft_model, _ = prepare_for_stage(model, 2, stage2_lora_config(model, r=4, lora_dropout=0.0))
        with torch.no_grad():  # non-zero B, so that A gets gradients too
            for name, parameter in peft_model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            kwargs = {"use_reentrant": use_reentrant}
            peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        saved = []  # tensors kept for backward: activation checkpointing keeps fewer
        peft_model.train()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            loss = peft_model(**SafeLlavaTrainingCollator(processor)(records)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return grads, len(saved)

    plain, plain_saved = lora_gradients(False)
    checkpointed, checkpointed_saved = lora_gradients(True)
    assert checkpointed_saved < 0.7 * plain_saved  # checkpointing is active: layer activations are recomputed
    assert plain.keys() == checkpointed.keys() and all(".lora_" in name for name in plain)
    for name in plain:
        assert float(plain[name].abs().sum()) > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_averages_the_combined_loss(tmp_path):
    """One SGD step on 8 rows equals two accumulated steps on 4 + 4 rows: the safety term is averaged over the
    accumulation steps like the LM term (not summed, as it would be if the Trainer took the model's loss as
    normalized by its global token count)."""
    records = colour_records(2, seed=4)  # identical texts: every micro-batch has the same token count

    def one_step(batch_size, accumulation):
        model, processor = build_tiny_safe_llava(seed=0)
        overrides = dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        train_stage1(
            model, processor, records, tmp_path / f"{batch_size}", max_steps=1, optim="sgd", learning_rate=0.5,
            warmup_steps=0, max_grad_norm=0.0, **overrides, **QUIET,
        )
        return snapshot(model)

    full, accumulated = one_step(8, 1), one_step(4, 2)
    initial = snapshot(build_tiny_safe_llava(seed=0)[0])
    head = "model.safety_module.head.level_classifier.weight"
    assert not torch.equal(full[head], initial[head])
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)


def test_half_precision_models_train_float32_parameters(tmp_path):
    model, processor = build_tiny_safe_llava(seed=0)
    model = model.to(torch.bfloat16)
    train_stage1(model, processor, colour_records(2, seed=7), tmp_path / "s1", max_steps=1, bf16=True, **QUIET)
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}  # the optimizer steps float32 copies only
    base = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path / "s1", dtype=torch.bfloat16)
    records = colour_records(2, seed=7)
    peft_model = train_stage2(base, processor, records, tmp_path / "s2", max_steps=1, bf16=True, **QUIET)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}


def test_scripts_start_stage1_from_a_stock_llava_checkpoint_and_stage2_from_a_safe_llava(tmp_path, stage1_run):
    llava, llava_processor = build_tiny_llava(seed=0)
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / "llava")), stage=1)
    assert isinstance(model, SafeLlavaForConditionalGeneration) and model.config.safety_modules_trained is False
    assert processor.num_llm_safety_tokens == model.config.num_llm_safety_tokens
    assert torch.equal(model.lm_head.weight, llava.lm_head.weight)  # stock weights kept
    assert model.config.safety_text_token_ids  # policy texts tokenized: hints and refusals work after training
    with pytest.raises(ValueError, match="stage 2 starts from the stage-1 output folder"):
        load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / "llava")), stage=2)
    with pytest.raises(ValueError, match="Stage 2 starts from the stage-1 model"):
        load_model_and_processor(ModelArguments(), stage=2)
    stage1_model, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(stage1_run[3])), stage=2)
    assert stage1_model.config.safety_modules_trained is True


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 learns
# ----------------------------------------------------------------------------------------------------------------


def safety_accuracy(model, processor, records) -> tuple[float, float]:
    batch = SafeLlavaPromptCollator(processor)(records)
    with torch.no_grad():
        output = model.eval()(**batch)
    labels = batch["safety_labels"]
    level = (output.safety_level_logits.argmax(-1) == labels[:, 0]).float().mean()
    category = (output.safety_type_logits.argmax(-1) == labels[:, 1]).float().mean()
    return float(level), float(category)


@pytest.mark.slow
@pytest.mark.parametrize("projector", ["cabstractor", "mlp"])
def test_stage1_learns_to_classify_held_out_images(projector, tmp_path):
    """96 stage-1 steps on 48 labelled images (4 classes, solid colours) lift held-out accuracy of both heads from
    chance to near 100%, with the paper's C-Abstractor safety projector and with the MLP one; the run's own
    evaluation (eval_results.json) reports the same accuracy."""
    model, processor = build_tiny_safe_llava(seed=0, safety_projector_type=projector)
    train, held_out = colour_records(12, seed=0), colour_records(6, seed=1)
    before = safety_accuracy(model, processor, held_out)
    train_stage1(
        model, processor, train, tmp_path, eval_dataset=held_out, learning_rate=5e-3, num_train_epochs=16, **QUIET
    )
    after = safety_accuracy(model, processor, held_out)
    assert max(before) <= 0.5  # an untrained head (4 balanced classes: chance is 0.25)
    assert min(after) >= 0.9, (before, after)
    reported = json.loads((tmp_path / "eval_results.json").read_text())  # the Trainer's final evaluation
    assert (reported["eval_safety_level_accuracy"], reported["eval_safety_type_accuracy"]) == pytest.approx(after)


# ----------------------------------------------------------------------------------------------------------------
# Recipes and scripts
# ----------------------------------------------------------------------------------------------------------------


def test_7b_recipes_hold_the_paper_settings():
    for stage, accumulation, warmup in ((1, 16, 20), (2, 8, 300)):
        recipe = load_recipe(f"recipe_stage{stage}_7b.json", stage)
        training = recipe["training_arguments"]
        assert training["learning_rate"] == 1e-5 and training["num_train_epochs"] == 3
        assert training["per_device_train_batch_size"] == 2
        assert training["gradient_accumulation_steps"] == accumulation and training["warmup_steps"] == warmup
        assert training["bf16"] is True and training["lr_scheduler_type"] == "linear"
        assert training["remove_unused_columns"] is False
    assert load_recipe("recipe_stage1_7b.json")["data_arguments"]["clean_subsample"] == 3000
    lora = load_recipe("recipe_stage2_7b.json")["lora_arguments"]
    assert (lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"]) == (256, 16, 0.05)
    assert lora["train_safety_modules"] is False
    deepspeed = load_json_preset("configuration", "deepspeed_zero2.json")
    assert deepspeed["zero_optimization"]["stage"] == 2
    assert all(deepspeed[key] == "auto" for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))


def test_recipe_values_are_defaults_that_overrides_replace(tmp_path):
    training, data, lora = resolve_stage_arguments(2, "recipe_stage2_tiny.json", tmp_path, lora_r=2, max_steps=5)
    assert training.use_cpu is True and training.remove_unused_columns is False
    assert training.label_names == ["labels", "safety_labels"] and training.output_dir == str(tmp_path)
    assert training.learning_rate == 1e-3 and training.max_steps == 5
    assert (lora.lora_r, lora.lora_alpha) == (2, 16) and data.clean_subsample is None
    with pytest.raises(ValueError, match="Unknown stage-1 training option"):
        resolve_stage_arguments(1, None, tmp_path, lora_r=2)  # LoRA is a stage-2 option
    with pytest.raises(ValueError, match="is for stage 2, not stage 1"):
        resolve_stage_arguments(1, "recipe_stage2_tiny.json", tmp_path)
    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        resolve_stage_arguments(1, None, tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="unknown fields"):
        load_recipe({"stage": 1, "training_arguments": {"learning_rat": 1.0}})


@pytest.mark.parametrize("stage", [1, 2])
def test_script_help_documents_every_flag(stage, capsys, monkeypatch):
    parser = build_parser(stage)
    flags = [action for action in parser._actions if action.dest != "help"]
    assert all(action.help and action.help.strip() for action in flags)
    monkeypatch.setattr(sys, "argv", [f"train_stage{stage}.py", "--help"])
    with pytest.raises(SystemExit) as finished:
        runpy.run_path(str(EXAMPLES / f"train_stage{stage}.py"), run_name="__main__")
    assert finished.value.code == 0
    printed = capsys.readouterr().out
    for action in flags:
        assert action.option_strings[0] in printed
    assert ("--lora_r" in printed) == (stage == 2)


def test_stage2_script_runs_top_to_bottom_and_writes_a_merged_model(stage1_run, tmp_path, monkeypatch):
    _, _, _, stage1_folder = stage1_run
    argv = ["--model_name_or_path", str(stage1_folder), "--output_dir", str(tmp_path), "--max_steps", "2"]
    monkeypatch.setattr(sys, "argv", ["train_stage2.py", *argv, "--merge_adapter", "--disable_tqdm", "true"])
    runpy.run_path(str(EXAMPLES / "train_stage2.py"), run_name="__main__")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    merged = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert merged.config.safety_modules_trained is True
    assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_stage1_safety_head_objective_never_runs_the_language_model(tmp_path):
    from modeling_safe_llava.presets import load_json_preset
    from modeling_safe_llava.tiny import build_tiny_safe_llava
    from modeling_safe_llava.training import train_stage1
    from modeling_safe_llava.training.data import synthetic_safety_records

    model, processor = build_tiny_safe_llava(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    recipe = {**load_json_preset("configuration", "recipe_stage1_tiny.json"), "objective": "safety_head"}
    trained = train_stage1(model, processor, synthetic_safety_records(16, seed=0), tmp_path, recipe=recipe, max_steps=3)
    handle.remove()
    assert calls == []
    assert trained.config.safety_modules_trained is True
    changed = {name for name, p in trained.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("model.safety_") for name in changed)
    assert "model.safety_module.llm_tokens" not in changed  # no gradient reaches them without the language model
