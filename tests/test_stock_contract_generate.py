"""The stock contract of `generate` (issue 11, item 2; issue 19, item 3): head-only SafeLlava produces the tokens, scores
and output classes of the stock model of each base (`bases.BASES`) with the same weights, with safety off and with
safety on (every action allow)."""

import pytest
import torch
from stock_contract import (
    MODES,
    assert_same,
    assert_same_fields,
    build_pair,
    image_inputs,
    image_kwargs,
    mode_kwargs,
    run_both,
)
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

NEW = {"max_new_tokens": 5}
STRATEGIES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 20},
    "beam_search": {"do_sample": False, "num_beams": 2},
    "beam_sample": {"do_sample": True, "num_beams": 2, "top_k": 20},
}


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def pair(mode, base):
    """(stock, SafeLlava, processor) of one base in one safety mode, eager attention."""
    return build_pair(mode, base=base)


@pytest.fixture
def inputs(pair, base):
    """A left-padded batch of two prompts with one image each."""
    return image_inputs(pair[2], base=base)


def generate_both(stock, safe, mode, seed=0, **kwargs):
    """Stock's and SafeLlava's `generate(**kwargs)`, each from the same RNG seed; mirrors stock's errors."""

    def call(model, extra):
        torch.manual_seed(seed)
        return model.generate(**kwargs, **extra)

    return run_both(lambda: call(stock, {}), lambda: call(safe, mode_kwargs(mode, safe)))


def sequences_of(output):
    return output.sequences if hasattr(output, "sequences") else output


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_tokens_equal_stock(pair, mode, strategy, inputs):
    stock, safe, _ = pair
    expected, actual = generate_both(stock, safe, mode, **inputs, **STRATEGIES[strategy], **NEW)
    assert_same(expected, sequences_of(actual), f"{strategy} sequences")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_dict_outputs_scores_logits_and_transition_scores_equal_stock(pair, mode, strategy, inputs):
    stock, safe, _ = pair
    kwargs = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True, **NEW}
    if strategy != "greedy":
        kwargs["num_return_sequences"] = 2
    expected, actual = generate_both(stock, safe, mode, **inputs, **STRATEGIES[strategy], **kwargs)
    stock_class = GenerateBeamDecoderOnlyOutput if "beam" in strategy else GenerateDecoderOnlyOutput
    assert isinstance(expected, stock_class)
    assert_same_fields(expected, actual)  # sequences, scores, logits, cache; beams: sequences_scores, beam_indices
    if mode == "safety_on_allow":
        assert actual.safety_assessment is not None
        assert actual.safety_assessment.actions == ["allow", "allow"]
    beam_indices = getattr(expected, "beam_indices", None)
    for normalize in (False, True):
        want = stock.compute_transition_scores(expected.sequences, expected.scores, beam_indices, normalize)
        got = safe.compute_transition_scores(actual.sequences, actual.scores, getattr(actual, "beam_indices", None), normalize)
        assert_same(want, got, f"transition scores (normalize_logits={normalize})")
    assert isinstance(actual, stock_class), f"{type(actual).__name__} is not a {stock_class.__name__}"


def test_generate_from_nothing_but_the_bos_token(pair, mode):
    """No input_ids, no image: stock starts from BOS; nothing to judge, so SafeLlava gives stock's tokens."""
    stock, safe, _ = pair
    expected, actual = generate_both(stock, safe, mode, do_sample=False, return_dict_in_generate=True, **NEW)
    assert_same(expected.sequences, actual.sequences, "sequences from BOS")


def test_assisted_decoding_with_the_model_as_its_own_assistant(pair, mode, base):
    stock, safe, processor = pair
    inputs = image_inputs(processor, questions=("What is shown in this image?",), base=base)  # assisted: batch 1
    greedy = stock.generate(**inputs, do_sample=False, **NEW)

    def call(model, extra):
        return model.generate(**inputs, assistant_model=model, do_sample=False, **NEW, **extra)

    expected, actual = run_both(lambda: call(stock, {}), lambda: call(safe, mode_kwargs(mode, safe)))
    assert expected is not None, "stock assisted decoding should run"
    assert_same(greedy, expected, "stock assisted vs greedy")
    assert_same(expected, sequences_of(actual), "assisted sequences")


@pytest.mark.parametrize("with_input_ids", [True, False], ids=["with_input_ids", "embeds_only"])
def test_inputs_embeds(pair, mode, with_input_ids, inputs, base):
    stock, safe, _ = pair
    kwargs = {
        "inputs_embeds": stock.get_input_embeddings()(inputs["input_ids"]),
        **image_kwargs(inputs, base),
        "attention_mask": inputs["attention_mask"],
        "do_sample": False,
        **NEW,
    }
    if with_input_ids:
        kwargs["input_ids"] = inputs["input_ids"]
    expected, actual = generate_both(stock, safe, mode, **kwargs)
    if not base.generates_from_inputs_embeds:
        assert expected is None, "stock refuses inputs_embeds, and SafeLlava raised the same error (run_both)"
        return
    assert expected is not None, "stock generates from inputs_embeds"
    assert_same(expected, sequences_of(actual), "sequences from inputs_embeds")


