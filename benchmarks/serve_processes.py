"""Server processes for the gate's tests and the `cpu-serve` benchmark: `transformers serve` (the upstream engine),
`safe-llava serve` (in-process or as a gate), each on a free loopback port, logged to a file, stopped by its pid.

Also `save_stock_and_head_only`: the stock LLaVA and the head-only SafeLlava (`num_llm_safety_tokens=0`) built from the
same weights, saved side by side. The stock folder is the stock model itself (`save_pretrained` of the very
`LlavaForConditionalGeneration` that `from_llava` wrapped), so an upstream serving it runs the head-only SafeLlava's
language model bit for bit.

`transformers serve` notes (5.23 to 5.25, checked here):

- it needs `transformers[serving]` (fastapi, uvicorn, openai, pydantic, starlette, rich): the `[serve]` extra;
- it serves a local folder (`transformers serve FOLDER`): requests must name the folder as `model`;
- `temperature: 0` means greedy (it sets `do_sample=False`); without `max_tokens` it generates up to 1024 tokens;
- it ignores `n` and `stream_options` (one choice, no usage chunk; the gate asks for further choices itself and counts
  streamed usage with the model's tokenizer), and answers 422 for fields outside OpenAI's schema;
- `GET /v1/models` fails (500) on an empty Hub cache: readiness is `GET /health`;
- it logs each request (`"POST /v1/chat/completions HTTP/1.1" 200`), which `count_requests` reads.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    """A started server: its process, base URL (`http://127.0.0.1:PORT`) and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count_requests(self, path: str = "/v1/chat/completions") -> int:
        """Requests to `path` this server has logged (uvicorn's access log)."""
        return self.log().count(f'"POST {path} HTTP/1.1"')

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.process.stdout and self.process.stdout.close()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(threads: int | None = None, repo: Path = REPO) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *inherited])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _transformers_cli() -> list[str]:
    """`transformers` of this interpreter's environment (its console script, else `python -m` of its CLI module)."""
    script = Path(sys.executable).with_name("transformers")
    if script.is_file():
        return [str(script)]
    found = shutil.which("transformers")
    return [found] if found else [sys.executable, "-m", "transformers.cli.transformers"]


def start_server(
    command: list[str], port: int, log_path: Path, threads: int | None = None, timeout: float = 180.0, repo: Path = REPO
):
    """Starts `command` (which listens on `port`) in `repo` (another checkout serves that checkout's code), waits
    until `GET /health` says ready, returns a `ServerProcess`. Raises `RuntimeError` with the log's tail if it exits
    or is not ready within `timeout` seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    env = server_env(threads, repo)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(repo))
    log.close()
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}:\n{server.log()[-3000:]}")
        if _ready(server.url):
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{command[0]} not ready after {timeout:.0f} s:\n{server.log()[-3000:]}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            body = response.read().decode(errors="replace")
    except OSError:
        return False
    return response.status == 200 and "loading" not in body


def start_transformers_serve(folder: Path, log_path: Path, threads: int | None = None) -> ServerProcess:
    """`transformers serve FOLDER` (the stock engine, default settings) on a free loopback port, CPU."""
    port = free_port()
    command = [*_transformers_cli(), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    return start_server(command, port, log_path, threads)


def start_safe_llava_serve(folder: Path, log_path: Path, *extra: str, threads: int | None = None, repo: Path = REPO):
    """`python -m modeling_safe_llava serve --model FOLDER ...` on a free loopback port (no API key: loopback only),
    from the checkout `repo` (default: this one)."""
    port = free_port()
    command = [sys.executable, "-m", "modeling_safe_llava", "serve", "--model", str(folder), "--port", str(port)]
    return start_server([*command, *extra], port, log_path, threads, repo=repo)


def start_gate(folder: Path, upstream: ServerProcess, upstream_model: str, log_path: Path, *extra: str, threads=None):
    """`safe-llava serve` in gate mode in front of `upstream`."""
    gate_flags = ("--upstream", upstream.v1, "--upstream-model", upstream_model)
    return start_safe_llava_serve(folder, log_path, *gate_flags, *extra, threads=threads)


def save_stock_and_head_only(folder: Path, llava=None, processor=None, seed: int = 0, safety: dict | None = None):
    """Saves `folder/stock` (the stock LLaVA) and `folder/safe` (the head-only SafeLlava wrapping the very same
    weights, safety modules marked trained so that a server accepts them); returns both paths. Without `llava`, the
    tiny random LLaVA of `modeling_safe_llava.tiny` (seed `seed`). `safety`: SafeLlava config fields over the tiny
    preset's safety-module shapes."""
    from modeling_safe_llava import SafeLlavaForConditionalGeneration, SafeLlavaProcessor
    from modeling_safe_llava.presets import load_safety_policy
    from modeling_safe_llava.tiny import build_tiny_llava, safety_fields

    if llava is None:
        llava, processor = build_tiny_llava(seed=seed)
    stock, safe = folder / "stock", folder / "safe"
    llava.save_pretrained(stock)
    processor.save_pretrained(stock)
    policy = load_safety_policy("paper_safety_policy.json")
    fields = {**safety_fields(), **(safety or {}), **policy, "num_llm_safety_tokens": 0}
    safe_processor = SafeLlavaProcessor.from_llava(processor, num_llm_safety_tokens=0)
    model = SafeLlavaForConditionalGeneration.from_llava(llava, processor=safe_processor, **fields).eval()
    model.config.safety_modules_trained = True
    model.save_pretrained(safe)
    safe_processor.save_pretrained(safe)
    return stock, safe
