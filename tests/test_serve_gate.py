"""Gate mode against a REAL `transformers serve` (started here, stopped by its pid) that serves the stock LLaVA saved
from the same weights as the head-only SafeLlava: allowed, hinted and safety-off answers equal in-process greedy
`generate`, refusals never reach the upstream, streams carry the verdict first, upstream failures are OpenAI errors,
and the verdict model holds no language model (loaded from each base's model class). The last tests drive
`safe-llava serve --upstream` with the `openai` client."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.serve_processes import free_port, save_stock_and_head_only, start_transformers_serve  # noqa: E402
from modeling_safe_llava import SafeLlavaForConditionalGeneration, SafeLlavaProcessor  # noqa: E402
from modeling_safe_llava.serving.backend import (  # noqa: E402
    BackendSettings,
    ChatRequest,
    ModerationInput,
    ServiceUnavailable,
    ServingError,
)
from modeling_safe_llava.serving.gate import HINT_APPENDED, build_gate_backend  # noqa: E402
from modeling_safe_llava.fileio import SafetensorsCheckpoint  # noqa: E402
from modeling_safe_llava.serving.verdict import SafetyVerdictModel, query_token_ids, verdict_memory_bytes  # noqa: E402

from conftest import random_image  # noqa: E402
from bases import BASES  # noqa: E402
from serving_live import assert_verdict_model_holds_the_models_weights, data_url, wait_for  # noqa: E402

pytestmark = pytest.mark.slow
QUESTION = "What is shown in this image?"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_stock_and_head_only(tmp_path_factory.mktemp("gate-models"))


@pytest.fixture(scope="module")
def upstream(folders, tmp_path_factory):
    server = start_transformers_serve(folders[0], tmp_path_factory.mktemp("logs") / "transformers-serve.log", threads=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(folders):
    """In-process greedy `generate` of the head-only SafeLlava folder: the answers the gate must reproduce."""
    model = SafeLlavaForConditionalGeneration.from_pretrained(folders[1]).eval()
    processor = SafeLlavaProcessor.from_pretrained(folders[1])

    def generate(image, safety_threshold, safety_actions=None):
        prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
            safety_threshold=safety_threshold, safety_actions=safety_actions,
        )  # fmt: skip
        answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assessment = getattr(out, "safety_assessment", None)  # absent when safety is off
        verdict = assessment.to_records()[0] if assessment is not None else None
        return answer, verdict

    return model, generate


@pytest.fixture(scope="module")
def gate(folders, upstream):
    settings = BackendSettings(
        model=str(folders[1]), served_model_name="safe", upstream=upstream.v1, upstream_model=str(folders[0]),
        batch_wait_ms=20.0,
    )  # fmt: skip
    backend = build_gate_backend(settings)
    loop = asyncio.new_event_loop()
    yield backend, loop
    loop.run_until_complete(backend.close())
    loop.close()


def _messages(image_part=None):
    return [{"role": "user", "content": [image_part or {"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _every(model, action):
    return {name: action for name in model.config.safety_type_labels[:-1]}


def _request(image, safety_threshold=0.0, safety_actions=None, **fields):
    body_messages = _messages({"type": "image_url", "image_url": {"url": data_url(image)}})
    body = {"model": "safe", "messages": body_messages, "max_tokens": NEW_TOKENS, "temperature": 0}
    body.update(safety_threshold=safety_threshold, safety_actions=safety_actions)
    return ChatRequest(
        model="safe", messages=_messages(), images=[image], max_new_tokens=NEW_TOKENS, temperature=0.0,
        safety_threshold=safety_threshold, safety_actions=safety_actions, body=body, **fields,
    )  # fmt: skip


def _run(gate, coroutine):
    return gate[1].run_until_complete(coroutine)


def _stream(gate, request):
    async def collect():
        return [event async for event in gate[0].stream(request)]

    return _run(gate, collect())


# -- what `generate` would answer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["allow", "hint"])
def test_forwarded_answers_equal_in_process_generate(gate, upstream, reference, action):
    model, generate = reference
    image = random_image(1)
    before = upstream.count_requests()
    result = _run(gate, gate[0].complete(_request(image, 0.0, _every(model, action))))
    expected, verdict = generate(image, 0.0, _every(model, action))
    assert result.safety["action"] == action == verdict["action"]
    assert result.safety["risk"] == pytest.approx(verdict["risk"], abs=1e-6)
    assert result.choices[0].text == expected
    assert upstream.count_requests() == before + 1


def test_the_hint_changes_the_answer_and_is_placed_token_for_token(gate, reference):
    model, generate = reference
    image = random_image(2)
    hinted = _run(gate, gate[0].complete(_request(image, 0.0, _every(model, "hint"))))
    allowed = _run(gate, gate[0].complete(_request(image, 0.0, _every(model, "allow"))))
    assert hinted.choices[0].text != allowed.choices[0].text  # the hint reached the upstream
    assert gate[0].hint_placement(_messages(), hinted.safety) == HINT_APPENDED
    body = gate[0].forward_body(_request(image, 0.0, _every(model, "hint")), hinted.safety)
    hint = model.safety_policy.hints[hinted.safety["category_name"]][hinted.safety["level"]]
    assert body["messages"][-1]["content"][-1]["text"] == QUESTION + hint


def test_refusal_is_answered_by_the_gate_without_the_upstream(gate, upstream, reference):
    model, generate = reference
    image = random_image(3)
    before = upstream.count_requests()
    result = _run(gate, gate[0].complete(_request(image, 0.0, _every(model, "refuse"), n=2)))
    expected, verdict = generate(image, 0.0, _every(model, "refuse"))
    assert verdict["action"] == result.safety["action"] == "refuse"
    assert [c.text for c in result.choices] == [expected, expected]
    assert {c.finish_reason for c in result.choices} == {"content_filter"}
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    events = _stream(gate, _request(image, 0.0, _every(model, "refuse"), stream=True, include_usage=True))
    assert events[0].kind == "verdict" and events[0].safety["action"] == "refuse"
    assert "".join(e.text for e in events if e.kind == "delta") == expected
    assert [e.finish_reason for e in events if e.kind == "finish"] == ["content_filter"]
    assert events[-1].kind == "usage"
    assert upstream.count_requests() == before  # neither call reached the upstream


def test_safety_off_and_unflagged_are_forwarded_unchanged(gate, reference):
    model, generate = reference
    image = random_image(4)
    request = _request(image, 1.0, None)
    result = _run(gate, gate[0].complete(request))
    assert result.safety == {"judged": False, "reason": result.safety["reason"]} and "safety is off" in result.safety["reason"]
    assert result.choices[0].text == generate(image, 1.0)[0]
    body = gate[0].forward_body(request, result.safety)
    assert body == {k: v for k, v in request.body.items() if k not in ("safety_threshold", "safety_actions")}


def test_stream_passes_through_with_the_verdict_first(gate, reference):
    model, generate = reference
    image = random_image(5)
    events = _stream(gate, _request(image, 0.0, _every(model, "hint"), stream=True, include_usage=True))
    kinds = [e.kind for e in events]
    assert kinds[0] == "verdict" and kinds.count("verdict") == 1 and "delta" in kinds
    assert events[0].safety["action"] == "hint"
    assert "".join(e.text for e in events if e.kind == "delta") == generate(image, 0.0, _every(model, "hint"))[0]
    assert [e.finish_reason for e in events if e.kind == "finish"] == ["length"]
    assert kinds[-1] == "usage" and events[-1].usage.completion_tokens > 0


def test_n_choices_from_an_upstream_that_ignores_n(gate, reference):
    model, generate = reference
    image = random_image(6)
    request = _request(image, 0.0, _every(model, "allow"), n=3)
    request.body["n"] = 3
    result = _run(gate, gate[0].complete(request))
    expected = generate(image, 0.0, _every(model, "allow"))[0]
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.text for c in result.choices] == [expected] * 3


def test_streamed_n_choices_from_an_upstream_that_ignores_n(gate, upstream, reference):
    model, generate = reference
    image = random_image(14)
    request = _request(image, 0.0, _every(model, "allow"), n=2, stream=True, include_usage=True)
    request.body["n"] = 2
    before = upstream.count_requests()
    events = _stream(gate, request)
    expected = generate(image, 0.0, _every(model, "allow"))[0]
    assert events[0].kind == "verdict"
    for index in (0, 1):
        assert "".join(e.text for e in events if e.kind == "delta" and e.index == index) == expected
    assert sorted(e.index for e in events if e.kind == "finish") == [0, 1]
    # transformers serve sends no usage in streams: the gate re-tokenizes the texts (an estimate)
    assert events[-1].kind == "usage" and events[-1].usage.completion_tokens >= 2
    assert upstream.count_requests() == before + 2


def test_concurrent_requests_share_one_verdict_call_and_keep_their_own(gate, reference):
    model, generate = reference
    images = [random_image(10 + i) for i in range(3)]
    actions = ["allow", "refuse", "hint"]
    calls = []
    gate[0].metrics = type("Recorder", (), {"observe_batch": lambda self, kind, size: calls.append((kind, size))})()

    async def together():
        requests = [_request(image, 0.0, _every(model, a)) for image, a in zip(images, actions)]
        return await asyncio.gather(*(gate[0].complete(r) for r in requests))

    try:
        results = _run(gate, together())
    finally:
        gate[0].metrics = None
    assert ("chat", 3) in calls
    for image, action, result in zip(images, actions, results):
        expected, verdict = generate(image, 0.0, _every(model, action))
        assert result.safety["action"] == action and result.choices[0].text == expected


def test_moderation_runs_the_verdict_model_only(gate, reference):
    model, _ = reference
    image = random_image(7)
    verdicts = _run(gate, gate[0].moderate([ModerationInput("", [image], 0.0), ModerationInput("just text", [])]))
    processor = gate[0].verdict_model.processor
    inputs = processor(images=image, text=processor.apply_chat_template(
        ModerationInput("", [image]).messages(), add_generation_prompt=True), return_tensors="pt")  # fmt: skip
    expected = model.assess_safety(**inputs, safety_threshold=0.0).to_records()[0]
    assert verdicts[0].safety["risk"] == pytest.approx(expected["risk"], abs=1e-6)
    assert verdicts[0].safety["action"] == expected["action"]
    assert verdicts[1].safety["judged"] is False


def test_fetched_images_reach_the_engine_as_the_judged_pixels(gate, upstream, reference):
    """An image the gate fetched (--allow-image-urls) is forwarded inline: the engine fetches nothing (here it could
    not: no network), so it cannot get other content than was judged."""
    model, generate = reference
    image = random_image(12)
    request = _request(image, 0.0, _every(model, "allow"))
    request.body["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": "https://images.invalid/a.png"}}
    forwarded = gate[0].forward_body(request, {"judged": True, "action": "allow"})
    url = forwarded["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert request.body["messages"][0]["content"][0]["image_url"]["url"] == "https://images.invalid/a.png"
    result = _run(gate, gate[0].complete(request))
    assert result.choices[0].text == generate(image, 0.0, _every(model, "allow"))[0]


def test_close_finishes_requests_in_flight_and_refuses_new_ones(folders, upstream, reference):
    model, generate = reference
    image = random_image(13)
    settings = BackendSettings(
        model=str(folders[1]), served_model_name="safe", upstream=upstream.v1, upstream_model=str(folders[0])
    )
    backend = build_gate_backend(settings)

    async def scenario():
        in_flight = asyncio.ensure_future(backend.complete(_request(image, 0.0, _every(model, "allow"))))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(backend.close())
        await asyncio.sleep(0)
        with pytest.raises(ServiceUnavailable):
            await backend.complete(_request(image, 0.0, _every(model, "allow")))
        assert not closing.done() or in_flight.done()
        result = await in_flight
        await closing
        return result

    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert result.choices[0].text == generate(image, 0.0, _every(model, "allow"))[0]


# -- failures --------------------------------------------------------------------------------------------------------


def test_upstream_failures_are_openai_errors(folders, upstream, reference):
    model, _ = reference
    image = random_image(8)

    def status_of(upstream_url, body_extra=None, timeout_s=30.0):
        settings = BackendSettings(
            model=str(folders[1]), served_model_name="safe", upstream=upstream_url, upstream_model=str(folders[0]),
            upstream_timeout_s=timeout_s,
        )  # fmt: skip
        backend = build_gate_backend(settings)
        request = _request(image, 0.0, _every(model, "allow"))
        request.body.update(body_extra or {})
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(ServingError) as caught:
                loop.run_until_complete(backend.complete(request))
        finally:
            loop.run_until_complete(backend.close())
            loop.close()
        error = caught.value.to_dict()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
        return caught.value.status, caught.value.retry_after

    assert status_of(f"http://127.0.0.1:{free_port()}/v1") == (503, 5)  # nothing listens there
    status, _ = status_of(upstream.v1, {"not_an_openai_field": 1})  # transformers serve rejects it: relayed
    assert status == 422
    with _silent_listener() as port:  # accepts, never answers
        assert status_of(f"http://127.0.0.1:{port}/v1", timeout_s=1.0)[0] == 504


def test_upstream_client_sends_the_key_and_maps_statuses():
    """The client alone, with a scripted transport: the key from --upstream-api-key-env is sent as a bearer token,
    and the engine's statuses map to OpenAI errors (5xx -> 502, 429/503 keep Retry-After, 4xx keep their message)."""
    import httpx2

    from modeling_safe_llava.serving.upstream import UpstreamClient

    seen = []
    script = {
        "500": (500, {}, b"Traceback (most recent call last): boom"),
        "429": (429, {"retry-after": "7"}, b'{"error": {"message": "slow down"}}'),
        "400": (400, {}, b'{"detail": "bad field"}'),
        "ok": (200, {}, b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}'),
    }

    def handler(request):
        seen.append(request)
        status, headers, content = script[json.loads(request.content)["case"]]
        return httpx2.Response(status, headers=headers, content=content)

    client = UpstreamClient("http://engine.invalid:8000", "stock", api_key="s3cret", transport=httpx2.MockTransport(handler))
    loop = asyncio.new_event_loop()
    try:
        answer = loop.run_until_complete(client.chat({"case": "ok", "model": "safe"}))
        errors = {}
        for case in ("500", "429", "400"):
            with pytest.raises(ServingError) as caught:
                loop.run_until_complete(client.chat({"case": case}))
            errors[case] = caught.value
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    assert answer["choices"][0]["message"]["content"] == "hi"
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert str(seen[0].url) == "http://engine.invalid:8000/v1/chat/completions"
    assert json.loads(seen[0].content)["model"] == "stock"  # --upstream-model, whatever the client named
    assert errors["500"].status == 502 and "HTTP 500" in errors["500"].message and "boom" not in errors["500"].message
    assert (errors["429"].status, errors["429"].retry_after) == (429, 7) and "slow down" in errors["429"].message
    assert errors["400"].status == 400 and "bad field" in errors["400"].message
    with pytest.raises(ValueError, match="http"):
        UpstreamClient("file:///etc/passwd", "stock")


