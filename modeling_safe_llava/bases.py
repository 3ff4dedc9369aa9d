"""The bases SafeLlava ships, in one registry: what the tools, training and the Auto classes read, so that none of
them branches on a base.

A base is its config, model and processor classes (one remote-code file each or together, built on the seam:
`docs/bases.md`). Adding one is one `Base(...)` entry in `BASES`; the package registers it with the Auto classes, and
evaluate, calibrate, audit, export, serve and training then take it. This file holds the model registry only: what the
demo builds for each base is the demo's (`tools/demo.py`, `DEMO_MODELS`).
"""

import ast
from dataclasses import dataclass
from pathlib import Path

from .configuration_safe_llava import SafeLlavaConfig
from .gemma3_safe_llava import SafeGemma3Config, SafeGemma3ForConditionalGeneration, SafeGemma3Processor
from .llava_next_safe_llava import SafeLlavaNextConfig, SafeLlavaNextForConditionalGeneration, SafeLlavaNextProcessor
from .modeling_safe_llava import SafeLlavaForConditionalGeneration
from .processing_safe_llava import SafeLlavaProcessor
from .qwen2_5_vl_safe_llava import SafeQwen2_5_VLConfig, SafeQwen2_5_VLForConditionalGeneration, SafeQwen2_5_VLProcessor

PACKAGE_DIR = Path(__file__).resolve().parent
# Files every export ships whatever the classes import: the pipeline `config.json` names in `custom_pipelines`.
ALWAYS_SHIPPED = ("pipeline_safe_llava.py",)


@dataclass(frozen=True)
class Base:
    """
    One base: its SafeLlava classes and the presets that describe it. The tools pick a base by its checkpoint's
    `model_type`, or by `name` on the command line (`safe-llava demo --base gemma3`); model code never branches on it.

    Args:
        config_class, model_class, processor_class: the base's SafeLlava classes (built on the seam).
        name: the name the command line takes (`--base`).
        stock_checkpoint: the stock checkpoint of the base's 7B-class preset.
        large_preset: that preset, in `configuration/`.
    """

    config_class: type
    model_class: type
    processor_class: type
    name: str
    stock_checkpoint: str
    large_preset: str

    @property
    def model_type(self) -> str:
        """The SafeLlava `model_type` of this base's checkpoints (e.g. `"safe_llava"`)."""
        return self.config_class.model_type

    @property
    def stock_model_type(self) -> str:
        """The `model_type` of the stock checkpoints `from_base` converts (e.g. `"llava"`)."""
        return self.model_class.stock_class.config_class.model_type

    @property
    def stock_class_name(self) -> str:
        """The stock model class this base wraps (e.g. `"LlavaForConditionalGeneration"`), for messages."""
        return self.model_class.stock_class.__name__

    def auto_maps(self) -> tuple[dict, dict]:
        """`(config auto_map, processor auto_map)`: this base's classes in its remote-code files."""
        model = _reference(self.model_class)
        config_map = {"AutoConfig": _reference(self.config_class), "AutoModel": model, "AutoModelForImageTextToText": model}
        return config_map, {"AutoProcessor": _reference(self.processor_class)}

    def remote_code_files(self) -> tuple[str, ...]:
        """The package files a checkpoint of this base runs with `trust_remote_code=True`: the files of its three
        classes and every sibling they import (function-level imports included), plus `ALWAYS_SHIPPED`."""
        pending = [Path(cls.__module__.rsplit(".", 1)[-1] + ".py").name for cls in self.classes]
        found = set(ALWAYS_SHIPPED)
        while pending:
            name = pending.pop()
            if name not in found:
                found.add(name)
                pending += _sibling_imports(PACKAGE_DIR / name)
        return tuple(sorted(found))

    @property
    def classes(self) -> tuple[type, type, type]:
        return self.config_class, self.model_class, self.processor_class


BASES = (
    Base(
        SafeLlavaConfig,
        SafeLlavaForConditionalGeneration,
        SafeLlavaProcessor,
        name="llava",
        stock_checkpoint="llava-hf/llava-1.5-7b-hf",
        large_preset="7b.json",
    ),
    Base(
        SafeLlavaNextConfig,
        SafeLlavaNextForConditionalGeneration,
        SafeLlavaNextProcessor,
        name="llava-next",
        stock_checkpoint="llava-hf/llava-v1.6-mistral-7b-hf",
        large_preset="llava-next-7b.json",
    ),
    Base(
        SafeGemma3Config,
        SafeGemma3ForConditionalGeneration,
        SafeGemma3Processor,
        name="gemma3",
        stock_checkpoint="google/gemma-3-4b-it",
        large_preset="gemma3-4b.json",
    ),
    Base(
        SafeQwen2_5_VLConfig,
        SafeQwen2_5_VLForConditionalGeneration,
        SafeQwen2_5_VLProcessor,
        name="qwen2_5_vl",
        stock_checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",
        large_preset="qwen2_5_vl-7b.json",
    ),
)


def base_named(name: str) -> Base:
    """The base the command line calls `name`; a `ValueError` naming the accepted names otherwise."""
    for base in BASES:
        if base.name == name:
            return base
    raise ValueError(f"Unknown base {name!r}; accepted: {', '.join(base.name for base in BASES)}.")


def base_for_model_type(model_type) -> Base:
    """The base of a SafeLlava checkpoint's `model_type`; a `ValueError` naming the accepted ones otherwise."""
    for base in BASES:
        if base.model_type == model_type:
            return base
    raise ValueError(
        f"model_type {model_type!r} is not a SafeLlava model; accepted: {[base.model_type for base in BASES]}."
    )


def base_for_stock_model_type(model_type) -> Base | None:
    """The base that converts stock checkpoints of `model_type` (e.g. `"llava"`), or `None`."""
    return next((base for base in BASES if base.stock_model_type == model_type), None)


def remote_code_files() -> tuple[str, ...]:
    """Every remote-code file of the package: the union over the bases."""
    return tuple(sorted({name for base in BASES for name in base.remote_code_files()}))


def load_safe_model(path, **from_pretrained_kwargs):
    """A saved SafeLlava of any base (its class from the registry, never from the folder's `auto_map`)."""
    from transformers import AutoConfig

    base = base_for_model_type(AutoConfig.from_pretrained(path).model_type)
    return base.model_class.from_pretrained(path, **from_pretrained_kwargs)


def load_safe_processor(path, model_type: str, **from_pretrained_kwargs):
    """The processor saved with a SafeLlava of `model_type` (`from_pretrained_kwargs`: e.g. `revision`)."""
    return base_for_model_type(model_type).processor_class.from_pretrained(path, **from_pretrained_kwargs)


def _reference(cls) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _sibling_imports(path: Path) -> list[str]:
    """`x.py` for each `from .x import ...` in `path` (anywhere in the file)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.append(f"{node.module}.py")
    return names


__all__ = [
    "Base",
    "BASES",
    "base_for_model_type",
    "base_named",
    "base_for_stock_model_type",
    "load_safe_model",
    "load_safe_processor",
    "remote_code_files",
]
