"""Auto classes in-process, and trust_remote_code loading in a fresh process where the package cannot be imported."""

import json

import torch
from safetensors.torch import load_file
from conftest import chat_prompt, random_image, run_without_the_package
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from modeling_safe_llava import SafeLlavaConfig, SafeLlavaForConditionalGeneration, SafeLlavaProcessor
from modeling_safe_llava.bases import base_for_model_type
from modeling_safe_llava.tools.hub import REMOTE_CODE_FILES


def save(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def test_auto_classes_in_process(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    save(model, processor, tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SafeLlavaConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is SafeLlavaForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is SafeLlavaForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tmp_path)) is SafeLlavaProcessor


def test_saved_folder_carries_remote_code_and_auto_map(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    save(model, processor, tmp_path)
    own_files = base_for_model_type(model.config.model_type).remote_code_files()
    for name in own_files:
        assert (tmp_path / name).is_file(), name
    assert set(own_files) <= set(REMOTE_CODE_FILES)
    other_bases = set(REMOTE_CODE_FILES) - set(own_files)  # another base's file is not this checkpoint's code
    assert not any((tmp_path / name).exists() for name in other_bases), sorted(other_bases)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_safe_llava.SafeLlavaConfig"
    assert auto_map["AutoModel"] == "modeling_safe_llava.SafeLlavaForConditionalGeneration"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_safe_llava.SafeLlavaForConditionalGeneration"
    processor_map = json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]
    assert processor_map["AutoProcessor"] == "processing_safe_llava.SafeLlavaProcessor"


FRESH_PROCESS_SCRIPT = """
    import sys, json, torch
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    from pathlib import Path
    from PIL import Image
    from safetensors.torch import save_file
    folder, inputs_dir, out_dir = map(Path, sys.argv[1:4])
    spec = json.loads((inputs_dir / "inputs.json").read_text())
    inputs = {"images": [Image.open(inputs_dir / name) for name in spec["images"]], "texts": spec["texts"]}
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    model2 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == type(model2).__name__ == "SafeLlavaForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    reprocessed = processor(images=inputs["images"], text=inputs["texts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**reprocessed)
    tokens = model.generate(**reprocessed, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    save_file({"input_ids": reprocessed["input_ids"], "logits": out.logits, "level": out.safety_level_logits,
               "tokens": tokens}, str(out_dir / "out.safetensors"))
    (out_dir / "out.json").write_text(json.dumps({"threshold": model.generation_config.safety_threshold,
                                                   "processor": type(processor).__name__}))
"""


def test_fresh_process_loads_model_and_processor_with_trust_remote_code(trained_tiny_safe_llava, tmp_path):
    model, processor = trained_tiny_safe_llava
    model.generation_config.safety_threshold = 0.25
    folder = tmp_path / "safe-llava-tiny"
    save(model, processor, folder)
    images, texts = [random_image(0), random_image(1)], [chat_prompt(processor), chat_prompt(processor, "Describe.")]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    for i, image in enumerate(images):
        image.save(tmp_path / f"image{i}.png")
    (tmp_path / "inputs.json").write_text(json.dumps({"images": ["image0.png", "image1.png"], "texts": texts}))
    run_without_the_package(FRESH_PROCESS_SCRIPT, folder, tmp_path, tmp_path, work_dir=tmp_path)
    remote = {**load_file(tmp_path / "out.safetensors"), **json.loads((tmp_path / "out.json").read_text())}
    with torch.no_grad():
        local = model(**inputs)
    local_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, safety_threshold=0.0)
    assert remote["processor"] == "SafeLlavaProcessor"
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert (remote["logits"] - local.logits).abs().max().item() <= 1e-5
    assert (remote["level"] - local.safety_level_logits).abs().max().item() <= 1e-5
    assert torch.equal(remote["tokens"], local_tokens)
    assert remote["threshold"] == 0.25  # the default threshold survives remote-code loading