class _silent_listener:
    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc_info):
        self.sock.close()


def test_gate_mode_refuses_llm_safety_tokens(tmp_path, tiny_safe_llava):
    model, processor = tiny_safe_llava
    assert model.config.num_llm_safety_tokens > 0
    model.config.safety_modules_trained = True
    model.save_pretrained(tmp_path / "with-llm-tokens")
    processor.save_pretrained(tmp_path / "with-llm-tokens")
    settings = BackendSettings(
        model=str(tmp_path / "with-llm-tokens"), served_model_name="m", upstream="http://127.0.0.1:9/v1", upstream_model="x"
    )
    with pytest.raises(ValueError, match="num_llm_safety_tokens=4") as caught:
        build_gate_backend(settings)
    assert "\n" not in str(caught.value)


def test_gate_mode_refuses_a_stock_checkpoint(folders):
    settings = BackendSettings(model=str(folders[0]), served_model_name="m", upstream="http://127.0.0.1:9/v1", upstream_model="x")
    with pytest.raises(ValueError, match="model_type 'llava'"):
        build_gate_backend(settings)


# -- the verdict model -----------------------------------------------------------------------------------------------


def test_verdict_model_loads_no_language_model_and_assesses_like_the_full_model(folders, reference):
    model, _ = reference
    verdict_model = SafetyVerdictModel.from_pretrained(str(folders[1]))
    inner = verdict_model.model.model
    assert all(p.device.type == "meta" for p in inner.language_model.layers.parameters())
    assert verdict_model.model.lm_head.weight.device.type == "meta"
    assert inner.multi_modal_projector.linear_1.weight.device.type == "meta"
    assert_verdict_model_holds_the_models_weights(verdict_model.model, model.state_dict())
    memory = verdict_memory_bytes(verdict_model.model)
    full = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    table = model.get_input_embeddings().weight
    kept_rows = verdict_model.model.get_input_embeddings().weight.shape[0]
    assert memory["embed_tokens"] == kept_rows * table.shape[1] * table.element_size() and kept_rows == 2
    assert memory["total"] + memory["not_loaded"] == full - (table.shape[0] - kept_rows) * table.shape[1] * table.element_size()
    assert memory["not_loaded"] > 0 and memory["vision_tower"] > 0


