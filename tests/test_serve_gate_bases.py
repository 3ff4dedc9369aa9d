"""Gate mode for every base: LLaVA-NeXT and Gemma 3 head-only SafeLlavas gate a REAL `transformers serve` (started
here, stopped by its pid) that serves the stock model saved from the same tiny weights (`tests/bases.py`). Allowed and
hinted answers equal in-process greedy `generate`, refusals never reach the engine, the verdict model's verdict
(LLaVA-NeXT: every anyres crop of images of different sizes in one batch) equals the full model's, moderation runs the
verdict model, the errors name the base's stock model, and one gate's weights at each base's 7B-class preset are pinned.
LLaVA-1.5's gate is tested in `tests/test_serve_gate.py`."""

import asyncio
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bases import BASES  # noqa: E402
from benchmarks.serve_processes import start_transformers_serve  # noqa: E402
from modeling_safe_llava.bases import load_safe_model  # noqa: E402
from modeling_safe_llava.chat_template_safe_llava import rendered_hint  # noqa: E402
from modeling_safe_llava.serving.backend import BackendSettings, ChatRequest, ModerationInput  # noqa: E402
from modeling_safe_llava.serving.gate import HINT_APPENDED, build_gate_backend  # noqa: E402
from serving_live import assert_verdict_model_holds_the_models_weights, data_url  # noqa: E402
from modeling_safe_llava.serving.verdict import VerdictRow  # noqa: E402

pytestmark = pytest.mark.slow
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8
GATED_BASES = ("llava_next", "gemma3")


