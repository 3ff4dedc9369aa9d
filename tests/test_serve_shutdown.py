"""`safe-llava serve` under load and at shutdown: past `--max-queue` requests get 429 with `Retry-After`; SIGTERM
while requests are in flight lets every one of them finish with its answer, then the server exits with code 0.
A server that cannot serve its model stops at once with one line on stderr and exit code 2. Its log (at INFO) holds
one line per request, without prompt text or image bytes."""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_live import REPO_ROOT, LiveServer, free_port, image_message, save_tiny_server_model

from conftest import random_image


ALLOW_ALL = {name: "allow" for name in ["Politics", "Illegal Risk", "Insults and Bullying", "Fairness", "Privacy", "Misleading"]}


def long_request(server, seed: int):
    """A chat request that really generates (every action `allow`): (status, body, headers)."""
    body = {
        "model": server.model, "messages": image_message(random_image(seed, 32)), "max_tokens": 24, "temperature": 0,
        "n": 2, "safety_actions": ALLOW_ALL,
    }  # fmt: skip
    status, answer = server.request("POST", "/v1/chat/completions", body, timeout=120)
    return status, answer, dict(getattr(server, "last_headers", None) or {}) if status != 200 else {}


@pytest.fixture
def small_queue_server(tmp_path):
    folder = save_tiny_server_model(tmp_path / "tiny")
    args = ["--model", folder, "--max-batch-size", "1", "--batch-wait-ms", "0", "--max-queue", "2"]
    with LiveServer(args, verbose=True) as server:
        yield server


def test_a_full_queue_gets_429_then_sigterm_finishes_the_requests_in_flight(small_queue_server):
    server = small_queue_server
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda seed: long_request(server, seed), range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    refused = next(body for status, body, _ in results if status == 429)
    assert refused["error"]["code"] == "queue_full" and refused["error"]["type"] == "rate_limit_error"
    assert server.get("/health")[0] == 200

    with ThreadPoolExecutor(2) as pool:  # two: within the queue's 2, however they arrive
        in_flight = [pool.submit(long_request, server, 100 + i) for i in range(2)]
        deadline = time.monotonic() + 30
        while "safe_llava_queue_depth 0.0" in server.get("/metrics")[1] and time.monotonic() < deadline:
            time.sleep(0.02)  # until requests are queued behind the running one
        exit_code = server.stop()
        answers = [future.result() for future in in_flight]
    assert exit_code == 0, server.stderr_text()[-2000:]
    assert [status for status, _, _ in answers] == [200, 200], answers
    assert all(len(body["choices"]) == 2 and body["safety"]["judged"] for _, body, _ in answers)
    assert server.get("/health", timeout=2)[0] == 0  # gone: nothing answers any more
    log = server.stderr_text()
    assert "Traceback" not in log and "POST /v1/chat/completions 200" in log and "POST /v1/chat/completions 429" in log
    assert "What is shown" not in log and "base64" not in log  # no prompt text, no image bytes (no --log-requests)


def test_a_model_that_cannot_be_served_stops_the_server_with_one_line_and_exit_2(tmp_path):
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    model, processor = build_tiny_safe_llava(seed=0)  # safety modules untrained: every verdict would be random
    model.save_pretrained(tmp_path / "untrained")
    processor.save_pretrained(tmp_path / "untrained")
    command = [sys.executable, "-m", "modeling_safe_llava", "serve", "--model", str(tmp_path / "untrained"), "--port", str(free_port())]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith("safe-llava serve: error: ") and "untrained" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