@pytest.mark.parametrize("base_name", sorted(BASES))
def test_each_bases_model_class_loads_its_verdict_model(base_name, tmp_path):
    """`from_verdict_checkpoint` on the model class of every base (tests/bases.py): the language model stays on meta,
    every tensor held is the full model's, and `assess_safety` with one rule per row gives the full model's verdicts."""
    base = BASES[base_name]
    _, model, processor = base.build_pair()
    model.save_pretrained(tmp_path)
    config = base.safe_model_class.config_class.from_pretrained(tmp_path)
    verdict_model = base.safe_model_class.from_verdict_checkpoint(
        SafetensorsCheckpoint(str(tmp_path)), config, embedding_rows=query_token_ids(processor, config)
    )
    assert all(p.device.type == "meta" for p in verdict_model.model.language_model.layers.parameters())
    assert verdict_model.lm_head.weight.device.type == "meta"
    assert_verdict_model_holds_the_models_weights(verdict_model, model.state_dict())
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    images = [base.random_image(i) for i in range(2)]
    inputs = processor(images=images, text=[prompt] * 2, padding=True, return_tensors="pt")
    rules = dict(safety_threshold=[0.0, {"Privacy": 0.0}], safety_actions=[None, _every(model, "refuse")])
    expected = model.assess_safety(**inputs, **rules, allow_untrained_safety=True).to_records()
    assert verdict_model.assess_safety(**inputs, **rules, allow_untrained_safety=True).to_records() == expected
    with pytest.raises(ValueError, match="headless model"):
        type(model.model).from_verdict_checkpoint(SafetensorsCheckpoint(str(tmp_path)), config)


