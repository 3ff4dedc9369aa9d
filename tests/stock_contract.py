"""Shared pieces of the stock-contract tests (issue 11, item 2; issue 19, item 3): for each base of `bases.BASES`, a
stock model and a head-only SafeLlava (`num_llm_safety_tokens=0`) holding the same weights, the two safety modes they
are compared in, inputs, a differential runner that mirrors stock's errors, and one helper that forces the safety
head's verdicts.

Only public API is used, apart from `force_safety_verdicts`, which finds the head's classifiers by module name
("level_classifier" / "category_classifier"); adapt that one function if the names change.
"""

import torch
from bases import BASES
from conftest import chat_prompt
from transformers import Cache

# safety off: threshold 1.0 flags nothing, so untrained modules must not raise the fail-closed error.
# safety on: threshold 0.0 flags every image row, every action is "allow", so the answers must still be stock's.
MODES = ("safety_off", "safety_on_allow")


def build_pair(mode: str, attn_implementation: str = "eager", base=BASES["llava"]):
    """
    `(stock, safe, processor)`: a tiny random stock model of `base`, and SafeLlava built from a deep copy of it in
    head-only mode (paper policy texts tokenized), both float32, eval, with the same attention implementation.
    """
    stock, safe, processor = base.build_pair(num_llm_safety_tokens=0)
    for model in (stock, safe):
        model.set_attn_implementation(attn_implementation)
    safe.config.safety_modules_trained = mode == "safety_on_allow"
    return stock, safe, processor


def mode_kwargs(mode: str, safe) -> dict:
    """The `generate` keyword arguments of a safety mode (passed to SafeLlava only; stock gets none)."""
    if mode == "safety_off":
        return {"safety_threshold": 1.0}
    return {"safety_threshold": 0.0, "safety_actions": {name: "allow" for name in safe.config.risky_type_labels}}


def image_inputs(processor, questions=("What is shown in this image?", "Describe the picture. Read the text."), base=None):
    """Left-padded chat prompts with one random image each (rows of different lengths; with an anyres base, images
    of different crop counts)."""
    base = base or BASES["llava"]
    texts = [chat_prompt(processor, q) for q in questions]
    images = [base.random_image(i) for i in range(len(texts))]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def image_kwargs(inputs, base) -> dict:
    """The image fields of processor outputs (`pixel_values`, and `image_sizes` where the base has them), and the
    fields that follow the prompt's tokens (`token_type_ids` where the base has them)."""
    return {name: inputs[name] for name in (*base.image_fields, *base.prompt_fields) if name in inputs}


def text_only_prompt(processor, question="Describe the picture.") -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": question}]}], add_generation_prompt=True
    )


def run_both(stock_call, safe_call, error_family=None):
    """
    Runs `stock_call()`; if stock raises, asserts that `safe_call()` raises the same exception type (or, with
    `error_family`, any exception of that family when stock's is one, e.g. torch.compile's errors, whose exact class
    names the first unsupported construct met) and returns `(None, None)`. Otherwise returns
    `(stock_result, safe_result)` (SafeLlava's exception, if any, propagates).
    """
    try:
        expected = stock_call()
    except Exception as stock_error:  # noqa: BLE001 - we mirror whatever stock raises
        accepted = type(stock_error)
        if error_family is not None and isinstance(stock_error, error_family):
            accepted = error_family
        try:
            safe_call()
        except accepted:
            return None, None
        except Exception as safe_error:  # noqa: BLE001
            raise AssertionError(
                f"stock raised {type(stock_error).__name__}({stock_error}); SafeLlava raised "
                f"{type(safe_error).__name__}({safe_error})"
            ) from safe_error
        raise AssertionError(f"stock raised {type(stock_error).__name__}({stock_error}); SafeLlava did not raise")
    return expected, safe_call()


def assert_same(expected, actual, path="output", atol=1e-5):
    """Recursive equality of tensors, tuples/lists, dicts and caches (layer keys and values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert expected.shape == actual.shape, f"{path}: shape {tuple(actual.shape)} != stock {tuple(expected.shape)}"
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(actual, expected), f"{path}: {actual.tolist()} != stock {expected.tolist()}"
    elif isinstance(expected, Cache):
        assert isinstance(actual, Cache), f"{path}: expected a Cache, got {type(actual).__name__}"
        assert len(actual.layers) == len(expected.layers), f"{path}: number of cache layers differs"
        for i, (e, a) in enumerate(zip(expected.layers, actual.layers)):
            assert_same(e.keys, a.keys, f"{path}.layers[{i}].keys", atol)
            assert_same(e.values, a.values, f"{path}.layers[{i}].values", atol)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{path}: expected a sequence, got {type(actual).__name__}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != stock {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]", atol)
    elif isinstance(expected, dict):
        for key, value in expected.items():
            assert_same(value, actual[key], f"{path}.{key}", atol)
    else:
        assert actual == expected, f"{path}: {actual!r} != stock {expected!r}"


def assert_same_fields(expected, actual, path="output"):
    """
    Every field stock's `ModelOutput` holds (its non-None keys, so renames between transformers releases, such as
    5.24's `past_key_values` -> `cache`, need no change here) exists on SafeLlava's output with an equal value.
    """
    for name in expected.keys():
        assert name in actual.keys(), f"{path}.{name} is missing (stock has it)"
        assert_same(expected[name], actual[name], f"{path}.{name}")


def force_safety_verdicts(model, verdicts, units_per_image=None):
    """
    Makes the safety head return fixed verdicts: `verdicts` is a list of `(level index, type index)`, one per image
    in the order of `pixel_values`; `units_per_image` (default one each) says how many vision units (crops) the head
    judges per image, all of which get the image's verdict. Forward hooks on the head's level and type classifiers
    (found by module name) replace their logits with one-hot * 20. Returns the hook handles (call `.remove()` to undo).
    """
    units = units_per_image or [1] * len(verdicts)
    verdicts = [verdict for verdict, count in zip(verdicts, units) for _ in range(count)]
    targets = {"level_classifier": [v[0] for v in verdicts], "category_classifier": [v[1] for v in verdicts]}
    handles = []
    for name, module in model.named_modules():
        key = next((k for k in targets if name.endswith(k)), None)
        if key is None or not isinstance(module, torch.nn.Linear):
            continue

        def hook(mod, args, output, indices=targets[key]):
            assert output.shape[0] == len(indices), f"expected logits for {len(indices)} images, got {output.shape}"
            forced = torch.nn.functional.one_hot(torch.tensor(indices), output.shape[-1]).to(output) * 20.0
            return forced.reshape(output.shape)

        handles.append(module.register_forward_hook(hook))
    assert len(handles) == 2, "force_safety_verdicts: the safety head's classifiers were not found by name"
    return handles
