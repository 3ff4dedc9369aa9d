"""SafeLlava's custom `image-text-to-text` pipeline (issue 13, "the verdict where users look"): picked by the stock
`pipeline(..., trust_remote_code=True)` from an exported folder, it returns stock's output plus a `safety` entry.

Verdicts are forced through the saved weights (`force_verdict_by_bias`: the safety head's classifiers output their
bias only), so that they survive saving and hold in a fresh process.
"""

import json

import pytest
import torch
from conftest import chat_prompt, random_image, run_without_the_package
from stock_contract import force_safety_verdicts
from transformers import pipeline

from modeling_safe_llava.pipeline_safe_llava import (
    CUSTOM_PIPELINES,
    NOT_JUDGED_NO_IMAGE,
    SafeLlavaImageTextToTextPipeline,
    safety_entries,
)
from modeling_safe_llava.tools.hub import export_for_hub, verify_export_folder, write_custom_pipeline

RISKY = ["Politics", "Illegal Risk", "Insults and Bullying", "Fairness", "Privacy", "Misleading"]
ILLEGAL = RISKY.index("Illegal Risk")


def force_verdict_by_bias(model, level: int, type_index: int):
    """Every image gets `(level, type)`: the head's classifiers (found by module name) get zero weights and a one-hot
    bias of 20, so the verdict is stored in the weights."""
    targets = {"level_classifier": level, "category_classifier": type_index}
    found = 0
    for name, module in model.named_modules():
        key = next((k for k in targets if name.endswith(k)), None)
        if key is None or not isinstance(module, torch.nn.Linear):
            continue
        with torch.no_grad():
            module.weight.zero_()
            module.bias.copy_(torch.nn.functional.one_hot(torch.tensor(targets[key]), module.out_features) * 20.0)
        found += 1
    assert found == 2, "the safety head's classifiers were not found by name"


@pytest.fixture
def refused_export(trained_tiny_safe_llava, tmp_path):
    """An export whose head rates every image level 3 "Illegal Risk" (the paper's policy refuses it)."""
    model, processor = trained_tiny_safe_llava
    force_verdict_by_bias(model, level=3, type_index=ILLEGAL)
    return export_for_hub(model, processor, tmp_path / "export"), model, processor


