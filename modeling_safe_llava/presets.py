"""Presets kept as data at the top of the repository (`configuration/`, `processors/`, `hub_cards/`).

An installed wheel carries them under `modeling_safe_llava/presets/<kind>/`; a source checkout (or an editable
install) reads them from the repository root.
"""

import json
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
