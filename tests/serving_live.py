"""Helpers to run a live `safe-llava serve` in a subprocess (shared by tests/test_serve*.py, the gate's included).

```python
folder = save_tiny_server_model(tmp_path / "tiny-safe-llava")        # a trained-marked tiny SafeLlava
with LiveServer(["--model", folder], env={"SAFE_LLAVA_API_KEY": "k"}) as server:
    client = server.openai_client(api_key="k")                         # the official openai client
    client.chat.completions.create(model=server.model, messages=[...], max_tokens=8)
```

`LiveServer` picks a free port, starts `python -m modeling_safe_llava serve ... --port PORT`, waits until `/health`
says ready (or the process dies: its stderr is in the failure), and stops the process by its pid (SIGTERM, then
SIGKILL after a grace period). Every run is bounded by timeouts.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(image: Image.Image, text: str = "What is shown in this image?") -> list[dict]:
    """One user message with an image (as a data URL) and a question, in OpenAI's format."""
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}],
        }
    ]


def save_tiny_server_model(folder, seed: int = 0, **overrides) -> str:
    """A tiny SafeLlava (and processor) saved to `folder`, its safety modules marked trained; returns the folder."""
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    model, processor = build_tiny_safe_llava(seed=seed, **overrides)
    model.config.safety_modules_trained = True
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def assert_verdict_model_holds_the_models_weights(verdict_model, reference_state: dict):
    """Every tensor a verdict model holds (not on `meta`) equals the full model's (renamed from the checkpoint as
    `from_pretrained` renames it); of the embedding table, the rows it keeps (`kept_token_ids`)."""
    import torch

    kept = getattr(verdict_model.get_input_embeddings(), "kept_token_ids", None)
    for name, tensor in verdict_model.state_dict().items():
        if tensor.device.type == "meta":
            continue
        expected = reference_state[name]
        if name.endswith("embed_tokens.weight") and kept is not None:
            expected = expected[kept]
        assert torch.equal(tensor, expected), name


def metric(server, name: str, **labels) -> float:
    """One sample of `/metrics` (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if labels else ''} ([0-9.e+]+)$"
    found = re.search(pattern, server.get("/metrics")[1], flags=re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, what: str, limit_s: float = 60.0):
    """Polls `condition()` until it holds (bounded by `limit_s`; a hang fails with `what`)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class HalfSentRequest:
    """A POST whose body is sent in two parts on a raw socket. Until the rest is sent the server counts it as
    arriving, so requests that come in meanwhile wait for it (batch company) and share its model call."""

    def __init__(self, port: int, path: str, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        fields = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{key}: {value}\r\n" for key, value in fields.items()) + "\r\n"
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.socket.sendall(head.encode() + data[:8])
        self.rest = data[8:]

    def finish(self):
        """Sends the rest of the body; returns the response (`http.client.HTTPResponse`, headers read)."""
        import http.client

        self.socket.sendall(self.rest)
        response = http.client.HTTPResponse(self.socket)
        response.begin()
        return response

    def close(self):
        self.socket.close()


class LiveServer:
    """A `safe-llava serve` subprocess on a free port (a context manager)."""

    def __init__(
        self, args: list[str], env: dict | None = None, startup_timeout: float = 120.0, python=sys.executable,
        verbose: bool = False,
    ):
        self.port = free_port()
        self.args, self.startup_timeout, self.python = [str(a) for a in args], startup_timeout, python
        # One torch thread, as the test processes use: on two cores shared with xdist workers, more threads only
        # spin against each other (measured: 10x slower answers under load).
        defaults = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.env = {**os.environ, **defaults, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.model: str | None = None
        self.verbose = verbose  # `safe-llava -v serve`: INFO logs (one line per request) on stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        verbose = ["-v"] if self.verbose else []
        command = [self.python, "-m", "modeling_safe_llava", *verbose, "serve", *self.args, "--port", str(self.port)]
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=self._stderr, text=True
        )
        self.wait_ready()
        return self

    def wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"safe-llava serve exited with {self.process.returncode}: {self.stderr_text()[-3000:]}")
            status, body = self.get("/health")
            if status == 200:
                self.model = body["model"]
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"safe-llava serve was not ready within {self.startup_timeout} s")

    def get(self, path: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict | str | None]:
        return self.request("GET", path, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers=None, timeout: float = 60.0):
        """(status, parsed JSON body or text); no exception for HTTP errors, (0, None) when nothing answers."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if data is not None and "Content-Type" not in (headers or {}):
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _parse(response.read(), response.headers)
        except urllib.error.HTTPError as error:
            self.last_headers = error.headers
            return error.code, _parse(error.read(), error.headers)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, None

    def openai_client(self, api_key: str = "unused", **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120.0, **kwargs)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends `sig` to the server's pid, waits for it (SIGKILL after `timeout`), returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        return self.process.returncode

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far."""
        if self.process is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _parse(raw: bytes, headers):
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(raw)
    return raw.decode("utf-8", "replace")


__all__ = [
    "HalfSentRequest", "LiveServer", "assert_verdict_model_holds_the_models_weights", "data_url", "free_port",
    "image_message", "metric", "save_tiny_server_model", "wait_for",
]