def test_export_names_the_pipeline_in_config_and_verify_refuses_a_foreign_one(refused_export):
    folder, _, _ = refused_export
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert (folder / "pipeline_safe_llava.py").is_file()
    config["custom_pipelines"]["image-text-to-text"]["impl"] = "attacker/repo--evil.Evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="custom_pipelines"):
        verify_export_folder(folder)
    del config["custom_pipelines"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no custom_pipelines entry"):
        verify_export_folder(folder)


def test_write_custom_pipeline_adds_the_file_and_pins_a_foreign_entry(trained_tiny_safe_llava, tmp_path):
    model, _ = trained_tiny_safe_llava
    model.config.custom_pipelines = {"image-text-to-text": {"impl": "evil.Evil", "pt": []}}  # e.g. from a download
    model.save_pretrained(tmp_path)
    write_custom_pipeline(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES
    assert (tmp_path / "pipeline_safe_llava.py").read_text().startswith("# Copyright 2026 The SafeLlava authors")


FRESH_PROCESS_SCRIPT = """
    import sys, json
    from pathlib import Path
    from PIL import Image
    from transformers import pipeline
    folder, work = Path(sys.argv[1]), Path(sys.argv[2])
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "SafeLlavaImageTextToTextPipeline", type(pipe)
    assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
    image_path = str(work / "image.png")
    pil = Image.open(image_path)
    chat = lambda image: [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    prompt = sys.argv[3]
    whole = 200  # a refusal costs no language-model step: room for all of it
    runs = {
        "chat_pil": pipe(text=chat(pil), max_new_tokens=whole),
        "chat_path": pipe(text=chat(image_path), max_new_tokens=whole),
        "images_path": pipe(images=image_path, text=prompt, max_new_tokens=whole),
        "images_pil_off": pipe(images=pil, text=prompt, max_new_tokens=3, safety_threshold=1.0),
        "per_type_threshold": pipe(text=chat(pil), max_new_tokens=3, safety_threshold={"Illegal Risk": 1.0}),
        "hint_action": pipe(text=chat(pil), max_new_tokens=3, safety_actions={"Illegal Risk": "hint"}),
    }
    for outputs in runs.values():
        for output in outputs:
            output.pop("input_text")
            if not isinstance(output["generated_text"], str):
                output["generated_text"] = output["generated_text"][-1]["content"]
    (work / "runs.json").write_text(json.dumps(runs))
"""


def test_fresh_process_pipeline_returns_the_verdict_through_remote_code_only(refused_export, tmp_path):
    folder, _, processor = refused_export
    random_image(0).save(tmp_path / "image.png")
    run_without_the_package(FRESH_PROCESS_SCRIPT, folder, tmp_path, chat_prompt(processor, "What?"), work_dir=tmp_path)
    runs = {name: outputs[0] for name, outputs in json.loads((tmp_path / "runs.json").read_text()).items()}
    refusal = "I'm sorry, but I can't help with this request: the image appears to contain illegal content"
    for name in ("chat_pil", "chat_path", "images_path"):  # three input forms, one verdict: refused
        safety = runs[name]["safety"]
        assert safety["judged"] and safety["flagged"], name
        assert (safety["action"], safety["category_name"], safety["level"]) == ("refuse", "Illegal Risk", 3), name
        assert safety["risk"] > 0.99 and safety["threshold"] == 0.5
        assert {"level_name", "category", "level_probs", "type_probs"} <= set(safety)
        assert refusal in runs[name]["generated_text"], name
    off = runs["images_pil_off"]
    assert off["safety"] == {"judged": False, "reason": off["safety"]["reason"]} and "safety is off" in off["safety"]["reason"]
    assert refusal not in off["generated_text"]  # stock generation
    per_type = runs["per_type_threshold"]["safety"]
    assert per_type["judged"] and not per_type["flagged"] and per_type["action"] == "allow" and per_type["threshold"] == 1.0
    hint = runs["hint_action"]["safety"]
    assert hint["flagged"] and hint["action"] == "hint"
    assert refusal not in runs["hint_action"]["generated_text"]


def test_in_process_class_keeps_stock_fields_and_batches_rows_with_their_own_verdicts(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    pipe = pipeline(
        "image-text-to-text", model=model, processor=processor, pipeline_class=SafeLlavaImageTextToTextPipeline,
        safety_threshold=0.5,  # a constructor argument, as stock pipelines take their call arguments
    )  # fmt: skip
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": random_image(i)}, {"type": "text", "text": "What?"}]}]
        for i in range(2)
    ]
    handles = force_safety_verdicts(model, [(3, ILLEGAL), (0, len(RISKY))])  # row 0 refused, row 1 clean
    try:
        outputs = pipe(chats, batch_size=2, max_new_tokens=3, return_full_text=False)
    finally:
        for handle in handles:
            handle.remove()
    (refused,), (clean,) = outputs
    assert set(refused) == {"input_text", "generated_text", "safety"}
    assert refused["input_text"] == chats[0]
    assert refused["safety"]["action"] == "refuse" and refused["generated_text"].startswith("I'm sor")  # cut at max_new_tokens, as stock
    assert clean["safety"]["judged"] and not clean["safety"]["flagged"] and clean["safety"]["action"] == "allow"


def test_several_returned_sequences_share_their_row_verdict_and_text_only_rows_say_not_judged(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    pipe = pipeline("image-text-to-text", model=model, processor=processor, pipeline_class=SafeLlavaImageTextToTextPipeline)
    handles = force_safety_verdicts(model, [(2, 0)])
    try:
        outputs = pipe(images=random_image(0), text=chat_prompt(processor), max_new_tokens=2,
                       generate_kwargs={"num_beams": 2, "num_return_sequences": 2}, safety_actions={"Politics": "allow"})  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    assert len(outputs) == 2 and outputs[0]["safety"] == outputs[1]["safety"]
    assert outputs[0]["safety"]["flagged"] and outputs[0]["safety"]["action"] == "allow"  # the call's actions
    text_only = pipe(text=processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True), max_new_tokens=2)
    assert text_only[0]["safety"] == {"judged": False, "reason": NOT_JUDGED_NO_IMAGE}


def test_safety_entries_need_the_row_count_without_an_assessment():
    assert safety_entries(None, num_rows=2) == [safety_entries(None, num_rows=1)[0]] * 2
    with pytest.raises(ValueError, match="num_rows"):
        safety_entries(None)
