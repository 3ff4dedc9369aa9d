"""The stock contract of `forward` (issue 11, item 2; issue 19, item 3): head-only SafeLlava against the stock model of
each base (`bases.BASES`) with the same weights, with safety off and with safety on (every action allow)."""

import pytest
import torch
from stock_contract import MODES, assert_same, assert_same_fields, build_pair, image_inputs, image_kwargs, run_both


@pytest.fixture(params=MODES)
def pair(request, base):
    """(stock, SafeLlava, processor) of one base in one safety mode, eager attention."""
    return build_pair(request.param, base=base)


@pytest.fixture
def inputs(pair, base):
    """A left-padded batch of two prompts with one image each."""
    return image_inputs(pair[2], base=base)


@torch.no_grad()
def test_logits_hidden_states_and_attentions_equal_stock(pair, inputs):
    stock, safe, _ = pair
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    expected, actual = stock(**inputs, **kwargs), safe(**inputs, **kwargs)
    assert expected.attentions is not None and expected.hidden_states is not None
    assert_same_fields(expected, actual)


@torch.no_grad()
def test_return_dict_false_gives_stock_tuple_first(pair, inputs):
    stock, safe, _ = pair
    expected = stock(**inputs, return_dict=False, output_hidden_states=True)
    actual = safe(**inputs, return_dict=False, output_hidden_states=True)
    assert isinstance(actual, tuple), f"return_dict=False gave {type(actual).__name__}, stock gives a tuple"
    assert len(actual) >= len(expected)
    assert_same(expected, actual[: len(expected)], "tuple")


@torch.no_grad()
def test_eager_equals_sdpa(pair, inputs):
    stock, safe, _ = pair
    eager = safe(**inputs).logits
    safe.set_attn_implementation("sdpa")
    stock.set_attn_implementation("sdpa")
    sdpa = safe(**inputs).logits
    attended = inputs["attention_mask"].bool()  # padding queries attend to nothing: eager and sdpa may differ there
    assert_same(eager[attended], sdpa[attended], "sdpa logits vs eager")
    assert_same(stock(**inputs).logits, sdpa, "sdpa logits vs stock sdpa")


def causal_4d_mask(attention_mask, dtype=torch.float32):
    """A custom additive 4D mask `(batch, 1, q, k)`: causal plus padding, 0 where attended, dtype-min elsewhere."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def assert_forward_mirrors_stock(stock, safe, kwargs, what, stock_must_run=True):
    """SafeLlava's forward raises what stock raises, or gives stock's logits."""
    expected, actual = run_both(lambda: stock(**kwargs), lambda: safe(**kwargs))
    assert expected is not None or not stock_must_run, f"stock forward should run with {what}"
    if expected is not None:
        assert_same(expected.logits, actual.logits, f"logits with {what}")
    return actual


@torch.no_grad()
def test_custom_4d_attention_mask(pair, inputs, base):
    stock, safe, _ = pair
    inputs["attention_mask"] = causal_4d_mask(inputs["attention_mask"])
    assert_forward_mirrors_stock(stock, safe, inputs, "a custom 4D attention mask", base.takes_4d_attention_mask)


@torch.no_grad()
def test_inputs_embeds_in_place_of_input_ids(pair, inputs, base):
    stock, safe, _ = pair
    embeds = stock.get_input_embeddings()(inputs["input_ids"])
    kwargs = {"inputs_embeds": embeds, **image_kwargs(inputs, base), "attention_mask": inputs["attention_mask"]}
    actual = assert_forward_mirrors_stock(stock, safe, kwargs, "inputs_embeds")
    if base.embeds_match_ids:
        assert_same(stock(**inputs).logits, actual.logits, "inputs_embeds vs input_ids")


@torch.no_grad()
def test_image_placeholders_without_pixel_values_behave_as_stock(pair, inputs):
    """The language model sees no image, so there is nothing to judge: whatever stock does, SafeLlava does."""
    stock, safe, _ = pair
    del inputs["pixel_values"]
    assert_forward_mirrors_stock(stock, safe, inputs, "image placeholders and no pixel_values", stock_must_run=False)


@torch.no_grad()
def test_logits_to_keep_and_position_ids(pair, inputs):
    stock, safe, _ = pair
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    last = inputs["input_ids"].shape[1] - 1
    for kwargs in ({"logits_to_keep": 1}, {"logits_to_keep": torch.tensor([0, 5, last])}, {"position_ids": position_ids}):
        expected, actual = stock(**inputs, **kwargs), safe(**inputs, **kwargs)
        assert_same(expected.logits, actual.logits, f"logits with {sorted(kwargs)}")