def test_verdict_model_at_the_7b_shape_holds_about_a_tenth_of_the_model():
    """The README's number: at LLaVA-1.5-7B's shape (bf16), the gate's weights are the vision tower, the safety
    module and the embedding table, computed on the meta device."""
    from benchmarks.serve import gate_memory

    memory = gate_memory("llava")
    assert 0.5e9 < memory["gate_bytes"] < 2.5e9
    assert memory["gate_bytes"] < 0.2 * memory["full_bytes"]


# -- through HTTP: safe-llava serve --upstream, with the openai client ---------------------------------------------


README_SAFE, README_STOCK, README_UPSTREAM = "org/safe-llava-7b-head-only", "llava-hf/llava-1.5-7b-hf", "http://127.0.0.1:8000/v1"


def _readme_gate_section() -> str:
    readme = (REPO_ROOT / "docs" / "gate_mode.md").read_text()  # README's gate section moved here (issue 25)
    start = readme.index("## Gate mode")
    ends = [readme.find(heading, start + 1) for heading in ("\n## ", "\n### ")]
    return readme[start : min([end for end in ends if end > 0] or [len(readme)])]


@pytest.fixture(scope="module")
def live_gate(folders, upstream, tmp_path_factory):
    """README's gate command, run as written but for the names: the tiny folders, a free port, the test's engine."""
    pytest.importorskip("modeling_safe_llava.serving.app", reason="the HTTP layer (serving/app.py) is serve-core's")
    import shlex

    from benchmarks.serve_processes import start_server

    line = next(l for l in _readme_gate_section().splitlines() if l.startswith("safe-llava serve"))
    port = free_port()
    names = {README_SAFE: str(folders[1]), README_STOCK: str(folders[0]), README_UPSTREAM: upstream.v1, "9000": str(port)}
    command = [sys.executable, "-m", "modeling_safe_llava"] + [names.get(t, t) for t in shlex.split(line)[1:]]
    server = start_server(command, port, tmp_path_factory.mktemp("logs") / "gate.log", threads=1)
    yield server
    assert server.stop() == 0


