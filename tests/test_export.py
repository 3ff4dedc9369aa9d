"""Hub export: a folder that loads with trust_remote_code in a fresh process, a parseable model card with the numbers
it was given, atomic (re)writes, safetensors only, fail-closed on untrained safety modules, and a mocked push."""

import argparse
import hashlib
import json
import os
import re
import shutil
from unittest import mock

import pytest
import torch
from conftest import chat_prompt, random_image, run_without_the_package
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from modeling_safe_llava.bases import BASES
from modeling_safe_llava.checks_safe_llava import is_number
from modeling_safe_llava.tools import hub as hub_module
from modeling_safe_llava import load_safety_policy
from modeling_safe_llava.fileio import MARKER_FILE
from modeling_safe_llava.tools.hub import export_for_hub, push_to_hub, verify_export_folder
from modeling_safe_llava.tools.model_card import ModelFacts, format_metric, model_facts, render_model_card
from modeling_safe_llava.tiny import build_tiny_safe_llava

OCR_POLICY = "ocr_deployment_policy.json"
# Shaped like the metrics.json of `modeling_safe_llava.tools.evaluation` (its numbers made up, distinct on purpose).
EVALUATION = {
    "num_rows": 48,
    "model": {"name_or_path": "runs/stage2/merged", "safety_modules_trained": True},
    "level": {
        "num_rows": 48,
        "accuracy": 0.8123,
        "labels": ["Safe to answer", "Answer carefully", "Answer or reject", "Reject"],
        "confusion_matrix": [[17, 2, 1, 0], [3, 9, 1, 0], [1, 1, 6, 0], [0, 1, 4, 2]],
        "per_class": {
            "Safe to answer": {"precision": 0.8095, "recall": 0.85, "f1": 0.8293, "support": 20},
            "Reject": {"precision": 1.0, "recall": 0.2857, "f1": 0.4444, "support": 7},
        },
        "macro_f1": 0.5931,
    },
    "type": {"num_rows": 48, "accuracy": 0.6457, "macro_f1": 0.4712, "per_class": {"Politics": {"f1": 0.3636}}},
    "threshold_sweep": [
        {"threshold": t, "flagged_risky": n, "num_risky": 28, "flag_rate_risky": rate, "balanced_accuracy": balanced}
        for t, n, rate, balanced in [
            (0.1, 27, 0.9643, 0.5821), (0.3, 25, 0.8929, 0.7214), (0.5, 19, 0.6786, 0.6893), (0.9, 2, 0.0714, 0.5107)
        ]
    ],
    "dataset": "toy validation split",
}
TRAINING = {
    "stage1": {
        "data": "120 synthetic records (6 risky types + clean)",
        "recipe": {"learning_rate": 0.0003, "epochs": 2},
        "steps": 31,
    },
    "stage2": {"data": "240 synthetic records", "recipe": {"lora_r": 8, "lora_alpha": 16}, "steps": 57},
}


def numeric_leaves(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numeric_leaves(v)]
    if isinstance(value, list):
        return [n for v in value for n in numeric_leaves(v)]
    return [value] if is_number(value) else []


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-flagged tiny model with a non-default policy (OCR deployment) and threshold 0.3, exported with an
    evaluation metrics.json (by path) and a training description."""
    model, processor = build_tiny_safe_llava(seed=0, policy=OCR_POLICY)
    model.config.safety_modules_trained = True
    model.generation_config.safety_threshold = 0.3
    root = tmp_path_factory.mktemp("export")
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps(EVALUATION))
    folder = export_for_hub(model, processor, root / "hub" / "safe-llava-tiny", evaluation=metrics, training=TRAINING)
    return model, processor, folder


FRESH_PROCESS_SCRIPT = """
    import sys, json, torch
    from pathlib import Path
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor
    folder, work = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads((work / "inputs.json").read_text())
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    images = [Image.open(work / name) for name in spec["images"]]
    inputs = processor(images=images, text=spec["texts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    flag_all = model.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    default = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    save_file({"input_ids": inputs["input_ids"], "logits": out.logits, "level": out.safety_level_logits,
               "type": out.safety_type_logits, "flag_all": flag_all, "default": default}, str(work / "out.safetensors"))
    config = model.config
    (work / "out.json").write_text(json.dumps({
        "processor": type(processor).__name__, "threshold": model.generation_config.safety_threshold,
        "actions": config.safety_actions, "hints": config.safety_hints, "refusals": config.safety_refusals,
        "text_token_ids": config.safety_text_token_ids, "trained": config.safety_modules_trained}))