def test_continuing_from_past_key_values(pair, mode, inputs):
    stock, safe, _ = pair

    def two_calls(model, extra):
        first = model.generate(**inputs, do_sample=False, max_new_tokens=3, return_dict_in_generate=True, **extra)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1] :])], 1)
        # As with stock: the images already live in the cache, so no pixel_values (stock raises if they are passed).
        return model.generate(
            input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
            do_sample=False, max_new_tokens=3, **extra,
        )  # fmt: skip

    expected, actual = run_both(lambda: two_calls(stock, {}), lambda: two_calls(safe, mode_kwargs(mode, safe)))
    assert expected is not None, "stock continues from its cache"
    assert_same(stock.generate(**inputs, do_sample=False, max_new_tokens=6), expected, "stock continued vs one call")
    assert_same(expected, sequences_of(actual), "continued sequences")


def test_static_cache(pair, mode, inputs):
    stock, safe, _ = pair
    expected, actual = generate_both(stock, safe, mode, **inputs, do_sample=False, cache_implementation="static", **NEW)
    assert expected is not None, "stock generates with a static cache"
    assert_same(expected, sequences_of(actual), "static-cache sequences")


def test_torch_compile_of_forward_and_decode_steps(pair, mode, inputs, base):
    """
    `torch.compile(forward, fullgraph=True)`: any graph break (host sync such as `int(tensor)`, data-dependent Python
    branch) fails. backend="eager" only traces with dynamo (no inductor codegen), which keeps this test cheap on CPU
    while still catching what breaks compilation. Then the decode steps of `generate` with a static cache, compiled
    the way transformers does it (`CompileConfig`, forced on CPU with its `_compile_all_devices` switch).
    """
    from transformers import CompileConfig

    stock, safe, _ = pair
    stock(**inputs), safe(**inputs)  # eager warm-up: transformers installs its output-capturing hooks lazily
    torch._dynamo.reset()
    expected, actual = run_both(
        lambda: torch.compile(stock.forward, backend="eager", fullgraph=True)(**inputs),
        lambda: torch.compile(safe.forward, backend="eager", fullgraph=True)(**inputs),
        error_family=torch._dynamo.exc.TorchDynamoException,
    )
    # Where stock's forward with images compiles with fullgraph=True (LLaVA-1.5), SafeLlava's must give its logits;
    # where it cannot (LLaVA-NeXT: anyres picks each image's grid from its size, a data-dependent branch), SafeLlava
    # fails the same way.
    assert (expected is not None) == base.compiles_fullgraph, "stock's fullgraph compilation changed"
    if expected is not None:
        assert_same(expected.logits, actual.logits, "compiled forward logits")

    def compiled_generate(model, extra):
        config = CompileConfig(backend="eager", fullgraph=True)
        config._compile_all_devices = True
        return model.generate(
            **inputs, do_sample=False, cache_implementation="static", compile_config=config, **NEW, **extra
        )

    torch._dynamo.reset()
    expected, actual = run_both(lambda: compiled_generate(stock, {}), lambda: compiled_generate(safe, mode_kwargs(mode, safe)))
    assert expected is not None, "stock generates with compiled decode steps"
    assert_same(expected, sequences_of(actual), "compiled static-cache sequences")


def test_safety_off_runs_on_untrained_modules(base):
    """safety_threshold=1.0 means nothing can be flagged, so the fail-closed error of untrained modules is not due."""
    stock, safe, processor = build_pair("safety_off", base=base)
    assert safe.config.safety_modules_trained is False
    inputs = image_inputs(processor, base=base)
    out = safe.generate(**inputs, safety_threshold=1.0, do_sample=False, return_dict_in_generate=True, **NEW)
    assert_same(stock.generate(**inputs, do_sample=False, **NEW), out.sequences, "safety-off sequences")


def test_nothing_to_judge_runs_on_untrained_modules_and_a_verdict_asked_for_fails_closed(base):
    """Every action `allow` and no verdict asked for: no verdict can change an answer, so untrained modules give stock's
    tokens, as with safety off. Asking for the verdict (`return_dict_in_generate`) makes it matter: that raises."""
    stock, safe, processor = build_pair("safety_off", base=base)
    assert safe.config.safety_modules_trained is False
    inputs = image_inputs(processor, base=base)
    allow = {name: "allow" for name in safe.config.safety_type_labels[:-1]}
    out = safe.generate(**inputs, safety_threshold=0.0, safety_actions=allow, do_sample=False, **NEW)
    assert_same(stock.generate(**inputs, do_sample=False, **NEW), out, "all-allow sequences")
    with pytest.raises(ValueError, match="untrained"):
        safe.generate(
            **inputs, safety_threshold=0.0, safety_actions=allow, do_sample=False, return_dict_in_generate=True, **NEW
        )  # fmt: skip