def test_readme_gate_snippet_runs(live_gate, reference, capsys):
    model, generate = reference
    snippet = re.findall(r"```python\n(.*?)```", _readme_gate_section(), flags=re.S)[0]
    image = random_image(11)
    snippet = snippet.replace("http://127.0.0.1:9000/v1", live_gate.v1).replace(README_SAFE, "safe")
    snippet = snippet.replace("data:image/png;base64,...", data_url(image)).replace("max_tokens=64", f"max_tokens={NEW_TOKENS}")
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    action, finish_reason, content = capsys.readouterr().out.rstrip("\n").split(" ", 2)
    expected, verdict = generate(image, 0.5)
    assert action == verdict["action"]
    assert (finish_reason == "content_filter") == (action == "refuse")
    assert content == expected


def test_live_gate_chat_stream_and_moderation(live_gate, upstream, reference):
    import openai

    model, generate = reference
    client = openai.OpenAI(base_url=live_gate.v1, api_key="unused", max_retries=0)
    image = random_image(9)
    messages = _messages({"type": "image_url", "image_url": {"url": data_url(image)}})
    before = upstream.count_requests()
    for action in ("allow", "hint", "refuse"):
        extra = {"safety_threshold": 0.0, "safety_actions": _every(model, action)}
        answer = client.chat.completions.create(
            model="safe", messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
        )
        expected, verdict = generate(image, 0.0, _every(model, action))
        assert answer.model_extra["safety"]["action"] == action
        assert answer.choices[0].message.content == expected
        assert (answer.choices[0].finish_reason == "content_filter") == (action == "refuse")
    assert upstream.count_requests() == before + 2  # allow and hint; never the refusal
    chunks = list(client.chat.completions.create(
        model="safe", messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        extra_body={"safety_threshold": 0.0, "safety_actions": _every(model, "allow")},
    ))  # fmt: skip
    assert chunks[0].model_extra["safety"]["action"] == "allow" and not chunks[0].choices[0].delta.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == generate(image, 0.0, _every(model, "allow"))[0]
    moderation = client.moderations.create(
        model="safe", input=[{"type": "image_url", "image_url": {"url": data_url(image)}}]
    )
    assert set(moderation.results[0].category_scores.model_dump()) >= set(model.config.safety_type_labels[:-1])


