"""`safe-llava serve` as a client sees it: a live server subprocess driven by the official `openai` client.

One server (module scope) serves a tiny SafeLlava saved with `safety_modules_trained=True`. Its answers are compared
with in-process `model.generate` / `model.assess_safety` on the same folder and inputs. The tiny model's head is
near uniform (risk about 0.75), so each action is forced: `safety_actions` all `allow`, or all `hint` / all `refuse`
with `safety_threshold=0`.
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from PIL import Image
from serving_live import REPO_ROOT, HalfSentRequest, LiveServer, data_url, image_message, metric, save_tiny_server_model, wait_for

from conftest import random_image
from modeling_safe_llava.modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.pipeline_safe_llava import NOT_JUDGED_NO_IMAGE
from modeling_safe_llava.processing_safe_llava import SafeLlavaProcessor


API_KEY = "test-key-0123456789"
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_server_model(tmp_path_factory.mktemp("serve") / "tiny-safe-llava")


@pytest.fixture(scope="module")
def server(folder):
    args = ["--model", folder, "--max-batch-size", "8", "--batch-wait-ms", "3000", "--max-tokens-limit", "64",
            "--max-images", "2", "--max-request-mb", "1", "--max-image-pixels", "1000000"]  # fmt: skip
    with LiveServer(args, env={"SAFE_LLAVA_API_KEY": API_KEY}) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client(api_key=API_KEY)


@pytest.fixture(scope="module")
def reference(folder):
    """The same folder in this process."""
    model = SafeLlavaForConditionalGeneration.from_pretrained(folder).eval()
    return model, SafeLlavaProcessor.from_pretrained(folder)


def in_process(reference, image, max_new_tokens=12, **safety):
    """(answer text, safety record) of in-process `generate`, greedy, for one image and QUESTION."""
    model, processor = reference
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **safety)
    text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, out.safety_assessment.to_records()[0], int(inputs["attention_mask"].sum())


def all_types(reference, action):
    return {name: action for name in reference[0].config.risky_type_labels}


def chat(client, server, image, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    extra = {k: kwargs.pop(k) for k in ("safety_threshold", "safety_actions") if k in kwargs}
    return client.chat.completions.create(model=server.model, messages=image_message(image, QUESTION), extra_body=extra or None, **kwargs)


def safety_of(response) -> dict:
    return response.model_extra["safety"]


# -- models, health, auth -------------------------------------------------------------------------------------------


def test_models_lists_the_folder_name_and_health_is_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-safe-llava"]
    assert client.models.retrieve("tiny-safe-llava").id == "tiny-safe-llava"
    status, body = server.get("/health")
    assert status == 200 and body["status"] == "ready" and body["model"] == "tiny-safe-llava" and body["mode"] == "local"


def test_a_wrong_or_missing_key_gets_401_in_openais_error_schema(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.openai_client(api_key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, body = server.get("/v1/models")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


# -- chat: allow, hint, refuse --------------------------------------------------------------------------------------


def test_an_allowed_greedy_answer_equals_in_process_generate(server, client, reference):
    image = random_image(1, 32)
    response = chat(client, server, image, safety_actions=all_types(reference, "allow"))
    text, record, prompt_tokens = in_process(reference, image, safety_actions=all_types(reference, "allow"))
    safety = safety_of(response)
    assert safety["judged"] and safety["action"] == "allow" and safety["risk"] == pytest.approx(record["risk"], abs=1e-5)
    assert response.choices[0].message.content == text and text
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_tokens and 0 < response.usage.completion_tokens <= 12


def test_a_hinted_answer_equals_in_process_generate_with_the_hint(server, client, reference):
    image = random_image(2, 32)
    hint = {"safety_threshold": 0.0, "safety_actions": all_types(reference, "hint")}
    response = chat(client, server, image, **hint)
    text, record, _ = in_process(reference, image, **hint)
    assert record["action"] == "hint" and safety_of(response)["action"] == "hint"
    assert response.choices[0].message.content == text
    allowed, _, _ = in_process(reference, image, safety_actions=all_types(reference, "allow"))
    assert text != allowed  # the hint changed the answer: it really was inserted


def test_an_image_without_a_question_can_be_hinted(server, client, reference):
    hint = {"safety_threshold": 0.0, "safety_actions": all_types(reference, "hint")}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(10, 32))}}]}]
    response = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0, extra_body=hint)
    assert safety_of(response)["action"] == "hint" and response.choices[0].finish_reason in ("stop", "length")


def test_a_refused_request_answers_the_configured_refusal_with_content_filter(server, client, reference):
    image = random_image(3, 32)
    response = chat(client, server, image, max_tokens=64, safety_threshold=0.0, safety_actions=all_types(reference, "refuse"))
    safety = safety_of(response)
    refusal = reference[0].config.safety_refusals[safety["category_name"]]
    assert safety["flagged"] and safety["action"] == "refuse"
    assert response.choices[0].message.content == refusal and response.choices[0].finish_reason == "content_filter"
    assert response.usage.completion_tokens > 0


def test_a_text_only_request_is_answered_and_says_nothing_was_judged(server, client):
    response = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert safety_of(response) == {"judged": False, "reason": NOT_JUDGED_NO_IMAGE}
    assert response.choices[0].finish_reason in ("stop", "length")


def test_safety_threshold_one_turns_safety_off(server, client):
    response = chat(client, server, random_image(4, 32), safety_threshold=1.0)
    assert safety_of(response)["judged"] is False


# -- streaming ------------------------------------------------------------------------------------------------------


def test_a_stream_sends_the_verdict_first_then_the_same_text(server, client, reference):
    image = random_image(5, 32)
    plain = chat(client, server, image)
    chunks = list(chat(client, server, image, stream=True, stream_options={"include_usage": True}))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert first.model_extra["safety"] == safety_of(plain)
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_streamed_refusal_is_the_refusal_with_content_filter(server, client, reference):
    chunks = list(chat(client, server, random_image(6, 32), max_tokens=64, stream=True, safety_threshold=0.0,
                       safety_actions=all_types(reference, "refuse")))  # fmt: skip
    safety = chunks[0].model_extra["safety"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)
    assert safety["action"] == "refuse" and text == reference[0].config.safety_refusals[safety["category_name"]]
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_stop_sequences_end_the_text_before_them(server, client):
    image = random_image(7, 32)
    full = chat(client, server, image).choices[0].message.content
    stop = full[3:5]
    assert stop and stop in full
    cut = chat(client, server, image, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, server, image, stop=[stop], stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


# -- n > 1 ----------------------------------------------------------------------------------------------------------


def test_n_choices_share_one_verdict(server, client, reference):
    image, allow = random_image(8, 32), all_types(reference, "allow")
    greedy = chat(client, server, image, n=3, safety_actions=allow)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len({c.message.content for c in greedy.choices}) == 1
    sampled = chat(client, server, image, n=3, temperature=1.0, seed=7, safety_actions=allow)
    again = chat(client, server, image, n=3, temperature=1.0, seed=7, safety_actions=allow)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1  # each row drew its own sample
    assert safety_of(sampled)["risk"] == pytest.approx(safety_of(greedy)["risk"])
    chunks = list(chat(client, server, image, n=2, stream=True))
    assert chunks[0].model_extra["safety"]["risk"] == pytest.approx(safety_of(greedy)["risk"])
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]


# -- moderations ----------------------------------------------------------------------------------------------------


def test_moderations_judge_images_with_the_models_risky_types(server, client, reference):
    image = random_image(9, 32)
    parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    result = client.moderations.create(model=server.model, input=parts).results[0]
    _, record, _ = in_process(reference, image, max_new_tokens=1)
    safety = result.model_extra["safety"]
    assert safety["risk"] == pytest.approx(record["risk"], abs=1e-5) and result.flagged == record["flagged"]
    risky = reference[0].config.risky_type_labels
    scores = {k: v for k, v in result.category_scores.model_dump().items() if k in risky}
    assert set(scores) == set(risky) and result.categories.model_dump()[record["category_name"]] is True
    raw = server.request("POST", "/v1/moderations", {"input": ["just text", "more"]}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert raw[0] == 200 and [r["safety"]["judged"] for r in raw[1]["results"]] == [False, False]


def test_moderation_batches_concurrent_requests(server, client):
    before = batch_histogram(server, "moderation")
    parts = [[{"type": "image_url", "image_url": {"url": data_url(random_image(20 + i, 32))}}] for i in range(4)]
    arriving = HalfSentRequest(server.port, "/v1/moderations", {"model": server.model, "input": parts[0]}, {"Authorization": f"Bearer {API_KEY}"})
    wait_for(lambda: metric(server, "safe_llava_arriving_requests") == 1, "the server reads the half-sent request")
    with ThreadPoolExecutor(3) as pool:
        results = pool.map(lambda p: client.moderations.create(model=server.model, input=p), parts[1:])
        wait_for(lambda: metric(server, "safe_llava_queue_depth") == 3, "the three wait for the arriving one")
        response = arriving.finish()
        assert response.status == 200 and len(list(results)) == 3
        arriving.close()
    after = batch_histogram(server, "moderation")
    assert after["count"] - before["count"] < 4  # fewer model calls than requests


# -- concurrency ----------------------------------------------------------------------------------------------------


def batch_histogram(server, kind: str) -> dict:
    text = server.get("/metrics")[1]
    count = re.search(rf'safe_llava_batch_size_count{{kind="{kind}"}} ([0-9.e+]+)', text)
    total = re.search(rf'safe_llava_batch_size_sum{{kind="{kind}"}} ([0-9.e+]+)', text)
    return {"count": float(count.group(1)) if count else 0.0, "sum": float(total.group(1)) if total else 0.0}


def test_concurrent_requests_are_batched_and_equal_single_ones(server, client, reference):
    images = [random_image(30 + i, 32) for i in range(6)]
    allow = all_types(reference, "allow")
    singles = [chat(client, server, image, safety_actions=allow).choices[0].message.content for image in images]
    before = batch_histogram(server, "chat")
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda image: chat(client, server, image, safety_actions=allow), images))
    after = batch_histogram(server, "chat")
    assert [r.choices[0].message.content for r in together] == singles
    calls, rows = after["count"] - before["count"], after["sum"] - before["sum"]
    assert rows == 6 and calls < 6  # six rows in fewer model calls: they were batched


def test_concurrent_streams_are_batched_and_equal_plain_answers(server, client, reference):
    images = [random_image(70 + i, 32) for i in range(5)]
    allow = all_types(reference, "allow")
    plain = [chat(client, server, image, safety_actions=allow, n=2) for image in images]

    def streamed(image):
        chunks = list(chat(client, server, image, safety_actions=allow, n=2, stream=True, stream_options={"include_usage": True}))
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(2)]
        return chunks, texts

    before = batch_histogram(server, "stream")
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(streamed, images))
    after = batch_histogram(server, "stream")
    for (chunks, texts), answer in zip(results, plain):
        assert chunks[0].model_extra["safety"]["action"] == "allow" and not chunks[0].choices[0].delta.content
        assert texts == [choice.message.content for choice in answer.choices]
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
        deltas = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        assert deltas >= answer.usage.completion_tokens // 3  # token by token, not word by word
        finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
        assert finishes == {choice.index: choice.finish_reason for choice in answer.choices}
    assert after["sum"] - before["sum"] == 5 and after["count"] - before["count"] < 5  # fewer model calls than streams


def test_health_answers_while_the_model_generates(server, client, reference):
    allow = all_types(reference, "allow")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: chat(client, server, random_image(40, 32), max_tokens=64, n=8, safety_actions=allow))
        answered_during_generation = []
        while not pending.done():
            start = time.monotonic()
            status, _ = server.get("/health")
            if not pending.done():
                answered_during_generation.append((status, time.monotonic() - start))
            time.sleep(0.05)
        assert pending.result().choices
    assert answered_during_generation and all(status == 200 and seconds < 1.0 for status, seconds in answered_during_generation)


CHAT_METRICS = {
    "requests": r'safe_llava_requests_total{endpoint="/v1/chat/completions",status="200"}',
    "refusals": r'safe_llava_verdicts_total{action="refuse",category="[^"]+",endpoint="/v1/chat/completions"}',
    "latencies": r'safe_llava_request_latency_seconds_count{endpoint="/v1/chat/completions"}',
}


def chat_metrics(server) -> dict:
    """The `CHAT_METRICS` totals now (a sample absent yet counts 0)."""
    text = server.get("/metrics")[1]
    return {name: sum(float(v) for v in re.findall(pattern + r" (\S+)", text)) for name, pattern in CHAT_METRICS.items()}


def test_metrics_count_requests_verdicts_and_latency(server, client, reference):
    before = chat_metrics(server)
    chat(client, server, random_image(90, 32), max_tokens=64, safety_threshold=0.0, safety_actions=all_types(reference, "refuse"))
    expected = {name: value + 1 for name, value in before.items()}
    deadline = time.monotonic() + 10  # the request is counted just after its last byte is sent
    while (after := chat_metrics(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == expected
    text = server.get("/metrics")[1]
    assert "safe_llava_request_latency_seconds_bucket" in text and "safe_llava_time_to_first_token_seconds_count" in text
    assert "safe_llava_queue_depth 0.0" in text


# -- hostile requests -----------------------------------------------------------------------------------------------


def hostile_requests(model: str) -> dict:
    """name -> (body bytes or dict, extra headers, expected status, fragment of the message or the code)."""
    def body(**fields):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}

    def with_image(url):
        return body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    huge = data_url(Image.new("RGB", (1200, 1200), "white"))  # 1.44 M pixels > the server's 1 M cap, a few kB
    return {
        "malformed-json": (b'{"model": ', {}, 400, "invalid_json"),
        "not-utf8": (b"\xff\xfe{}", {}, 400, "invalid_json"),
        "nan": (b'{"model": "x", "temperature": NaN}', {}, 400, "invalid_json"),
        "body-not-object": ([1, 2], {}, 422, "invalid_type"),
        "wrong-type": (body(temperature="hot"), {}, 422, "invalid_type"),
        "missing-messages": ({"model": model}, {}, 422, "missing_field"),
        "unknown-model": (body(model="nope"), {}, 404, "model_not_found"),
        "bad-base64": (with_image("data:image/png;base64,%%%"), {}, 400, "invalid_image"),
        "not-an-image": (with_image(data_url_of(b"MZ\x90\x00 not an image")), {}, 400, "invalid_image"),
        "huge-image": (with_image(huge), {}, 400, "image_too_large"),
        "ssrf-metadata": (with_image("http://169.254.169.254/latest/meta-data/"), {}, 400, "image_url_not_allowed"),
        "ssrf-loopback": (with_image("http://127.0.0.1:22/"), {}, 400, "image_url_not_allowed"),
        "file-url": (with_image("file:///etc/passwd"), {}, 400, "image_url_not_allowed"),
        "local-path": (with_image("/etc/passwd"), {}, 400, "image_url_not_allowed"),
        "too-many-images": (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}] * 3}]), {}, 400, "too_many_images"),
        "oversized-max-tokens": (body(max_tokens=100000), {}, 400, "max_tokens"),
        "negative-n": (body(n=-1), {}, 400, "invalid_value"),
        "bad-safety-threshold": (body(safety_threshold={"Weather": 0.1}), {}, 400, "safety_threshold"),
        "bad-safety-actions": (body(safety_actions={"Privacy": "explode"}), {}, 400, "safety_actions"),
        "lone-surrogate": (b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400, "surrogate"),
        "deeply-nested": (b"[" * 100000 + b"]" * 100000, {}, 400, "invalid_json"),
        "prompt-over-context": (body(messages=[{"role": "user", "content": "coffee " * 600}], max_tokens=8), {}, 400, "context"),
        "body-over-cap": (b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}', {}, 413, "request_too_large"),
        "unknown-path": (None, {}, 404, "Unknown path"),
    }  # fmt: skip


def data_url_of(raw: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_hostile_requests_get_a_clear_4xx_and_the_server_stays_healthy(server, client):
    failures = []
    for name, (payload, headers, status, fragment) in hostile_requests(server.model).items():
        path = "/v1/nothing" if name == "unknown-path" else "/v1/chat/completions"
        raw = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
        got, body = server.request("POST", path, raw, headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers})
        error = body.get("error", {}) if isinstance(body, dict) else {}
        text = json.dumps(error)
        if got != status or set(error) != {"message", "type", "param", "code"} or fragment not in text or "Traceback" in text:
            failures.append((name, got, body))
    assert not failures, failures
    assert server.get("/health")[0] == 200
    assert chat(client, server, random_image(50, 32)).choices[0].message.content is not None


# -- README -----------------------------------------------------------------------------------------------------------


def readme_serving_blocks() -> dict:
    page = (REPO_ROOT / "docs" / "serving.md").read_text()  # README's serving section moved here (issue 25)
    section = page.split("## Serving: `safe-llava serve`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return {
        "bash": re.findall(r"```bash\n(.*?)```", section, flags=re.S),
        "python": re.findall(r"```python\n(.*?)```", section, flags=re.S),
    }


def test_readme_serving_commands_run(server, tmp_path, monkeypatch):
    from modeling_safe_llava.tools.cli import build_parser

    blocks = readme_serving_blocks()
    start = next(line for line in blocks["bash"][0].splitlines() if line.startswith("safe-llava serve"))
    argv = shlex.split(start.split("#")[0])[1:]
    assert build_parser(argv).parse_args(argv).model == "outputs/demo/export"  # every flag it names exists

    random_image(60, 32).save(tmp_path / "photo.png")
    port = f"127.0.0.1:{server.port}"
    curl = blocks["bash"][1].replace("127.0.0.1:8000", port).replace('"export"', f'"{server.model}"')
    env = {**os.environ, "SAFE_LLAVA_API_KEY": API_KEY}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"object":"chat.completion"' in result.stdout and result.stdout.count('"safety"') >= 3
    assert "data: [DONE]" in result.stdout and '"results"' in result.stdout and '"error"' not in result.stdout, server.stderr_text()[-3000:]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFE_LLAVA_API_KEY", API_KEY)
    snippet = blocks["python"][0].replace("127.0.0.1:8000", port).replace('"export"', f'"{server.model}"')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    output = printed.getvalue()  # the tiny model's answers may hold line breaks: read the first word and last line
    assert output.split()[0] in {"allow", "hint", "refuse"} and output.splitlines()[-1].split()[0] in {"True", "False"}


def test_a_client_that_leaves_mid_stream_disturbs_nobody(server, client, reference):
    allow = all_types(reference, "allow")
    stream = chat(client, server, random_image(80, 32), max_tokens=64, n=4, stream=True, safety_actions=allow)
    assert next(iter(stream)).model_extra["safety"]["judged"]
    stream.close()  # gone after the verdict
    assert server.get("/health")[0] == 200
    answer = chat(client, server, random_image(81, 32), safety_actions=allow)
    assert answer.choices[0].message.content and safety_of(answer)["action"] == "allow"