"""


def test_export_loads_in_fresh_process_without_the_package(exported, tmp_path):
    model, processor, folder = exported
    images, texts = [random_image(0), random_image(1)], [chat_prompt(processor), chat_prompt(processor, "Describe.")]
    for i, image in enumerate(images):
        image.save(tmp_path / f"image{i}.png")
    (tmp_path / "inputs.json").write_text(json.dumps({"images": ["image0.png", "image1.png"], "texts": texts}))
    run_without_the_package(FRESH_PROCESS_SCRIPT, folder, tmp_path, work_dir=tmp_path)
    remote, facts = load_file(tmp_path / "out.safetensors"), json.loads((tmp_path / "out.json").read_text())

    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        local = model(**inputs)
    assert facts["processor"] == "SafeLlavaProcessor"
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert (remote["logits"] - local.logits).abs().max().item() <= 1e-5
    assert (remote["level"] - local.safety_level_logits).abs().max().item() <= 1e-5
    assert (remote["type"] - local.safety_type_logits).abs().max().item() <= 1e-5
    flag_all = model.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    assert torch.equal(remote["flag_all"], flag_all)
    assert torch.equal(remote["default"], model.generate(**inputs, max_new_tokens=4, do_sample=False))
    # The default threshold and the (non-default) policy survive the trip.
    assert facts["threshold"] == 0.3
    assert facts["trained"] is True
    ocr = load_safety_policy(OCR_POLICY)
    assert facts["actions"] == model.config.safety_actions == ocr["safety_actions"]
    assert facts["actions"] != load_safety_policy()["safety_actions"]
    assert facts["hints"] == ocr["safety_hints"] and facts["refusals"] == ocr["safety_refusals"]
    assert facts["text_token_ids"] == json.loads(json.dumps(model.config.safety_text_token_ids))


def test_card_parses_with_metadata_and_carries_the_evaluation_numbers(exported):
    model, _, folder = exported
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "llama2"
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers"
    assert {"safety", "llava", "vision-language", "custom_code"} <= set(card.data.tags)
    text = card.text
    for value in numeric_leaves(EVALUATION):
        assert format_metric(value) in text, value
    assert EVALUATION["dataset"] in text
    level, type_ = EVALUATION["level"], EVALUATION["type"]
    assert f"| Level accuracy | {format_metric(level['accuracy'])} |" in text  # headline
    assert f"| Type macro F1 | {format_metric(type_['macro_f1'])} |" in text
    reject = level["per_class"]["Reject"]
    assert f"| Reject | {' | '.join(format_metric(v) for v in reject.values())} |" in text  # per-class table
    assert f"| Reject | {' | '.join(map(format_metric, level['confusion_matrix'][3]))} |" in text
    best = max(EVALUATION["threshold_sweep"], key=lambda row: row["balanced_accuracy"])
    assert (  # sweep summary
        f"Highest balanced_accuracy: {format_metric(best['balanced_accuracy'])} "
        f"at threshold {format_metric(best['threshold'])}"
    ) in text
    assert json.loads((folder / "evaluation_metrics.json").read_text()) == EVALUATION
    for stage in TRAINING.values():
        assert stage["data"] in text and f"Steps: {stage['steps']}" in text
    # Usage, threshold, taxonomy and the policy table come from the model's own config.
    assert "trust_remote_code=True" in text and "revision=revision" in text
    assert f"safety_threshold={model.generation_config.safety_threshold}" in text
    for name in model.config.safety_level_labels + model.config.safety_type_labels:
        assert name in text
    illegal = model.config.safety_actions["Illegal Risk"]
    assert f"| Illegal Risk | {' | '.join(f'`{a}`' for a in illegal[1:])} |" in text
    assert "tiny demo model" in text and "tiny-demo" in card.data.tags  # a toy is never presented as the 7B
    assert "2405.13581" in text and "2411.11543" in text and "@misc{" in text


def test_evaluation_of_another_model_refused(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    other_taxonomy = {**EVALUATION, "model": {"type_labels": ["Violence", "Clean"]}}
    with pytest.raises(ValueError, match="type_labels"):
        export_for_hub(model, processor, tmp_path / "out", evaluation=other_taxonomy)
    untrained_run = {**EVALUATION, "model": {"safety_modules_trained": False}}
    with pytest.raises(ValueError, match="untrained"):
        export_for_hub(model, processor, tmp_path / "out", evaluation=untrained_run)
    assert list(tmp_path.iterdir()) == []


def test_card_rules_not_evaluated_and_demo_warning(trained_tiny_safe_llava):
    model, _ = trained_tiny_safe_llava
    tiny_facts = model_facts(model)
    assert tiny_facts.language_model_parameters < 10**9
    tiny_card = render_model_card(model.config, None, None, facts=tiny_facts)
    assert "Not evaluated" in tiny_card and "| Metric | Value |" not in tiny_card
    assert "This is a tiny demo model" in tiny_card
    big = ModelFacts(
        total_parameters=7_063_000_000, language_model_parameters=6_738_000_000, safety_parameters=3 * 10**8,
        dtype="bfloat16",
    )
    big_card = render_model_card(model.config, EVALUATION, None, facts=big)
    assert "tiny demo model" not in big_card and "tiny-demo" not in ModelCard(big_card).data.tags
    assert format_metric(EVALUATION["level"]["accuracy"]) in big_card and "Not evaluated" not in big_card


def test_interrupted_export_leaves_no_folder_and_rerun_succeeds(trained_tiny_safe_llava, tmp_path, monkeypatch):
    model, processor = trained_tiny_safe_llava
    output = tmp_path / "out" / "safe-llava"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while saving the processor")

    monkeypatch.setattr(processor, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_for_hub(model, processor, output)
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor a staging folder is left
    monkeypatch.undo()

    monkeypatch.setattr(hub_module, "render_model_card", mock.Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_for_hub(model, processor, output)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()

    assert export_for_hub(model, processor, output) == output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["safe-llava"]
    verify_export_folder(output)


def test_interrupted_overwrite_keeps_the_previous_export(trained_tiny_safe_llava, tmp_path, monkeypatch):
    model, processor = trained_tiny_safe_llava
    output = tmp_path / "safe-llava"
    model.generation_config.safety_threshold = 0.3
    export_for_hub(model, processor, output)
    before = snapshot(output)
    model.generation_config.safety_threshold = 0.7

    with pytest.raises(FileExistsError):
        export_for_hub(model, processor, output)
    monkeypatch.setattr(hub_module, "render_model_card", mock.Mock(side_effect=RuntimeError("card failed")))
    with pytest.raises(RuntimeError, match="card failed"):
        export_for_hub(model, processor, output, overwrite=True)
    assert snapshot(output) == before and [p.name for p in tmp_path.iterdir()] == ["safe-llava"]
    monkeypatch.undo()

    # The new folder fails to move in after the old one was moved away: the old one is put back.
    real_move, calls = hub_module._move, []

    def move_failing_second_time(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("simulated rename failure")
        real_move(source, destination)

    monkeypatch.setattr(hub_module, "_move", move_failing_second_time)
    with pytest.raises(OSError, match="simulated rename failure"):
        export_for_hub(model, processor, output, overwrite=True)
    assert len(calls) == 3 and snapshot(output) == before and [p.name for p in tmp_path.iterdir()] == ["safe-llava"]
    monkeypatch.undo()

    export_for_hub(model, processor, output, overwrite=True)
    assert json.loads((output / "generation_config.json").read_text())["safety_threshold"] == 0.7
    assert [p.name for p in tmp_path.iterdir()] == ["safe-llava"]  # the replaced export was deleted


def test_overwrite_refuses_a_folder_that_is_not_an_export(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by `safe-llava export`"):
        export_for_hub(model, processor, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_overwrite_never_replaces_a_training_run_even_with_a_safe_llava_config(trained_tiny_safe_llava, tmp_path):
    """A run folder holds a SafeLlava config.json (it looks like a checkpoint), checkpoints and notes: only the
    export marker makes a folder replaceable."""
    model, processor = trained_tiny_safe_llava
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (run / "notes.md").write_text("lr 3e-4 diverged")
    before = snapshot(run)
    with pytest.raises(ValueError, match="no .safe-llava-output.json marker"):
        export_for_hub(model, processor, run, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists"):
        export_for_hub(model, processor, run)
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    export = export_for_hub(model, processor, tmp_path / "export")
    assert (export / MARKER_FILE).is_file()
    (export / MARKER_FILE).unlink()  # a user who removes the marker protects the folder
    with pytest.raises(ValueError, match="not written by"):
        export_for_hub(model, processor, export, overwrite=True)
    with pytest.raises(ValueError, match="which is a file"):
        export_for_hub(model, processor, run / "notes.md" / "export")


ATTACKER_AUTO_MAP = {"AutoModel": "attacker/repo--evil.Evil", "AutoConfig": "attacker/repo--evil.EvilConfig"}


def test_export_writes_its_own_auto_map_whatever_the_loaded_config_said(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    checkpoint = tmp_path / "downloaded"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    for name, extra in (("config.json", ATTACKER_AUTO_MAP), ("processor_config.json", {"AutoProcessor": "attacker/r--p.P"})):
        values = json.loads((checkpoint / name).read_text())
        values["auto_map"] = {**values.get("auto_map", {}), **extra, "AutoImageProcessor": "evil.Evil"}
        (checkpoint / name).write_text(json.dumps(values))
    args = hub_module.add_export_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(checkpoint), "--output", str(tmp_path / "export")]
    )
    folder = hub_module.run_export(args)
    config_map, processor_map = BASES[0].auto_maps()
    assert json.loads((folder / "config.json").read_text())["auto_map"] == config_map
    assert config_map["AutoModel"] == "modeling_safe_llava.SafeLlavaForConditionalGeneration"
    for name in ("processor_config.json", "tokenizer_config.json"):
        if "auto_map" in json.loads((folder / name).read_text()):
            assert json.loads((folder / name).read_text())["auto_map"] == processor_map, name
    assert "attacker" not in "".join(path.read_text() for path in folder.glob("*.json"))
    verify_export_folder(folder)


@pytest.mark.parametrize(
    "file_name, auto_map, fragment",
    [
        ("config.json", {"AutoModel": "attacker/repo--evil.Evil"}, "another repository's code"),
        ("config.json", {"AutoModel": "modeling_safe_llava.X", "AutoConfig": "evil.Evil"}, "'evil.Evil'"),
        ("config.json", {"AutoModel": "../modeling_safe_llava.X"}, "does not name a class"),
        ("processor_config.json", {"AutoProcessor": "attacker/repo--p.P"}, "processor_config.json"),
        ("tokenizer_config.json", {"AutoTokenizer": ["attacker/repo--t.T", None]}, "tokenizer_config.json"),
    ],
)
def test_verify_refuses_an_auto_map_entry_outside_the_folder(exported, tmp_path, file_name, auto_map, fragment):
    _, _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "evil.py").write_text("class Evil: pass\n")  # present, yet not one of the audited remote-code files
    values = json.loads((copy / file_name).read_text())
    values["auto_map"] = auto_map
    (copy / file_name).write_text(json.dumps(values))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        verify_export_folder(copy)
    with mock.patch.object(hub_module, "HfApi") as api_class, pytest.raises(ValueError):
        push_to_hub(copy, "org/safe-llava-tiny")
    api_class.assert_not_called()


def test_verify_refuses_a_missing_remote_code_file(exported, tmp_path):
    _, _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "processing_safe_llava.py").unlink()
    with pytest.raises(ValueError, match="missing"):
        verify_export_folder(copy)


def test_only_safetensors_weights_and_pickles_refused(exported, trained_tiny_safe_llava, tmp_path, monkeypatch):
    _, _, folder = exported
    weight_like = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", *hub_module.PICKLE_SUFFIXES)]
    assert weight_like and all(name.endswith(".safetensors") for name in weight_like)

    model, processor = trained_tiny_safe_llava
    save = model.save_pretrained

    def save_with_pickle(directory, **kwargs):
        save(directory, **kwargs)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))

    monkeypatch.setattr(model, "save_pretrained", save_with_pickle)
    with pytest.raises(ValueError, match="pickle"):
        export_for_hub(model, processor, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_untrained_safety_modules_refused_unless_allowed(tiny_safe_llava, tmp_path):
    model, processor = tiny_safe_llava
    assert model.config.safety_modules_trained is False
    with pytest.raises(ValueError, match="untrained"):
        export_for_hub(model, processor, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    folder = export_for_hub(model, processor, tmp_path / "out", allow_untrained_safety=True)
    assert json.loads((folder / "config.json").read_text())["safety_modules_trained"] is False  # still fails closed
    assert "UNTRAINED SAFETY MODULES" in (folder / "README.md").read_text()


def test_stale_policy_tokens_refused(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    model.config.safety_refusals = {**model.config.safety_refusals, "Privacy": "No."}  # edited, not re-tokenized
    with pytest.raises(ValueError, match="tokenize_safety_texts"):
        export_for_hub(model, processor, tmp_path / "out")
    model.tokenize_safety_texts(processor)
    assert "refusal: No." in (export_for_hub(model, processor, tmp_path / "out") / "README.md").read_text()


def test_push_to_hub_creates_repo_and_uploads_folder(exported, tmp_path):
    _, _, folder = exported
    with mock.patch.object(hub_module, "HfApi") as api_class:
        push_to_hub(folder, "org/safe-llava-tiny", token="hf_test", revision="v1", commit_message="Release v1")
    api_class.assert_called_once_with(token="hf_test")
    api = api_class.return_value
    repo = "org/safe-llava-tiny"
    api.create_repo.assert_called_once_with(repo_id=repo, private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with(repo_id=repo, branch="v1", exist_ok=True, repo_type="model")
    api.upload_folder.assert_called_once_with(
        repo_id=repo, folder_path=str(folder), repo_type="model", revision="v1", commit_message="Release v1",
        ignore_patterns=[MARKER_FILE],  # the overwrite marker is local bookkeeping, not part of the repository
    )

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with mock.patch.object(hub_module, "HfApi") as api_class:
        with pytest.raises(ValueError, match="not a complete SafeLlava export"):
            push_to_hub(tmp_path / "half", "org/safe-llava-tiny")
        with pytest.raises(ValueError):
            push_to_hub(folder, "not a/valid repo id!")
    api_class.assert_not_called()


def test_cli_exports_from_a_checkpoint_and_pushes(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "metrics.json").write_text(json.dumps({"level_accuracy": 0.4321}))
    parser = hub_module.add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--model", str(tmp_path / "checkpoint"), "--output", str(tmp_path / "export"),
        "--evaluation", str(tmp_path / "metrics.json"), "--push-to-hub", "org/safe-llava-tiny",
    ])
    with mock.patch.object(hub_module, "HfApi") as api_class:
        folder = hub_module.run_export(args)
    card = (folder / "README.md").read_text()
    assert format_metric(0.4321) in card and 'repo_id = "org/safe-llava-tiny"' in card
    api = api_class.return_value
    api.create_repo.assert_called_once_with(
        repo_id="org/safe-llava-tiny", private=True, exist_ok=True, repo_type="model"
    )
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(folder)
    api.create_branch.assert_not_called()

    push_args = hub_module.add_push_arguments(argparse.ArgumentParser()).parse_args(
        ["--folder", str(folder), "--repo-id", "org/other", "--public"]
    )
    with mock.patch.object(hub_module, "HfApi") as api_class:
        hub_module.run_push(push_args)
    api_class.return_value.create_repo.assert_called_once_with(
        repo_id="org/other", private=False, exist_ok=True, repo_type="model"
    )