@pytest.fixture(scope="module", params=GATED_BASES)
def setup(request, tmp_path_factory):
    """One base at a time: its stock and head-only folders (same weights), `transformers serve` on the stock one, the
    gate in front of it, and the full SafeLlava loaded from the head-only folder (the reference)."""
    base = BASES[request.param]
    folder = tmp_path_factory.mktemp(f"gate-{base.name}")
    stock, safe, processor = base.build_pair(num_llm_safety_tokens=0)
    safe.config.safety_modules_trained = True
    stock.save_pretrained(folder / "stock")
    base.build_stock(0)[1].save_pretrained(folder / "stock")  # the stock processor (same seed, same tokenizer)
    safe.save_pretrained(folder / "safe")
    processor.save_pretrained(folder / "safe")
    upstream = start_transformers_serve(folder / "stock", folder / "transformers-serve.log", threads=1)
    settings = BackendSettings(
        model=str(folder / "safe"), served_model_name="safe", upstream=upstream.v1,
        upstream_model=str(folder / "stock"), batch_wait_ms=20.0,
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    gate = build_gate_backend(settings)
    yield {"base": base, "folder": folder, "upstream": upstream, "gate": gate, "loop": loop,
           "model": load_safe_model(str(folder / "safe")).eval(), "processor": processor}  # fmt: skip
    loop.run_until_complete(gate.close())
    loop.close()
    upstream.stop()


def _messages(image_part=None):
    return [{"role": "user", "content": [image_part or {"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _every(model, action):
    return {name: action for name in model.config.safety_type_labels[:-1]}


def _request(image, safety_actions, **fields):
    body = {"model": "safe", "messages": _messages({"type": "image_url", "image_url": {"url": data_url(image)}}),
            "max_tokens": NEW_TOKENS, "temperature": 0, "safety_threshold": 0.0, "safety_actions": safety_actions}  # fmt: skip
    return ChatRequest(
        model="safe", messages=_messages(), images=[image], max_new_tokens=NEW_TOKENS, temperature=0.0,
        safety_threshold=0.0, safety_actions=safety_actions, body=body, **fields,
    )  # fmt: skip


def _generate(setup, image, safety_actions):
    """In-process greedy `generate` of the full head-only SafeLlava: `(answer, verdict record)`."""
    model, processor = setup["model"], setup["processor"]
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    out = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, safety_threshold=0.0,
        safety_actions=safety_actions,
    )  # fmt: skip
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer, out.safety_assessment.to_records()[0]


def _run(setup, coroutine):
    return setup["loop"].run_until_complete(coroutine)


def test_allowed_and_hinted_requests_are_forwarded_and_answer_as_generate(setup):
    gate, upstream, model = setup["gate"], setup["upstream"], setup["model"]
    image = setup["base"].random_image(1)
    answers = {}
    for action in ("allow", "hint"):
        before = upstream.count_requests()
        result = _run(setup, gate.complete(_request(image, _every(model, action))))
        expected, verdict = _generate(setup, image, _every(model, action))
        assert result.safety["action"] == verdict["action"] == action
        assert result.safety["risk"] == pytest.approx(verdict["risk"], abs=1e-6)
        assert result.choices[0].text == expected
        assert upstream.count_requests() == before + 1
        answers[action] = result
    assert answers["hint"].choices[0].text != answers["allow"].choices[0].text  # the hint reached the engine
    safety = answers["hint"].safety
    assert gate.hint_placement(_messages(), safety) == HINT_APPENDED  # generate's exact tokens, checked by the gate
    hint = model.safety_policy.hints[safety["category_name"]][safety["level"]]
    body = gate.forward_body(_request(image, _every(model, "hint")), safety)
    assert body["messages"][-1]["content"][-1]["text"] == QUESTION + hint
    # At the end of the user's turn, as the template renders it (Gemma 3's trims the hint's trailing newline), right
    # before the marker `generate` inserts it at (Gemma 3: `<end_of_turn>`, then the model turn).
    processor = setup["processor"]
    prompt = processor.apply_chat_template(body["messages"], add_generation_prompt=True)
    marker = processor.tokenizer.decode(model.config.safety_text_token_ids["assistant_prefix"])
    assert prompt.endswith(QUESTION + rendered_hint(processor, hint) + marker)


def test_refusal_is_answered_without_the_engine(setup):
    gate, upstream, model = setup["gate"], setup["upstream"], setup["model"]
    image = setup["base"].random_image(2)
    before = upstream.count_requests()
    result = _run(setup, gate.complete(_request(image, _every(model, "refuse"), n=2)))
    expected, verdict = _generate(setup, image, _every(model, "refuse"))
    assert result.safety["action"] == verdict["action"] == "refuse"
    assert [c.text for c in result.choices] == [expected, expected] and expected
    assert {c.finish_reason for c in result.choices} == {"content_filter"}
    assert upstream.count_requests() == before


def test_verdict_batch_equals_the_full_model_and_holds_no_language_model(setup):
    """Three images of different sizes judged in one call (LLaVA-NeXT: 2, 4 and 2 anyres crops besides the base
    image) give each row the full model's `generate` verdict; the verdict model's language model and projector stay on
    meta."""
    verdict_model, model, base = setup["gate"].verdict_model, setup["model"], setup["base"]
    images = [base.random_image(i) for i in range(3)]
    results = verdict_model.assess([VerdictRow(_messages(), [image], 0.0, _every(model, "allow")) for image in images])
    for image, result in zip(images, results):
        _, verdict = _generate(setup, image, _every(model, "allow"))
        assert result.error is None
        assert result.safety["risk"] == pytest.approx(verdict["risk"], abs=1e-6)
        assert result.safety["level_probs"] == pytest.approx(verdict["level_probs"], abs=1e-6)
    inner = verdict_model.model.model
    assert all(p.device.type == "meta" for p in inner.language_model.layers.parameters())
    assert all(p.device.type == "meta" for p in inner.multi_modal_projector.parameters())
    assert_verdict_model_holds_the_models_weights(verdict_model.model, model.state_dict())
    lengths = [r.prompt_tokens for r in results]
    assert lengths == [_prompt_length(setup, image) for image in images]  # images expanded as the engine reads them


def _prompt_length(setup, image) -> int:
    processor = setup["processor"]
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    return int(processor(images=[image], text=prompt, return_tensors="pt")["input_ids"].shape[1])


def test_moderation_runs_the_verdict_model(setup):
    gate, model, processor = setup["gate"], setup["model"], setup["processor"]
    image = setup["base"].random_image(4)
    verdicts = _run(setup, gate.moderate([ModerationInput("", [image], 0.0), ModerationInput("just text", [])]))
    prompt = processor.apply_chat_template(ModerationInput("", [image]).messages(), add_generation_prompt=True)
    expected = model.assess_safety(**processor(images=[image], text=prompt, return_tensors="pt"), safety_threshold=0.0)
    assert verdicts[0].safety["risk"] == pytest.approx(expected.to_records()[0]["risk"], abs=1e-6)
    assert verdicts[0].safety["action"] == expected.to_records()[0]["action"]
    assert verdicts[1].safety["judged"] is False


def test_errors_name_the_bases_stock_model(setup, tmp_path):
    base, folder = setup["base"], setup["folder"]
    stock_name = base.safe_model_class.stock_class.__name__
    settings = dict(served_model_name="m", upstream="http://127.0.0.1:9/v1", upstream_model="x")
    with pytest.raises(ValueError, match=f"stock {stock_name} checkpoint") as caught:
        build_gate_backend(BackendSettings(model=str(folder / "stock"), **settings))
    assert "\n" not in str(caught.value)
    _, with_tokens, processor = base.build_pair(num_llm_safety_tokens=2)
    with_tokens.config.safety_modules_trained = True
    with_tokens.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"num_llm_safety_tokens=2: .* stock {stock_name} lacks") as caught:
        build_gate_backend(BackendSettings(model=str(tmp_path / "m"), **settings))
    assert "\n" not in str(caught.value)


def test_the_verdict_model_keeps_only_the_embedding_rows_its_verdict_reads(setup):
    """Of the embedding table, the verdict model holds the rows of BOS (the first real token of every prompt the chat
    template builds: the head's query) and of the image placeholder; the verdicts above equal the full model's. A query on
    another token fails loudly, never with a wrong embedding."""
    verdict_model, processor = setup["gate"].verdict_model, setup["processor"]
    embedding = verdict_model.model.get_input_embeddings()
    kept = sorted({processor.tokenizer.bos_token_id, verdict_model.config.image_token_id})
    assert embedding.kept_token_ids.tolist() == kept and embedding.weight.shape[0] == 2
    other = next(token for token in range(10) if token not in kept)
    with pytest.raises(ValueError, match="holds the input embeddings of tokens"):
        embedding(torch.tensor([[other]]))


@pytest.mark.parametrize(
    "base_name, gate_gb, full_gb",
    [("llava", (0.8, 0.85), (14.0, 14.6)), ("llava-next", (0.8, 0.85), (15.0, 15.7)), ("gemma3", (0.93, 0.97), (8.5, 8.9)),
     ("qwen2_5_vl", (1.54, 1.59), (16.6, 17.0))],
)
def test_gate_memory_at_each_bases_7b_class_preset(base_name, gate_gb, full_gb):
    """docs/bases.md's numbers (bf16, counted on meta): LLaVA-1.5-7B and LLaVA-NeXT-Mistral-7B gates hold ~0.82 GB (6 %
    of the model); Gemma 3 4B's ~0.95 GB (11 %; under 1 GiB, the bounds say so): of the embedding table (1.25 GiB at
    Gemma 3 4B's 262k tokens) a gate keeps the two rows its verdict reads; Qwen2.5-VL-7B's ~1.56 GB (9 %), most of it
    its 670M-parameter vision tower."""
    from benchmarks.serve import gate_memory

    memory = gate_memory(base_name)
    assert gate_gb[0] < memory["gate_bytes"] / 1e9 < gate_gb[1]
    assert full_gb[0] < memory["full_bytes"] / 1e9 < full_gb[1]
    assert memory["gate_bytes"] == memory["vision_tower"] + memory["safety_module"] + memory["embed_tokens"]