def test_cli_gate_mode_on_a_model_with_llm_safety_tokens_exits_2(tmp_path, tiny_safe_llava):
    pytest.importorskip("modeling_safe_llava.serving.app", reason="the serve command (tools/cli.py) is serve-core's")
    model, processor = tiny_safe_llava
    model.config.safety_modules_trained = True
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    command = [sys.executable, "-m", "modeling_safe_llava", "serve", "--model", str(tmp_path / "m"), "--port",
               str(free_port()), "--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "x"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))
    assert result.returncode == 2
    assert "num_llm_safety_tokens" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.dumps(result.stderr).count("Traceback") == 0


def _upstream_connections(gate_pid: int, upstream_url: str) -> int:
    """The gate process's open (ESTABLISHED) connections to the upstream's port."""
    import psutil

    port = int(upstream_url.rsplit(":", 1)[1])
    connections = psutil.Process(gate_pid).net_connections(kind="tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def _gate_metric(gate, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(gate.url + "/metrics", timeout=10) as response:
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", response.read().decode(), flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_leaves_a_gate_stream_closes_the_engines_request(folders, upstream, tmp_path):
    """A fresh gate (no pooled connection to the engine): while a long answer streams, it holds one connection to the
    engine; once the client leaves, the gate counts the cancellation and closes that connection (`transformers serve`
    aborts a generation whose client disconnects), and the engine answers the next request."""
    import openai

    from benchmarks.serve_processes import start_gate

    gate = start_gate(folders[1], upstream, str(folders[0]), tmp_path / "gate.log", threads=1)
    try:
        client = openai.OpenAI(base_url=gate.v1, api_key="unused", max_retries=0, timeout=120.0)
        messages = _messages({"type": "image_url", "image_url": {"url": data_url(random_image(1))}})
        allow = {"safety_threshold": 1.0}  # nothing judged: forwarded unchanged
        stream = client.chat.completions.create(
            model="safe", messages=messages, max_tokens=400, temperature=0, stream=True, extra_body=allow
        )
        chunks = iter(stream)
        next(chunks), next(chunks)  # the verdict, then the engine's first chunk
        assert _upstream_connections(gate.process.pid, upstream.url) == 1
        stream.close()
        cancelled = 'safe_llava_cancelled_requests_total{kind="stream",stage="upstream"}'
        wait_for(lambda: _gate_metric(gate, cancelled) == 1, "the gate counts the cancellation")
        wait_for(lambda: _upstream_connections(gate.process.pid, upstream.url) == 0, "the engine's request closes")
        answer = client.chat.completions.create(
            model="safe", messages=messages, max_tokens=1, temperature=0, extra_body=allow
        )
        assert answer.choices[0].message.content is not None
    finally:
        assert gate.stop() == 0


def test_a_client_that_leaves_a_plain_gate_request_closes_the_engines_request(folders, upstream, tmp_path):
    """The same for a request without streaming, sent on a raw connection that closes while the engine generates."""
    import http.client

    from benchmarks.serve_processes import start_gate

    gate = start_gate(folders[1], upstream, str(folders[0]), tmp_path / "gate.log", threads=1)
    try:
        messages = _messages({"type": "image_url", "image_url": {"url": data_url(random_image(2))}})
        body = {"model": "safe", "messages": messages, "max_tokens": 400, "temperature": 0, "safety_threshold": 1.0}
        port = int(gate.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        wait_for(lambda: _upstream_connections(gate.process.pid, upstream.url) == 1, "the engine's request opens")
        connection.close()
        cancelled = 'safe_llava_cancelled_requests_total{kind="chat",stage="upstream"}'
        wait_for(lambda: _gate_metric(gate, cancelled) == 1, "the gate counts the cancellation")
        wait_for(lambda: _upstream_connections(gate.process.pid, upstream.url) == 0, "the engine's request closes")
    finally:
        assert gate.stop() == 0
