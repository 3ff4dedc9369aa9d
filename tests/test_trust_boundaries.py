"""Trust boundaries of checkpoints (issue 12, model side): what a crafted or incomplete checkpoint can and cannot do."""

import json
import logging

import pytest
import torch
from conftest import chat_prompt, random_image
from safetensors.torch import load_file, save_file

from modeling_safe_llava import SafeLlavaConfig, SafeLlavaForConditionalGeneration
from modeling_safe_llava.configuration_safe_llava import AUTO_MAP
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.safety_model_safe_llava import check_safety_ready


@pytest.fixture
def saved_trained(tmp_path):
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    model.save_pretrained(tmp_path)
    return tmp_path, model, processor


def test_a_trained_checkpoint_without_its_vision_tower_loads_untrained_and_names_what_is_missing(saved_trained, caplog):
    folder, _, _ = saved_trained
    weights = load_file(str(folder / "model.safetensors"))
    kept = {name: tensor for name, tensor in weights.items() if "vision_tower" not in name}
    assert len(kept) < len(weights)
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model = SafeLlavaForConditionalGeneration.from_pretrained(folder)
    assert model.config.safety_modules_trained is False  # the config said True
    assert "model.vision_tower." in caplog.text and "marked untrained" in caplog.text
    with pytest.raises(ValueError, match="untrained"):
        check_safety_ready(model.config)


def test_a_pickle_shard_named_in_a_safetensors_index_is_refused_before_it_is_opened(saved_trained, monkeypatch):
    folder, model, _ = saved_trained
    (folder / "model.safetensors").unlink()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model-00001-of-00001.bin")  # a harmless pickle, still never to be opened
    weight_map = {name: "pytorch_model-00001-of-00001.bin" for name in state}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match=r"safetensors files only; the checkpoint names \[.*pytorch_model-00001"):
        SafeLlavaForConditionalGeneration.from_pretrained(folder)


def test_safety_shapes_that_disagree_with_the_config_name_the_field_and_both_shapes(saved_trained):
    folder, model, _ = saved_trained
    config = json.loads((folder / "config.json").read_text())
    config["num_safety_tokens"] = model.config.num_safety_tokens + 3
    (folder / "config.json").write_text(json.dumps(config))
    hidden = model.config.text_config.hidden_size
    expected = f"(num_safety_tokens): checkpoint ({model.config.num_safety_tokens}, {hidden}), config ("
    with pytest.raises(ValueError, match=rf"{__import__('re').escape(expected)}"):
        SafeLlavaForConditionalGeneration.from_pretrained(folder)


def test_an_auto_map_read_from_a_checkpoint_never_survives_into_save_pretrained(saved_trained, tmp_path):
    folder, _, _ = saved_trained
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "attacker/repo--evil.Evil", "AutoModel": "attacker/repo--evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = SafeLlavaConfig.from_pretrained(folder)
    assert loaded.auto_map == AUTO_MAP
    model = SafeLlavaForConditionalGeneration.from_pretrained(folder)
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"]
    assert "attacker" not in json.dumps(saved) and saved == AUTO_MAP


@pytest.mark.parametrize("max_new_tokens", [0, -1])
def test_a_refused_row_rejects_a_non_positive_max_new_tokens_as_an_allowed_row_does(max_new_tokens):
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    inputs = processor(images=[random_image(0)], text=[chat_prompt(processor)], return_tensors="pt")
    refuse_all = {name: "refuse" for name in model.config.risky_type_labels}
    with pytest.raises(ValueError, match="max_new_tokens") as allowed:
        model.generate(**inputs, safety_threshold=1.0, max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError, match="max_new_tokens") as refused:
        model.generate(**inputs, safety_threshold=0.0, safety_actions=refuse_all, max_new_tokens=max_new_tokens)
    assert type(allowed.value) is type(refused.value)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_float_pixels_already_in_0_1_are_refused_unless_do_rescale_is_false(kind):
    """Stock's image processor divides them by 255 again, silently (a black image). SafeLlava's processor refuses them
    with a message naming the fix; with do_rescale=False they are used as given, as stock does."""
    _, processor = build_tiny_safe_llava(seed=0)
    image = torch.rand(3, 32, 32) if kind == "torch" else torch.rand(3, 32, 32).numpy()
    with pytest.raises(ValueError, match=r"Image 0 is a float array with samples in \[0, 1\].*do_rescale=False"):
        processor(images=image, text=chat_prompt(processor), return_tensors="pt")
    ours = processor(images=image, text=chat_prompt(processor), return_tensors="pt", do_rescale=False)["pixel_values"]
    stock = processor.image_processor(image, return_tensors="pt", do_rescale=False)["pixel_values"]
    assert torch.equal(ours, stock)
    assert ours.max() > 0  # not the black image a second rescale gives
    uint8 = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    assert processor(images=uint8, text=chat_prompt(processor), return_tensors="pt")["pixel_values"].shape[0] == 1
