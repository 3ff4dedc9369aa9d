"""What every base gives, checked once per base of `bases.BASES` (issue 19, items 2 and 3): `from_base` keeps every
stock weight bit for bit, one vision-tower pass per `generate`, stage 1 trains the safety parameters only and stage 2
LoRA on the language model only, and Auto classes and remote code load the base in a fresh process."""

import json

import pytest
import torch
from conftest import chat_prompt, run_without_the_package
from safetensors.torch import load_file
from stock_contract import force_safety_verdicts
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from modeling_safe_llava.training import is_lora_parameter, lora_module_names, prepare_for_stage, stage2_lora_config
from modeling_safe_llava.training.stages import is_safety_parameter, unwrapped_name


def batch(base, processor, rows: int = 2):
    texts = [chat_prompt(processor, question) for question in ("What is shown?", "Describe the picture.")[:rows]]
    images = [base.random_image(i) for i in range(rows)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------------------------------------------
# from_base
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_llm_safety_tokens", [0, 4])
def test_from_base_keeps_every_stock_weight_bit_for_bit(base, num_llm_safety_tokens):
    stock, safe, _ = base.build_pair(num_llm_safety_tokens=num_llm_safety_tokens)
    stock_weights, safe_weights = stock.state_dict(), safe.state_dict()
    assert set(stock_weights) <= set(safe_weights)
    for name, tensor in stock_weights.items():
        assert torch.equal(safe_weights[name], tensor), f"{name} differs from stock"
        assert safe_weights[name].dtype == tensor.dtype
    extra = set(safe_weights) - set(stock_weights)
    assert extra and all(is_safety_parameter(name) for name in extra), sorted(extra)
    assert ("model.safety_module.llm_tokens" in extra) == (num_llm_safety_tokens > 0)
    assert safe.config.safety_modules_trained is False
    stock_fields = {k: v for k, v in stock.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    for key, value in stock_fields.items():
        if key not in ("image_seq_length", "transformers_version"):
            assert safe.config.to_dict()[key] == value, f"config field {key} differs from stock"


def test_from_base_loads_a_saved_stock_checkpoint_bit_for_bit(base, tmp_path):
    stock, stock_processor = base.build_stock(0)
    stock.save_pretrained(tmp_path)
    stock_processor.save_pretrained(tmp_path)
    processor = base.safe_processor_class.from_base(tmp_path, num_llm_safety_tokens=4)
    safe = base.safe_model_class.from_base(tmp_path, processor=processor, num_llm_safety_tokens=4)
    assert type(processor) is base.safe_processor_class and processor.num_llm_safety_tokens == 4
    safe_weights = safe.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(safe_weights[name], tensor), f"{name} differs from the stock checkpoint"
    assert safe.config.safety_text_token_ids, "the policy texts were tokenized with the processor"


# ----------------------------------------------------------------------------------------------------------------
# One vision-tower pass per generate
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_one_vision_tower_pass_per_generate(base, threshold):
    """Safety off, or on with every row flagged (one refused, one hinted): the vision tower runs once per call."""
    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    inputs = batch(base, processor)
    force_safety_verdicts(safe, [(3, 4), (1, 5)], base.judged_units(inputs))  # refuse, hint
    calls = []
    handle = safe.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(1))
    out = safe.generate(**inputs, safety_threshold=threshold, max_new_tokens=3, return_dict_in_generate=True)
    handle.remove()
    assert len(calls) == 1, f"the vision tower ran {len(calls)} times"
    if threshold == 0.0:
        assert out.safety_assessment.actions == ["refuse", "hint"]


# ----------------------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------------------


def train_steps(model, inputs, steps: int = 2, **loss_inputs):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, **loss_inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {unwrapped_name(n).replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def test_stage1_trains_the_safety_parameters_only(base):
    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    inputs = batch(base, processor)
    prepared, trainable = prepare_for_stage(safe, 1)
    assert trainable == [name for name, _ in safe.named_parameters() if is_safety_parameter(name)]
    before = snapshot(safe)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    train_steps(prepared, inputs, labels=labels, safety_labels=torch.tensor([[3, 0], [0, 6]]))
    after = snapshot(safe)
    for name, tensor in before.items():
        changed = not torch.equal(after[name], tensor)
        assert changed == is_safety_parameter(name), f"{name} {'changed' if changed else 'did not train'} in stage 1"


def test_stage2_trains_lora_on_the_language_model_only(base):
    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    inputs = batch(base, processor)
    peft_model, _ = prepare_for_stage(safe, 2, stage2_lora_config(safe, r=4, lora_dropout=0.0))
    targets = lora_module_names(peft_model)
    assert targets and all(name.startswith("model.language_model.") for name in targets), targets
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == [
        n for n, _ in peft_model.named_parameters() if is_lora_parameter(n)
    ]
    before = snapshot(peft_model)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    train_steps(peft_model, inputs, labels=labels)
    after = snapshot(peft_model)
    for name, tensor in before.items():
        if not is_lora_parameter(name):
            assert torch.equal(after[name], tensor), f"{name} changed in stage 2"
    assert any(not torch.equal(after[n], t) for n, t in before.items() if ".lora_B." in n), "LoRA did not train"


# ----------------------------------------------------------------------------------------------------------------
# Auto classes and remote code
# ----------------------------------------------------------------------------------------------------------------


def save_trained(base, folder):
    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    safe.save_pretrained(folder)
    processor.save_pretrained(folder)
    return safe, processor


def test_auto_classes_load_the_base_in_process(base, tmp_path):
    save_trained(base, tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), base.safe_model_class.config_class)
    assert type(AutoModel.from_pretrained(tmp_path)) is base.safe_model_class
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is base.safe_model_class
    assert type(AutoProcessor.from_pretrained(tmp_path)) is base.safe_processor_class


FRESH_PROCESS_SCRIPT = """
    import sys, json, torch
    from pathlib import Path
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    folder, inputs_dir = map(Path, sys.argv[1:3])
    spec = json.loads((inputs_dir / "inputs.json").read_text())
    images = [Image.open(inputs_dir / name) for name in spec["images"]]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    model2 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == type(model2).__name__ == spec["model_class"], type(model).__name__
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = processor(images=images, text=spec["texts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    save_file({"input_ids": inputs["input_ids"], "logits": out.logits, "level": out.safety_level_logits,
               "tokens": tokens}, str(inputs_dir / "out.safetensors"))
    (inputs_dir / "out.json").write_text(json.dumps({"processor": type(processor).__name__}))
"""


def test_remote_code_loads_the_base_in_a_fresh_process(base, tmp_path):
    folder = tmp_path / "model"
    safe, processor = save_trained(base, folder)
    inputs = batch(base, processor)
    names = []
    for i in range(2):
        base.random_image(i).save(tmp_path / f"image{i}.png")
        names.append(f"image{i}.png")
    texts = [chat_prompt(processor, q) for q in ("What is shown?", "Describe the picture.")]
    spec = {"images": names, "texts": texts, "model_class": base.model_class}
    (tmp_path / "inputs.json").write_text(json.dumps(spec))
    run_without_the_package(FRESH_PROCESS_SCRIPT, folder, tmp_path, work_dir=tmp_path)
    remote = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        local = safe(**inputs)
    local_tokens = safe.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    assert json.loads((tmp_path / "out.json").read_text())["processor"] == base.processor_class
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert (remote["logits"] - local.logits).abs().max().item() <= 1e-5
    assert (remote["level"] - local.safety_level_logits).abs().max().item() <= 1e-5
    assert torch.equal(remote["tokens"], local_tokens)


def test_training_collators_carry_every_image_field(base):
    """The Trainer's batches hold what the base's processor returns for images (LLaVA-NeXT: `image_sizes` too), so
    that stage 1 and 2 train every base through the same collators."""
    from modeling_safe_llava.training import SafeLlavaPromptCollator, SafeLlavaTrainingCollator
    from modeling_safe_llava.training.run import SafetyHeadObjective

    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    rows = [
        {
            "image": base.random_image(i),
            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Fine."}],
            "safe_level": level,
            "safe_type": kind,
        }
        for i, (level, kind) in enumerate([(3, 0), (0, 6)])
    ]
    batch = SafeLlavaTrainingCollator(processor)(rows)
    assert set(base.image_fields) <= set(batch)
    out = safe(**batch)
    assert out.loss is not None and out.safety_loss is not None and torch.isfinite(out.loss)
    head_only = SafetyHeadObjective(safe)(**batch)  # stage 1's "safety_head" objective: no language model
    torch.testing.assert_close(head_only.safety_loss, out.safety_loss)
    prompts = SafeLlavaPromptCollator(processor)(rows)
    assert set(base.image_fields) <= set(prompts)
    prompts.pop("safety_labels")
    safe.config.safety_modules_trained = True
    assert len(safe.assess_safety(**prompts).actions) == 2


def test_export_carries_the_bases_own_remote_code_and_reloads(base, tmp_path):
    """`export_for_hub` takes any base: the folder holds exactly that base's remote-code files, and the Auto classes
    reload it with the same outputs."""
    from modeling_safe_llava.bases import base_for_model_type
    from modeling_safe_llava.tools.hub import export_for_hub

    _, safe, processor = base.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    folder = export_for_hub(safe, processor, tmp_path / "export")
    own_files = base_for_model_type(safe.config.model_type).remote_code_files()
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(own_files)
    reloaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(reloaded) is base.safe_model_class
    inputs = batch(base, processor)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, safe(**inputs).logits)
