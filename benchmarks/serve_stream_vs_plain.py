"""Streamed vs non-streamed chat on one `safe-llava serve`: where the batching gain of `cpu-serve` goes.

    python -m benchmarks.serve_stream_vs_plain [--new-tokens 128] [--concurrency 8] [--requests 16] [--batch-wait-ms 60]

Starts `safe-llava serve` with `cpu-serve`'s model and flags (one torch thread), then measures requests/s at
concurrency 1 and at `--concurrency`, for plain and for streamed (SSE) chat completions. The two paths batch alike;
they differ only in how the tokens reach the client. Prints one line per measurement; wall time, idle machine wanted.
"""

import argparse
import asyncio
import tempfile
from pathlib import Path

from . import run as benchmark_run
from .serve import _allow_all, _images, build_folders, chat_body, measure_chat, measure_plain
from .serve_processes import start_safe_llava_serve


def measure(new_tokens: int, concurrency: int, requests: int, batch_wait_ms: float | None = None) -> dict:
    """`{(path, concurrency): requests/s}` for path `plain` and `stream`, concurrency 1 and `concurrency`
    (`batch_wait_ms`: the server's flag, default `cpu-serve`'s)."""
    from modeling_safe_llava import SafeLlavaConfig

    config, _ = benchmark_run.load_config("cpu-serve")
    config = {**config, "new_tokens": new_tokens}
    extra = _allow_all(SafeLlavaConfig().safety_type_labels[:-1])
    images = _images(config["model"]["vision_config"]["image_size"], 8, config["seed"])
    bodies = [chat_body("safe", image, config["prompt"], new_tokens, extra) for image in images]
    flags = [f"--max-batch-size={config['max_batch_size']}", f"--batch-wait-ms={batch_wait_ms if batch_wait_ms is not None else config['batch_wait_ms']}"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="safe-llava-stream-vs-plain-") as tmp:
        _, safe_folder = build_folders(config, Path(tmp))
        server = start_safe_llava_serve(safe_folder, Path(tmp) / "serve.log", *flags, threads=config["server_threads"])
        try:
            asyncio.run(measure_plain(server, "/v1/chat/completions", bodies, 1, 1))  # warm-up
            for level, count in ((1, max(2, requests // concurrency)), (concurrency, requests)):
                plain = asyncio.run(measure_plain(server, "/v1/chat/completions", bodies, count, level))
                streamed = asyncio.run(measure_chat(server, "safe", images, {**config, "requests": {str(level): count}}, level, extra))
                results["plain", level], results["stream", level] = plain["requests_per_s"], streamed["requests_per_s"]
        finally:
            server.stop()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="default: cpu-serve's (10)")
    args = parser.parse_args(argv)
    results = measure(args.new_tokens, args.concurrency, args.requests, args.batch_wait_ms)
    for path in ("plain", "stream"):
        low, high = results[path, 1], results[path, args.concurrency]
        print(f"{path}: {low:.3f} requests/s at concurrency 1, {high:.3f} at {args.concurrency}: gain {high / low:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
