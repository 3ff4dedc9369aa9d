"""Presets kept as data at the top of the repository (`configuration/`, `processors/`, `hub_cards/`).

An installed wheel carries them under `modeling_safe_llava/presets/<kind>/`; a source checkout (or an editable
install) reads them from the repository root.
"""

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

PRESET_KINDS = ("configuration", "processors", "hub_cards")


def preset_dir(kind: str) -> Path:
    """The folder holding the presets of `kind` (one of `PRESET_KINDS`)."""
    if kind not in PRESET_KINDS:
        raise ValueError(f"Unknown preset kind {kind!r}; accepted: {', '.join(PRESET_KINDS)}.")
    installed = Path(__file__).resolve().parent / "presets" / kind
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / kind


def preset_path(kind: str, name: str) -> Path:
    path = preset_dir(kind) / name
    if not path.is_file():
        available = sorted(p.name for p in preset_dir(kind).iterdir()) if preset_dir(kind).is_dir() else []
        raise ValueError(f"No {kind} preset named {name!r}; available: {available}.")
    return path


def load_json_preset(kind: str, name: str) -> dict:
    return json.loads(preset_path(kind, name).read_text())


def load_safety_policy(name: str = "paper_safety_policy.json") -> dict:
    """
    A safety policy preset as `SafeLlavaConfig` fields: `safety_actions`, `safety_hints`, `safety_refusals`.
    A preset may `extend` another and override its `actions`.
    """
    raw = load_json_preset("processors", name)
    if "extends" in raw:
        base = load_safety_policy(raw["extends"])
        base["safety_actions"].update(raw.get("actions", {}))
        return base
    hints, refusals = {}, {}
    for type_name, risk in raw["risk_descriptions"].items():
        overrides = raw.get("level_hint_overrides", {}).get(type_name, {})
        texts = [overrides.get(str(level), template) for level, template in enumerate(raw["level_hints"])]
        hints[type_name] = [raw["hint_format"].format(hint=t.format(risk=risk)) if t else "" for t in texts]
        refusals[type_name] = raw["refusal"].format(risk=risk)
    return {"safety_actions": raw["actions"], "safety_hints": hints, "safety_refusals": refusals}


def load_chat_template(name: str = "chat_template_llava15.jinja") -> str:
    return preset_path("processors", name).read_text()


@dataclass(frozen=True)
class BasePreset:
    """
    One supported base model family: which SafeLlava classes wrap it and which presets describe it. The tools pick a
    base by name from `BASES` (e.g. `safe-llava demo --base gemma3`); model code never branches on a base's name.

    Args:
        name: the name the CLI takes (`--base`).
        model_class, processor_class: the SafeLlava classes of the base, exported by `modeling_safe_llava`.
        stock_checkpoint: the stock checkpoint of the base's 7B-class preset.
        large_preset: that preset, in `configuration/`.
        head_reads: what the safety head judges, in a few words (README's table of bases).
        demo_builder: `"module:function"` building the demo's model and processor, `(language_model, seed)`.
        demo_language_models: the `--language-model` choices of the demo on this base (the first is the default).
    """

    name: str
    model_class: str
    processor_class: str
    stock_checkpoint: str
    large_preset: str
    head_reads: str
    demo_builder: str
    demo_language_models: tuple = ("tiny",)

    def build_demo_model(self, language_model: str | None = None, seed: int = 0):
        """The demo's model (safety modules untrained) and processor, paper policy texts tokenized."""
        language_model = language_model or self.demo_language_models[0]
        if language_model not in self.demo_language_models:
            raise ValueError(
                f"--language-model {language_model!r} is not available with --base {self.name}; accepted: "
                f"{', '.join(self.demo_language_models)}."
            )
        module_name, function_name = self.demo_builder.split(":")
        return getattr(importlib.import_module(module_name), function_name)(language_model, seed=seed)


BASES = {
    "llava": BasePreset(
        name="llava",
        model_class="SafeLlavaForConditionalGeneration",
        processor_class="SafeLlavaProcessor",
        stock_checkpoint="llava-hf/llava-1.5-7b-hf",
        large_preset="7b.json",
        head_reads="CLIP's vision_feature_layer (-2), CLS dropped: the 24x24 grid the language model reads",
        demo_builder="modeling_safe_llava.tools.embedded:build_embedded_default",
        demo_language_models=("smollm2", "tiny"),
    ),
    "llava-next": BasePreset(
        name="llava-next",
        model_class="SafeLlavaNextForConditionalGeneration",
        processor_class="SafeLlavaNextProcessor",
        stock_checkpoint="llava-hf/llava-v1.6-mistral-7b-hf",
        large_preset="llava-next-7b.json",
        head_reads="CLIP's vision_feature_layer grid of the base image and of every anyres crop (riskiest unit)",
        demo_builder="modeling_safe_llava.tiny:build_demo_safe_llava_next",
    ),
    "gemma3": BasePreset(
        name="gemma3",
        model_class="SafeGemma3ForConditionalGeneration",
        processor_class="SafeGemma3Processor",
        stock_checkpoint="google/gemma-3-4b-it",
        large_preset="gemma3-4b.json",
        head_reads="SigLIP's last hidden state average-pooled as Gemma 3 pools it: the 16x16 grid the language model reads",
        demo_builder="modeling_safe_llava.tiny_gemma3:build_demo_safe_gemma3",
    ),
}


def base_preset(name: str) -> BasePreset:
    """The `BasePreset` named `name`; a `ValueError` naming the accepted names otherwise."""
    if name not in BASES:
        raise ValueError(f"Unknown base {name!r}; accepted: {', '.join(BASES)}.")
    return BASES[name]
