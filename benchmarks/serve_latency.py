"""`cpu-serve`'s single-request latency table (issue 24 items 3 and 5): one request at a time on kept-alive
connections, as the official `openai` client makes them.

    python -m benchmarks.serve_latency [--repeats 15] [--output-dir benchmarks/results]

The tiny LLaVA of the serving tests (hidden 256, 4 text layers; random weights) saved as the stock model and as the
head-only SafeLlava wrapping the same weights. Three things answer, one request at a time:

- `stock`: `transformers serve` with the stock LLaVA (default settings);
- `safe`: `safe-llava serve` with the head-only SafeLlava, default flags, safety on (`safety_threshold: 0`, every
  action `allow`, so every request is judged and nothing changes the answer), or every action `refuse` for the refusal;
- `safe-nowait`: the same with `--batch-wait-ms 0` (a lone request does not wait the default 5 ms for company);
- `safe-interval-50` (streams only): the same with `--stream-interval-ms 50` (a fast model's steps reach the HTTP layer
  every 50 ms instead of the default 20, each still its own chunk);
- `in-process`: the same folder loaded in a worker process of its own (processor, `generate` with the verdict
  returned, as every served answer carries it, decode), no HTTP, timed there. Like the servers it starts with `OMP_NUM_THREADS=1`: `torch.set_num_threads(1)` in a process whose OpenMP
  pool started with more threads measured 1.8x slower on this machine.

Measured, p50 and p95 of `repeats` (interleaved between the servers): `GET /health`; chat with 1 and 32 new tokens; a
refusal; a moderation; a 1-token chat sent right after a client dropped a 400-token stream (against the same request on
an idle server); and a 512-token stream's tokens per second through `safe` against in-process `generate` with an
incrementally decoding streamer. With `--baseline-repo PATH` (e.g. the main checkout), `safe-llava serve` of that
checkout (`baseline`) goes through the last two as well: before and after, side by side. Each server and this process use one torch thread. Wall-clock times on a shared
machine: read ratios measured side by side, not absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .serve import _allow_all, _decode_data_url, _images, chat_body
from .serve_processes import save_stock_and_head_only, start_safe_llava_serve, start_transformers_serve


NAME = "cpu-serve-latency"
PROMPT = "What is shown in this image?"
IMAGE_SIZE = 32  # the tiny preset's image size
STREAM_RUNS = 5  # 512-token streams per path (each ratio moved by 5-10 % between runs of 3)
# `--stream-interval-ms` of the `safe-interval-50` server, which goes through the stream measurement only: the flag a
# deployer of a fast model can raise, against the default (20 ms).
COARSE_INTERVAL_MS = 50
CONTEXT = 1024  # the tiny preset's 512 positions, raised so that a 512-token answer fits
TARGETS = {
    "health_p50_extra_ms_max": 2.0,
    "chat_1_ratio_max": 1.3,
    "chat_32_ratio_max": 1.10,
    "overhead_over_in_process_ms_max": 5.0,
    "refusal_ratio_max": 0.25,
    "after_drop_ratio_max": 2.0,
    "stream_rate_ratio_min": 0.95,
}


def build_folders(folder: Path) -> tuple[Path, Path]:
    """The tiny stock LLaVA (seed 0, `CONTEXT` positions) and the head-only SafeLlava around the same weights."""
    from modeling_safe_llava.tiny import build_tiny_llava

    llava, processor = build_tiny_llava(seed=0)
    llava.config.text_config.max_position_embeddings = CONTEXT
    llava.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return save_stock_and_head_only(folder, llava, processor)


def percentiles(seconds: list[float]) -> dict:
    values = np.asarray(seconds, dtype=float) * 1000.0
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)), "n": len(seconds)}


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


# -- the requests ----------------------------------------------------------------------------------------------------


class Target:
    """One server as the `openai` client sees it (one kept-alive connection pool), and the model name it serves."""

    def __init__(self, server, model: str, extra: dict | None):
        from openai import OpenAI

        self.server, self.model, self.extra = server, model, extra
        self.client = OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600.0)

    def health(self):
        response = self.client._client.get(self.server.url + "/health")  # the client's own kept-alive pool
        assert response.status_code == 200, response.status_code

    def chat(self, image: str, new_tokens: int, extra: dict | None = None, **fields):
        body = chat_body(self.model, image, PROMPT, new_tokens)
        extra = self.extra if extra is None else extra
        return self.client.chat.completions.create(**body, extra_body=extra, **fields)

    def moderate(self, image: str):
        return self.client.moderations.create(model=self.model, input=[{"type": "image_url", "image_url": {"url": image}}])

    def drop_stream(self, image: str, new_tokens: int):
        """Opens a stream, reads the verdict and the first words, and leaves."""
        stream = self.chat(image, new_tokens, stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()

    def stream_rate(self, image: str, new_tokens: int) -> dict:
        """A streamed answer read to its end by a plain SSE reader on the client's own kept-alive connection (the
        `openai` client's per-chunk parsing would share the 2 cores with the server): tokens per second, request to
        the last chunk."""
        body = {**chat_body(self.model, image, PROMPT, new_tokens), **(self.extra or {}), "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        started = time.perf_counter()
        with self.client._client.stream("POST", self.server.v1 + "/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        seconds = time.perf_counter() - started
        tokens = json.loads(lines[-1][len("data: ") :])["usage"]["completion_tokens"]
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "chunks": len(lines)}


class InProcess:
    """The same folder in this process: processor, `generate` (safety on, every action `allow`, the verdict returned as
    the server returns it), decode."""

    def __init__(self, folder: Path):
        from modeling_safe_llava.bases import load_safe_model, load_safe_processor

        self.model = load_safe_model(str(folder)).eval()
        self.processor = load_safe_processor(str(folder), self.model.config.model_type)
        self.allow = _allow_all(self.model.config.risky_type_labels)

    def inputs(self, image_url: str):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return self.processor(text=[text], images=[_decode_data_url(image_url)], return_tensors="pt")

    def timed_chat(self, image_url: str, new_tokens: int) -> float:
        return timed(lambda: self.chat(image_url, new_tokens))

    def chat(self, image_url: str, new_tokens: int, streamer=None) -> int:
        # The verdict asked for, as the server asks for it (every answer carries it): with every action `allow` and no
        # verdict wanted, `generate` would judge nothing and skip the safety head the server runs.
        inputs = self.inputs(image_url)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, **self.allow, max_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                return_dict_in_generate=True,
            )  # fmt: skip
        assert out.safety_assessment is not None
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        self.processor.decode(new, skip_special_tokens=True)
        return int(new.numel())

    def stream_rate(self, image_url: str, new_tokens: int) -> dict:
        from modeling_safe_llava.serving.detokenize import IncrementalDetokenizer

        streamer = _TextCollector(IncrementalDetokenizer(self.processor.tokenizer))
        started = time.perf_counter()
        tokens = self.chat(image_url, new_tokens, streamer=streamer)
        seconds = time.perf_counter() - started
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


class InProcessWorker:
    """`InProcess` in a spawned process started with `OMP_NUM_THREADS=1` (as the servers): `call(method, *args)` runs
    the method there and returns its result (times are taken there, without the pipe)."""

    def __init__(self, folder: Path):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the child's OpenMP when torch loads there
        try:
            self.process = context.Process(target=_serve_in_process, args=(child, str(folder)), daemon=True)
            self.process.start()
        finally:
            if previous is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        self.risky_types = self.connection.recv()

    def call(self, method: str, *args):
        self.connection.send((method, args))
        ok, value = self.connection.recv()
        if not ok:
            raise RuntimeError(f"in-process worker: {method} failed: {value}")
        return value

    def close(self):
        self.connection.send(None)
        self.process.join(timeout=30)


def _serve_in_process(connection, folder: str):
    torch.set_num_threads(1)
    local = InProcess(Path(folder))
    connection.send(list(local.model.config.risky_type_labels))
    while (message := connection.recv()) is not None:
        method, args = message
        try:
            connection.send((True, getattr(local, method)(*args)))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
            connection.send((False, repr(error)))


class _TextCollector:
    """A streamer that decodes each new token incrementally (as a serving streamer must) and keeps the text."""

    def __init__(self, detokenizer):
        self.detokenizer, self.pieces, self.prompt_seen = detokenizer, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.pieces.append(self.detokenizer.push(value.reshape(-1).tolist()))

    def end(self):
        self.pieces.append(self.detokenizer.flush())


# -- the run ---------------------------------------------------------------------------------------------------------


def detokenize_cost(tokens: int = 512) -> dict:
    """CPU time per streamed token of a `tokens`-token answer (the tiny tokenizer, this process): re-decoding the
    whole row at every step, as before issue 24, against `IncrementalDetokenizer`. Side by side, so load on the shared
    cores touches both alike."""
    from modeling_safe_llava.serving.detokenize import IncrementalDetokenizer
    from modeling_safe_llava.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = (tokenizer.encode(PROMPT + " A cat sits on a mat, naïve café 😀.", add_special_tokens=False) * tokens)[:tokens]
    started = time.process_time()
    for end in range(1, tokens + 1):
        tokenizer.decode(ids[:end], skip_special_tokens=True)
    whole = time.process_time() - started
    detokenizer, started = IncrementalDetokenizer(tokenizer), time.process_time()
    for token in ids:
        detokenizer.push([token])
    incremental = time.process_time() - started
    return {"tokens": tokens, "whole_us_per_token": whole / tokens * 1e6, "incremental_us_per_token": incremental / tokens * 1e6}


def measure(targets: dict, local: InProcessWorker, images: list[str], repeats: int, refuse: dict) -> dict:
    samples: dict[str, list[float]] = {}

    def add(key, seconds):
        samples.setdefault(key, []).append(seconds)

    for name, target in targets.items():  # warm-up: first-request costs, lazy loads
        target.health(), target.chat(images[0], 4)
    local.call("chat", images[0], 4)
    for repeat in range(repeats):
        image = images[repeat % len(images)]
        for name, target in targets.items():
            add(f"health/{name}", timed(target.health))
            add(f"chat_1/{name}", timed(lambda: target.chat(image, 1)))
            add(f"chat_32/{name}", timed(lambda: target.chat(image, 32)))
        add("chat_32/in-process", local.call("timed_chat", image, 32))
        add("chat_1/in-process", local.call("timed_chat", image, 1))
        for name in ("safe", "safe-nowait"):
            add(f"refusal/{name}", timed(lambda: targets[name].chat(image, 32, extra=refuse)))
            add(f"moderation/{name}", timed(lambda: targets[name].moderate(image)))
    return {key: percentiles(values) for key, values in samples.items()}


def measure_after_drop(safe: Target, images: list[str], repeats: int) -> dict:
    """A 1-token chat on an idle server, and the same right after a client dropped a 400-token stream (p50 and p95
    over `repeats`)."""
    idle, after = [], []
    for repeat in range(repeats):
        image = images[repeat % len(images)]
        idle.append(timed(lambda: safe.chat(image, 1)))
        safe.drop_stream(images[(repeat + 1) % len(images)], 400)
        after.append(timed(lambda: safe.chat(image, 1)))
    return {"idle": percentiles(idle), "after_drop": percentiles(after)}


def measure_stream_rate(servers: dict, local: InProcessWorker, images: list[str], repeats: int, new_tokens: int = 512) -> dict:
    """Tokens per second of `new_tokens`-token streams through each server and in-process, interleaved, on the
    images whose greedy answer runs to the limit (an early EOS would measure a shorter stream); medians."""
    runs: dict[str, list] = {name: [] for name in [*servers, "in_process"]}
    for image in images:
        if len(runs["in_process"]) == repeats:
            break
        local_run = local.call("stream_rate", image, new_tokens)
        if local_run["tokens"] < new_tokens:
            continue
        runs["in_process"].append(local_run)
        for name, server in servers.items():
            runs[name].append(server.stream_rate(image, new_tokens))
    median = lambda name: statistics.median(run["tokens_per_s"] for run in runs[name])  # noqa: E731
    return {"new_tokens": new_tokens, "runs": runs, **{f"{name}_tokens_per_s": median(name) for name in runs}}


def run(repeats: int, baseline_repo: Path | None = None) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="safe-llava-latency-") as tmp:
        stock_folder, safe_folder = build_folders(Path(tmp))
        logs = Path(tmp) / "logs"
        stock = start_transformers_serve(stock_folder, logs / "transformers-serve.log", threads=1)
        limit = f"--max-tokens-limit={CONTEXT // 2}"
        safe = start_safe_llava_serve(safe_folder, logs / "safe.log", limit, threads=1)
        nowait = start_safe_llava_serve(safe_folder, logs / "safe-nowait.log", limit, "--batch-wait-ms=0", threads=1)
        coarse = start_safe_llava_serve(
            safe_folder, logs / "safe-interval-50.log", limit, f"--stream-interval-ms={COARSE_INTERVAL_MS}", threads=1
        )
        baseline = None
        if baseline_repo is not None:
            baseline = start_safe_llava_serve(safe_folder, logs / "baseline.log", limit, threads=1, repo=baseline_repo)
        local = None
        try:
            local = InProcessWorker(safe_folder)
            allow = _allow_all(local.risky_types)
            refuse = {**allow, "safety_actions": dict.fromkeys(allow["safety_actions"], "refuse")}
            targets = {"stock": Target(stock, str(stock_folder), None), "safe": Target(safe, "safe", allow),
                       "safe-nowait": Target(nowait, "safe", allow)}  # fmt: skip
            images = _images(IMAGE_SIZE, 8, 0)
            results = {"latency": measure(targets, local, images, repeats, refuse)}
            streamed = {"safe": targets["safe"], "safe-interval-50": Target(coarse, "safe", allow), "stock": targets["stock"]}
            results["cancellation"] = {"safe": measure_after_drop(targets["safe"], images, max(1, repeats // 2))}
            if baseline is not None:
                streamed["baseline"] = Target(baseline, "safe", allow)
                results["cancellation"]["baseline"] = measure_after_drop(streamed["baseline"], images, max(1, repeats // 4))
            results["stream"] = measure_stream_rate(streamed, local, images, min(STREAM_RUNS, repeats))
        finally:
            if local is not None:
                local.close()
            exit_codes = {"stock": stock.stop(), "safe": safe.stop(), "safe-nowait": nowait.stop(), "safe-interval-50": coarse.stop()}
            if baseline is not None:
                exit_codes["baseline"] = baseline.stop()
    results["detokenize"] = detokenize_cost()
    results["metadata"] = metadata(time.perf_counter() - started, exit_codes, repeats)
    results["metadata"]["baseline_repo"] = str(baseline_repo) if baseline_repo else None
    results["targets"] = evaluate(results)
    return results


def metadata(wall: float, exit_codes: dict, repeats: int) -> dict:
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), "torch": torch.__version__,
        "transformers": transformers.__version__, "wall_time_s": wall, "server_exit_codes": exit_codes,
        "repeats": repeats,
    }  # fmt: skip


def evaluate(results: dict) -> list[dict]:
    """Issue 24's targets, PASS/FAIL."""
    p50 = lambda key: results["latency"][key]["p50_ms"]  # noqa: E731
    drop, stream = results["cancellation"]["safe"], results["stream"]
    rows = [
        ("kept-alive /health p50: safe - stock (ms)", p50("health/safe") - p50("health/stock"), TARGETS["health_p50_extra_ms_max"], False),
        ("chat 1 token p50: safe / stock", p50("chat_1/safe") / p50("chat_1/stock"), TARGETS["chat_1_ratio_max"], False),
        ("chat 32 tokens p50: safe / stock", p50("chat_32/safe") / p50("chat_32/stock"), TARGETS["chat_32_ratio_max"], False),
        ("chat 32 tokens p50: safe - in-process generate (ms)", p50("chat_32/safe") - p50("chat_32/in-process"), TARGETS["overhead_over_in_process_ms_max"], False),
        ("chat 1 token p50: safe-nowait / stock", p50("chat_1/safe-nowait") / p50("chat_1/stock"), TARGETS["chat_1_ratio_max"], False),
        ("chat 32 tokens p50: safe-nowait / stock", p50("chat_32/safe-nowait") / p50("chat_32/stock"), TARGETS["chat_32_ratio_max"], False),
        ("chat 32 tokens p50: safe-nowait - in-process generate (ms)", p50("chat_32/safe-nowait") - p50("chat_32/in-process"), TARGETS["overhead_over_in_process_ms_max"], False),
        ("refusal p50 / allowed 32-token p50 (safe)", p50("refusal/safe") / p50("chat_32/safe"), TARGETS["refusal_ratio_max"], False),
        ("refusal p50 / allowed 32-token p50 (safe-nowait)", p50("refusal/safe-nowait") / p50("chat_32/safe-nowait"), TARGETS["refusal_ratio_max"], False),
        ("1-token chat right after a dropped 400-token stream / idle, p50", drop["after_drop"]["p50_ms"] / drop["idle"]["p50_ms"], TARGETS["after_drop_ratio_max"], False),
        ("512-token stream tokens/s: safe / in-process streamer", stream["safe_tokens_per_s"] / stream["in_process_tokens_per_s"], TARGETS["stream_rate_ratio_min"], True),
        (f"512-token stream tokens/s: safe --stream-interval-ms {COARSE_INTERVAL_MS} / in-process streamer", stream["safe-interval-50_tokens_per_s"] / stream["in_process_tokens_per_s"], TARGETS["stream_rate_ratio_min"], True),
    ]  # fmt: skip
    return [
        {"target": name, "measured": value, "wanted": f"{'>=' if at_least else '<='} {bound}",
         "pass": bool(value >= bound if at_least else value <= bound)}  # fmt: skip
        for name, value, bound, at_least in rows
    ]


