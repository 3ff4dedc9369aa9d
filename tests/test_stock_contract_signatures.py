"""What a base's `forward` restatement names (docs/bases.md, "What a `forward` names"), and what follows from it:
the same behaviour on every base. transformers' `generate` reads `forward`'s signature to decide how to run, so each
restatement names what its stock class's `forward` names; with nothing to judge the safety head never runs; the
first step computes `lm_head` over as many positions as stock's; the headless classes load SafeLlava checkpoints."""

import inspect

import pytest
import torch
from stock_contract import image_inputs

import modeling_safe_llava


# SafeLlava's own arguments, after stock's.
SAFETY_ARGUMENTS = {"headless": ("output_safety",), "generation": ("safety_labels", "output_safety")}
# The name a newer transformers gives a stock argument (5.24+: `cache` for `past_key_values`).
RENAMED_ARGUMENTS = ("cache",)
OLD_NAMES = {"cache": "past_key_values"}


def safe_class(base, part: str):
    """The base's generation class, or its headless class (`SafeLlavaModel`, ...)."""
    name = base.model_class if part == "generation" else base.model_class.replace("ForConditionalGeneration", "Model")
    return getattr(modeling_safe_llava, name)


def everything_allowed(config) -> dict:
    return {name: "allow" for name in config.safety_type_labels[:-1]}


@pytest.mark.parametrize("part", ["headless", "generation"])
def test_forward_names_every_argument_stock_forward_names(base, part):
    cls = safe_class(base, part)
    # 5.24+ calls `past_key_values` `cache`: a restatement keeps 5.23's name in that slot (and takes `cache` as well).
    stock = {OLD_NAMES.get(name, name): p for name, p in inspect.signature(cls.stock_class.forward).parameters.items()}
    safe = inspect.signature(cls.forward).parameters
    assert list(safe)[-1] == list(stock)[-1] == "kwargs"
    assert list(safe)[: len(stock) - 1] == list(stock)[:-1], "stock's arguments first, in stock's order"
    own = [name for name in safe if name not in stock]
    assert own[: len(SAFETY_ARGUMENTS[part])] == list(SAFETY_ARGUMENTS[part])
    assert set(own) <= {*SAFETY_ARGUMENTS[part], *RENAMED_ARGUMENTS}, own
    for name, parameter in stock.items():
        assert (safe[name].kind, safe[name].default) == (parameter.kind, parameter.default), name
    assert safe["kwargs"].annotation == stock["kwargs"].annotation, "stock's **kwargs annotation"


def test_nothing_to_judge_never_runs_the_safety_head(base):
    _, safe, processor = base.build_pair(num_llm_safety_tokens=2)
    safe.config.safety_modules_trained = True
    calls = []
    safe.model.safety_module.register_forward_hook(lambda *args: calls.append(1))
    inputs = image_inputs(processor, base=base)
    allow = everything_allowed(safe.config)
    nothing_to_judge = [{"safety_threshold": 1.0}, {"safety_threshold": 0.0, "safety_actions": allow}]
    for kwargs in nothing_to_judge:
        calls.clear()
        safe.generate(**inputs, max_new_tokens=2, do_sample=False, **kwargs)
        assert calls == [], kwargs
    # A verdict asked for is judged, once.
    calls.clear()
    out = safe.generate(
        **inputs, max_new_tokens=2, do_sample=False, safety_threshold=0.0, safety_actions=allow,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert len(calls) == 1 and out.safety_assessment.actions == ["allow"] * len(inputs["input_ids"])


def test_the_first_step_computes_lm_head_over_as_many_positions_as_stock(base):
    stock, safe, processor = base.build_pair()
    inputs = image_inputs(processor, base=base)
    positions = {}
    for name, model, kwargs in (("stock", stock, {}), ("safe", safe, {"safety_threshold": 1.0})):
        seen = []
        hook = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **kwargs)
        hook.remove()
        positions[name] = seen
    assert positions["safe"] == positions["stock"] == [1, 1]


def test_the_headless_class_loads_a_checkpoint_with_its_safety_weights(base, tmp_path):
    _, safe, _ = base.build_pair(num_llm_safety_tokens=2)
    safe.config.safety_modules_trained = True
    safe.save_pretrained(tmp_path)
    headless, info = safe_class(base, "headless").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert headless.config.safety_modules_trained is True
    expected = safe.model.state_dict()
    for name, value in headless.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_headless_class_saves_the_flat_safety_names(base, tmp_path):
    # The flat on-disk names (`safety_tokens`, `safety_head.q_proj`, ...), as the generation class saves them but
    # without its `model.` prefix (as stock's headless classes save theirs): whether the headless model was built or
    # loaded from a generation checkpoint. And the generation class loads what a headless class saved.
    _, safe, _ = base.build_pair(num_llm_safety_tokens=2)
    safe.config.safety_modules_trained = True
    safe.save_pretrained(tmp_path / "generation")
    flat = {key.removeprefix("model.") for key in saved_keys(tmp_path / "generation") if "safety" in key}
    assert {"safety_tokens", "llm_safety_tokens", "safety_head.q_proj.weight"} <= flat
    headless_class = safe_class(base, "headless")
    built = headless_class(safe.config)
    loaded = headless_class.from_pretrained(tmp_path / "generation")
    for name, headless in {"built": built, "loaded": loaded}.items():
        headless.save_pretrained(tmp_path / name)
        assert {key for key in saved_keys(tmp_path / name) if "safety" in key} == flat, name
    generation, info = type(safe).from_pretrained(tmp_path / "loaded", output_loading_info=True)
    assert set(info["missing_keys"]) <= {"lm_head.weight"}  # a headless checkpoint has no language-modeling head
    expected = safe.model.state_dict()
    for name, value in generation.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def saved_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            keys.update(weights.keys())
    return keys


def test_no_decoding_step_inspects_a_signature(base, monkeypatch):
    # transformers reads `inspect.signature(self.forward)` on every step of a remote-code model; the package computes
    # the signature of each SafeLlava `forward` once, so a longer generation inspects no more functions.
    _, safe, processor = base.build_pair()
    inputs = image_inputs(processor, base=base)
    inspected = []
    original = inspect._signature_from_function

    def counting(*args, **kwargs):
        if args[1].__name__ != "__call__":  # stock's logits processors inspect themselves on every step, as on stock
            inspected.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(inspect, "_signature_from_function", counting)
    counts = []
    for max_new_tokens in (2, 6):
        inspected.clear()
        safe.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, safety_threshold=1.0)
        counts.append(len(inspected))
    assert counts[0] == counts[1], counts
    assert not [f for f in inspected if f.__name__ == "forward" and f.__module__.startswith("modeling_safe_llava")]
