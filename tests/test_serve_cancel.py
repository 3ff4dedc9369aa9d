"""A client that leaves stops its work: a live `safe-llava serve` (tiny SafeLlava), driven by the official `openai`
client and by raw sockets that close mid-request. Nothing is timed: the server's own counters (`/metrics`) say what
ran. Every long answer here would take `LONG` tokens if nothing stopped it (checked first); a dropped one must stop
far short of that, and the model thread must be free for the next request.
"""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serving_live import HalfSentRequest, LiveServer, image_message, metric, save_tiny_server_model, wait_for

from conftest import random_image


LONG = 400  # tokens; the tiny model's greedy answers to images 1, 8, 11 and 13 run to this limit (checked first)
WAIT_S = 60.0  # a bound on waiting for a state, never an assertion on time


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_server_model(tmp_path_factory.mktemp("cancel") / "tiny-safe-llava")


@pytest.fixture(scope="module")
def server(folder):
    args = ["--model", folder, "--max-tokens-limit", str(LONG), "--batch-wait-ms", "5000", "--max-batch-size", "8"]
    with LiveServer(args) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module", autouse=True)
def risky_types(folder):
    """Every risky type of the tiny model (its verdicts are judged, and every action is `allow`)."""
    RISKY_TYPES[:] = json.loads((Path(folder) / "config.json").read_text())["safety_type_labels"][:-1]


RISKY_TYPES: list[str] = []


def body(server, image, max_tokens, **fields) -> dict:
    allow = {"safety_actions": dict.fromkeys(RISKY_TYPES, "allow")}
    return {"model": server.model, "messages": image_message(image), "max_tokens": max_tokens, "temperature": 0, **allow, **fields}


def chat(client, server, image, max_tokens, **fields):
    request = body(server, image, max_tokens, **fields)
    extra = {"safety_actions": request.pop("safety_actions")}
    return client.chat.completions.create(**request, extra_body=extra)


def send_without_reading(server, payload: dict) -> http.client.HTTPConnection:
    """A chat request on a raw connection whose answer is never read (close the connection to leave)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    connection.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
    return connection


def leave_after_two_chunks(stream):
    """Reads the verdict and the first words of an `openai` stream, then closes its connection."""
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()


def runs_to_the_limit(client, server, image) -> str:
    answer = chat(client, server, image, LONG)
    assert answer.choices[0].finish_reason == "length"  # precondition: nothing but the limit would stop it
    return answer.choices[0].message.content


def test_a_dropped_stream_stops_its_row_and_frees_the_model(server, client):
    image = random_image(1, 32)
    runs_to_the_limit(client, server, image)
    tokens = metric(server, "safe_llava_generated_tokens_total")
    cancelled = metric(server, "safe_llava_cancelled_requests_total", kind="stream", stage="running")
    leave_after_two_chunks(chat(client, server, image, LONG, stream=True))
    answer = chat(client, server, random_image(2, 32), 1)  # one model thread: runs once the stream's call ended
    assert answer.usage.completion_tokens == 1
    assert metric(server, "safe_llava_cancelled_requests_total", kind="stream", stage="running") == cancelled + 1
    generated = metric(server, "safe_llava_generated_tokens_total") - tokens - 1
    assert 0 < generated < LONG  # the dropped row stopped long before its limit


def leave_after_two_events(request: HalfSentRequest):
    """Sends the rest of a half-sent stream request, reads the verdict chunk and the first words, then leaves."""
    response, events = request.finish(), 0
    while events < 2:
        line = response.readline()
        assert line, "the server closed the stream early"
        events += line.startswith(b"data: ")
    request.close()


def test_the_other_rows_of_a_batch_go_on_when_one_client_leaves(server, client):
    kept_image, dropped_image = random_image(8, 32), random_image(11, 32)
    expected = runs_to_the_limit(client, server, kept_image)
    runs_to_the_limit(client, server, dropped_image)
    tokens = metric(server, "safe_llava_generated_tokens_total")
    batches = metric(server, "safe_llava_batch_size_count", kind="stream")
    dropped = HalfSentRequest(server.port, "/v1/chat/completions", body(server, dropped_image, LONG, stream=True))
    wait_for(lambda: metric(server, "safe_llava_arriving_requests") == 1, "the server reads the half-sent request")

    def kept():
        chunks = [c for c in chat(client, server, kept_image, LONG, stream=True) if c.choices]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        return "".join(c.choices[0].delta.content or "" for c in chunks), finishes

    with ThreadPoolExecutor(1) as pool:
        kept_answer = pool.submit(kept)
        wait_for(lambda: metric(server, "safe_llava_queue_depth") == 1, "the kept request waits for the arriving one")
        leave_after_two_events(dropped)
        text, finish = kept_answer.result()
    assert metric(server, "safe_llava_batch_size_count", kind="stream") == batches + 1  # one call held both rows
    assert (text, finish) == (expected, ["length"])
    generated = metric(server, "safe_llava_generated_tokens_total") - tokens
    assert LONG < generated < 2 * LONG  # the kept row ran to its limit, the dropped one stopped early


def test_a_lone_request_does_not_wait_for_company(server, client):
    """The module's server waits up to 5 s for batch company, but only while another request is arriving: a lone
    request on the idle server runs at once."""
    start = time.monotonic()
    chat(client, server, random_image(5, 32), 1)
    assert time.monotonic() - start < 5.0


def test_a_queued_request_whose_client_left_never_runs_and_a_plain_one_stops(server, client):
    runs_to_the_limit(client, server, random_image(13, 32))
    before = {stage: metric(server, "safe_llava_cancelled_requests_total", kind="chat", stage=stage) for stage in ("queued", "running")}
    tokens, batches = metric(server, "safe_llava_generated_tokens_total"), metric(server, "safe_llava_batch_size_count", kind="chat")
    running = send_without_reading(server, body(server, random_image(13, 32), LONG, n=8))
    wait_for(lambda: metric(server, "safe_llava_batch_size_count", kind="chat") == batches + 1, "the long request runs")
    queued = send_without_reading(server, body(server, random_image(6, 32), LONG - 1))  # another key: waits its turn
    wait_for(lambda: metric(server, "safe_llava_queue_depth") == 1, "the second request is queued")
    queued.close()
    wait_for(lambda: metric(server, "safe_llava_queue_depth") == 0, "the queue drops the request whose client left")
    running.close()
    assert chat(client, server, random_image(7, 32), 1).usage.completion_tokens == 1
    after = {stage: metric(server, "safe_llava_cancelled_requests_total", kind="chat", stage=stage) for stage in ("queued", "running")}
    assert after == {"queued": before["queued"] + 1, "running": before["running"] + 1}
    assert metric(server, "safe_llava_batch_size_count", kind="chat") == batches + 2  # the long one and the last one
    assert metric(server, "safe_llava_generated_tokens_total") - tokens - 1 < 8 * LONG  # the 8 rows stopped early
    assert metric(server, "safe_llava_requests_total", endpoint="/v1/chat/completions", status="499") >= 2