def render_markdown(results: dict) -> str:
    meta, latency = results["metadata"], results["latency"]
    lines = [
        "# Serving latency, one request at a time: `cpu-serve-latency`", "",
        f"- **Date (UTC):** {meta['date_utc']}; wall time {meta['wall_time_s']:.0f} s; {meta['cpu_count']} cores "
        f"(load after: {', '.join(f'{x:.1f}' for x in meta['load_average_after'])}); torch {meta['torch']}, "
        f"transformers {meta['transformers']}",
        f"- **Command:** `python -m benchmarks.serve_latency --repeats {meta['repeats']}"
        f"{' --baseline-repo ' + meta['baseline_repo'] if meta.get('baseline_repo') else ''}`",
        f"- **Shape:** the serving tests' tiny LLaVA (hidden 256, 4 text layers, 32 px images, random weights), "
        f"stock in `transformers serve`, head-only SafeLlava in `safe-llava serve` (safety on, threshold 0, every "
        f"action `allow`); one torch thread per process; the `openai` client, kept-alive; {meta['repeats']} "
        "repeats, interleaved.", "",
        "## Targets (issue 24)", "", "| target | measured | wanted | verdict |", "|---|---|---|---|",
    ]  # fmt: skip
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['measured']:.3f} | {row['wanted']} | **{'PASS' if row['pass'] else 'FAIL'}** |")
    lines += ["", "## Latency at concurrency 1 (ms)", "", "| request | `transformers serve` p50 / p95 | `safe-llava serve` p50 / p95 | `--batch-wait-ms 0` p50 / p95 | in-process p50 / p95 |", "|---|---|---|---|---|"]
    cell = lambda key: f"{latency[key]['p50_ms']:.1f} / {latency[key]['p95_ms']:.1f}" if key in latency else "n/a"  # noqa: E731
    for request, label in (("health", "`GET /health`"), ("chat_1", "chat, 1 token"), ("chat_32", "chat, 32 tokens"),
                           ("refusal", "chat, refused (every action `refuse`)"), ("moderation", "moderation")):  # fmt: skip
        cells = " | ".join(cell(f"{request}/{name}") for name in ("stock", "safe", "safe-nowait", "in-process"))
        lines.append(f"| {label} | {cells} |")
    stream = results["stream"]
    lines += ["", "## A client that leaves (1-token chat, ms)", "",
              "| server | idle p50 / p95 | right after a client dropped a 400-token stream p50 / p95 | n |",
              "|---|---|---|---|"]  # fmt: skip
    for name, drop in results["cancellation"].items():
        idle, after = drop["idle"], drop["after_drop"]
        lines.append(f"| `{name}` | {idle['p50_ms']:.1f} / {idle['p95_ms']:.1f} | {after['p50_ms']:.1f} / {after['p95_ms']:.1f} | {idle['n']} |")
    lines += ["", f"## {stream['new_tokens']}-token streams (tokens/s, median)", "",
              "Request to last chunk, read by a plain SSE reader on the `openai` client's kept-alive connection; in-process: "
              "`generate` with a streamer that decodes incrementally; the same images, interleaved.", "",
              "| path | tokens/s | runs |", "|---|---|---|"]  # fmt: skip
    for name, runs in stream["runs"].items():
        lines.append(f"| `{name}` | {stream[name + '_tokens_per_s']:.0f} | {len(runs)} |")
    cost = results["detokenize"]
    lines += ["", f"Detokenizing a {cost['tokens']}-token answer, CPU time per token in one process: re-decoding the "
              f"whole row at every step {cost['whole_us_per_token']:.1f} us, incremental {cost['incremental_us_per_token']:.1f} us.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--baseline-repo", type=Path, default=None, help="another checkout to serve as `baseline`")
    args = parser.parse_args(argv)
    results = run(args.repeats, args.baseline_repo)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{NAME}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (output / f"{NAME}.md").write_text(render_markdown(results))
    for row in results["targets"]:
        print(f"{'PASS' if row['pass'] else 'FAIL'}  {row['target']}: {row['measured']:.3f} (wanted {row['wanted']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
