"""The `cpu-serve` benchmark: serving throughput and latency, three servers side by side, one run, the same weights.

    python -m benchmarks.run --config cpu-serve

- **stock**: `transformers serve` with the stock LLaVA (default settings);
- **safe**: `safe-llava serve` with the head-only SafeLlava wrapping the same weights, safety on, every action `allow`
  (the verdict is computed for every request, and nothing changes the answer);
- **gate**: `safe-llava serve --upstream` (the verdict model only) in front of the same `transformers serve`.

Each server runs in its own process; the load generator (this process) sends chat completions with a data-URL image
and streams them (so time to first token is measured), `concurrency` at a time, for a fixed number of requests.
Servers are measured one after another within each repeat, in rotating order, so that machine load hits all three.
Also measured: the latency of a refused request against an allowed one (`new_tokens` each, on `safe`), and moderation
requests per second (`safe`). Targets (issue 18) are evaluated with PASS/FAIL; see `render_markdown` for what the
toy numbers do and do not prove.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .serve_processes import ServerProcess, save_stock_and_head_only, start_gate, start_safe_llava_serve
from .serve_processes import start_transformers_serve


SERVERS = ("stock", "safe", "gate")


# -- memory of one gate at the 7B shape --------------------------------------------------------------------------


def gate_memory(base_name: str, bytes_per_value: int = 2, embedding_rows: int | None = 2) -> dict:
    """Weights of one gate (the verdict model's parts: vision tower, safety module, and of the input embeddings the
    `embedding_rows` rows it keeps, `serving.verdict.query_token_ids`: BOS and the image placeholder for every
    registered base; None: the whole table) against the whole head-only SafeLlava at the base's 7B-class preset
    (`Base.large_preset`), in bytes at `bytes_per_value` (bf16: 2), counted on the meta device. Any base of the
    registry (`safe-llava demo --base` names)."""
    from modeling_safe_llava.bases import base_named
    from modeling_safe_llava.presets import load_json_preset
    from modeling_safe_llava.safety_loading_safe_llava import verdict_parts

    base = base_named(base_name)
    preset = load_json_preset("configuration", base.large_preset)
    fields = {k: v for k, v in preset.items() if not k.startswith("_") and k not in ("base_checkpoint", "base_model_type")}
    with torch.device("meta"):
        model = base.model_class(base.config_class(**{**fields, "num_llm_safety_tokens": 0}))
    size = lambda module: sum(p.numel() for p in module.parameters()) * bytes_per_value  # noqa: E731
    parts = {name: size(model.get_submodule(prefix.rstrip("."))) for name, prefix in verdict_parts(model).items()}
    if embedding_rows is not None:
        table = model.get_input_embeddings().weight
        parts["embed_tokens"] = embedding_rows * table.shape[1] * bytes_per_value
    return {"base": base_name, "preset": base.large_preset, "bytes_per_value": bytes_per_value, **parts,
            "gate_bytes": sum(parts.values()), "full_bytes": size(model)}  # fmt: skip


def verdict_flop_share(model_spec: dict, new_tokens: int, text_tokens: int = 20) -> dict:
    """FLOPs of the gate's verdict (vision tower, safety projector and head) over those of stock generation of
    `new_tokens` (one image, `text_tokens` of text), at a model spec's shape (meta device): the compute a gate adds
    in front of an engine, per request."""
    from .flops import flop_report
    from .models import build_meta_pair, model_spec_dict

    stock, safe = build_meta_pair({**model_spec_dict(model_spec), "num_llm_safety_tokens": 0})
    report = flop_report(stock, safe, text_tokens, new_tokens, "meta")
    c = report["components"]
    verdict = c["vision_tower"] + c["safety_projector"] + c["safety_head"]
    return {"verdict_flops": verdict, "stock_generate_flops": report["totals"]["stock_generate"],
            "share": verdict / report["totals"]["stock_generate"], "new_tokens": new_tokens}  # fmt: skip


# -- the load generator ------------------------------------------------------------------------------------------


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _images(size: int, count: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    return [_data_url(Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))) for _ in range(count)]


def chat_body(model: str, image_url: str, prompt: str, new_tokens: int, extra: dict | None = None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": new_tokens}
    return {**body, "temperature": 0, **(extra or {})}


async def _one_streamed(client, url: str, body: dict) -> dict:
    """One streamed chat completion: latency, time to first content token, and whether it succeeded."""
    started = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        ok = response.status_code == 200
        async for line in response.aiter_lines():
            if first is None and line.startswith("data:") and '"content":"' in line.replace(": ", ":"):
                first = time.perf_counter() - started
    latency = time.perf_counter() - started
    return {"ok": ok, "latency": latency, "ttft": first if first is not None else latency}


async def _one_plain(client, url: str, path: str, body: dict) -> dict:
    started = time.perf_counter()
    response = await client.post(url + path, json=body)
    latency = time.perf_counter() - started
    usage = response.json().get("usage") if response.status_code == 200 else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return {"ok": response.status_code == 200, "latency": latency, "ttft": None, "completion_tokens": tokens}


async def _load(make_call, requests: int, concurrency: int) -> dict:
    """`requests` calls, `concurrency` in flight at a time; requests/s, latency and TTFT percentiles."""
    queue = list(range(requests))
    results = []

    async def worker():
        while queue:
            index = queue.pop()
            results.append(await make_call(index))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    latencies = sorted(r["latency"] for r in results)
    tokens = [r["completion_tokens"] for r in results if r.get("completion_tokens") is not None]
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {
        "requests": len(results),
        "failed": sum(not r["ok"] for r in results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall if wall > 0 else 0.0,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "ttft_p50_s": _percentile(ttfts, 50) if ttfts else None,
        "ttft_p95_s": _percentile(ttfts, 95) if ttfts else None,
        "completion_tokens_mean": statistics.fmean(tokens) if tokens else None,
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _client():
    import httpx2

    return httpx2.AsyncClient(timeout=httpx2.Timeout(600.0), limits=httpx2.Limits(max_connections=64), trust_env=False)


async def measure_chat(server: ServerProcess, model: str, images: list[str], config: dict, concurrency: int, extra):
    async with _client() as client:
        body = lambda i: chat_body(model, images[i % len(images)], config["prompt"], config["new_tokens"], extra)  # noqa: E731
        return await _load(lambda i: _one_streamed(client, server.url, body(i)), config["requests"][str(concurrency)], concurrency)


async def measure_plain(server, path: str, bodies: list[dict], requests: int, concurrency: int):
    async with _client() as client:
        return await _load(lambda i: _one_plain(client, server.url, path, bodies[i % len(bodies)]), requests, concurrency)


# -- the run -----------------------------------------------------------------------------------------------------


def build_folders(config: dict, folder: Path) -> tuple[Path, Path]:
    """The stock LLaVA of the config's shape (random weights, seed) and the head-only SafeLlava wrapping them."""
    from modeling_safe_llava.tiny import build_tiny_llava_processor, build_tiny_tokenizer

    from .models import split_model_spec

    tokenizer = build_tiny_tokenizer()
    llava_fields, safety = split_model_spec(config["model"], tokenizer)
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(config["seed"])
    llava = LlavaForConditionalGeneration(LlavaConfig(**llava_fields)).eval()
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_tiny_llava_processor(tokenizer, llava.config)
    return save_stock_and_head_only(folder, llava, processor, safety=safety)


def _start_all(stock_folder, safe_folder, logs: Path, config: dict) -> dict[str, ServerProcess]:
    threads = config.get("server_threads", 1)
    flags = [f"--max-batch-size={config['max_batch_size']}", f"--batch-wait-ms={config['batch_wait_ms']}"]
    servers = {"stock": start_transformers_serve(stock_folder, logs / "transformers-serve.log", threads=threads)}
    servers["safe"] = start_safe_llava_serve(safe_folder, logs / "safe-llava-serve.log", *flags, threads=threads)
    servers["gate"] = start_gate(safe_folder, servers["stock"], str(stock_folder), logs / "gate.log", *flags, threads=threads)
    return servers


def run_serve_benchmark(config: dict, command: str = "") -> dict:
    """Builds the folders, starts the three servers, measures, stops them; returns the results dict."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="safe-llava-serve-bench-") as tmp:
        stock_folder, safe_folder = build_folders(config, Path(tmp))
        servers = _start_all(stock_folder, safe_folder, Path(tmp) / "logs", config)
        try:
            results = asyncio.run(_measure_all(servers, str(stock_folder), config))
            results["process_memory"] = {name: process_memory(server.process.pid) for name, server in servers.items()}
        finally:
            exit_codes = {name: server.stop() for name, server in servers.items()}
        results["batching_ceiling"] = batching_ceiling(safe_folder, config)  # after the servers: an idle machine
    results["metadata"] = _metadata(config, command, time.perf_counter() - started, exit_codes)
    from modeling_safe_llava.bases import BASES

    results["gate_memory"] = {base.name: gate_memory(base.name) for base in BASES}
    results["verdict_flop_share"] = {"config": verdict_flop_share(config["model"], config["new_tokens"])}
    if config.get("reference_flops", True):  # about half a minute of meta-device counting at the 7B shape
        reference = verdict_flop_share({"preset": config.get("reference_preset", "7b.json")}, 64)
        results["verdict_flop_share"]["reference_7b"] = reference
    results["config"] = config
    results["targets"] = evaluate_targets(results, config)
    return results


def process_memory(pid: int) -> dict:
    """Resident memory of a server process now and at its peak, in MiB (Linux `/proc`; empty elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {key: int(fields[field].split()[0]) / 1024 for key, field in (("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM"))}


def _allow_all(type_names) -> dict:
    return {"safety_threshold": 0.0, "safety_actions": {name: "allow" for name in type_names}}


async def _measure_all(servers: dict, stock_model: str, config: dict) -> dict:
    from modeling_safe_llava import SafeLlavaConfig

    size = config["model"]["vision_config"]["image_size"]
    images = _images(size, 8, config["seed"])
    type_names = config.get("_type_names") or SafeLlavaConfig().safety_type_labels[:-1]
    names = {"stock": stock_model, "safe": "safe", "gate": "safe"}
    extra = {"stock": None, "safe": _allow_all(type_names), "gate": _allow_all(type_names)}
    for name, server in servers.items():  # warm up every server (first-request costs, lazy loads)
        await measure_chat(server, names[name], images, {**config, "requests": {"1": 2}}, 1, extra[name])
    chat = {name: {} for name in SERVERS}
    for repeat in range(config["repeats"]):
        for concurrency in config["concurrency"]:
            order = SERVERS[repeat % 3 :] + SERVERS[: repeat % 3]
            for name in order:
                runs = chat[name].setdefault(str(concurrency), [])
                runs.append(await measure_chat(servers[name], names[name], images, config, concurrency, extra[name]))
    results = {"chat": {name: {c: _median_run(runs) for c, runs in per.items()} for name, per in chat.items()}}
    results["long_answers"] = await _measure_long_answers(servers["safe"], images, config, extra["safe"])
    results["refusal"] = await _measure_refusal(servers["safe"], images, config, type_names)
    results["moderation"] = await _measure_moderation(servers["safe"], images, config)
    return results


def _median_run(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and runs[0][k] is not None]
    merged = {k: statistics.median(r[k] for r in runs) for k in keys}
    merged["failed"] = sum(r["failed"] for r in runs)
    merged["runs"] = runs
    return merged


def _scaling_lengths(config: dict) -> list[int]:
    """Answer lengths (new tokens) of the scaling measurements: the chat load's, then `long_new_tokens` if set."""
    return [config["new_tokens"], *([config["long_new_tokens"]] if config.get("long_new_tokens") else [])]


async def _measure_long_answers(server, images, config, extra) -> dict:
    """`safe` at concurrency 1 and `scaling_concurrency` with `long_new_tokens`-token answers (interleaved repeats):
    how the batching's gain grows as decoding, which batching shares, outweighs prefill, which it cannot."""
    if not config.get("long_new_tokens"):
        return {}
    long_config = {**config, "new_tokens": config["long_new_tokens"], "requests": config["long_requests"]}
    runs = {}
    for _ in range(config["repeats"]):
        for concurrency in (1, config["scaling_concurrency"]):
            run = await measure_chat(server, "safe", images, long_config, concurrency, extra)
            runs.setdefault(str(concurrency), []).append(run)
    return {"new_tokens": config["long_new_tokens"], **{c: _median_run(r) for c, r in runs.items()}}


def batching_ceiling(safe_folder: Path, config: dict) -> dict:
    """
    The most any server could gain from batching on this machine: in-process `generate` of the served head-only
    SafeLlava (same settings as the chat load, every action `allow`), batch 1 against batch `scaling_concurrency`, on
    the servers' torch thread count, CPU time of this process. Rows per second at batch B over rows per second at
    batch 1, for each answer length of `_scaling_lengths`. Prefill is compute-bound (linear in the batch); only
    decoding is shared, so the ceiling rises with the answer's length.
    """
    from modeling_safe_llava.bases import load_safe_model, load_safe_processor

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.get("server_threads", 1))
    try:
        model = load_safe_model(str(safe_folder)).eval()
        processor = load_safe_processor(str(safe_folder), model.config.model_type)
        allow = _allow_all(model.config.risky_type_labels)
        images = [_decode_data_url(url) for url in _images(config["model"]["vision_config"]["image_size"], 8, config["seed"])]
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config["prompt"]}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        batch = config["scaling_concurrency"]
        out = {"batch_size": batch, "threads": torch.get_num_threads(), "clock": "process_cpu"}
        for new_tokens in _scaling_lengths(config):
            seconds = {}
            for size in (1, batch):
                inputs = processor(
                    text=[text] * size, images=[[images[i % len(images)]] for i in range(size)], return_tensors="pt"
                )
                seconds[size] = _best_generate_seconds(model, inputs, new_tokens, allow, config["repeats"])
            out[str(new_tokens)] = {
                "batch_1_s": seconds[1], f"batch_{batch}_s": seconds[batch],
                "gain": batch * seconds[1] / seconds[batch],
            }  # fmt: skip
        return out
    finally:
        torch.set_num_threads(previous_threads)


def _best_generate_seconds(model, inputs, new_tokens: int, allow: dict, repeats: int) -> float:
    """Fastest of `repeats` greedy `generate` calls (after one warm-up), CPU time of this process."""
    kwargs = {**inputs, **allow, "max_new_tokens": new_tokens, "do_sample": False}
    model.generate(**kwargs)
    times = []
    for _ in range(repeats):
        started = time.process_time()
        model.generate(**kwargs)
        times.append(time.process_time() - started)
    return min(times)


def _decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


async def _measure_refusal(server, images, config, type_names) -> dict:
    """Latency of a refused request against an allowed one, `new_tokens` each (`safe`, non-streamed, one at a time)."""
    out = {}
    for action in ("allow", "refuse"):
        extra = {"safety_threshold": 0.0, "safety_actions": {name: action for name in type_names}}
        bodies = [chat_body("safe", image, config["prompt"], config["refusal_new_tokens"], extra) for image in images]
        out[action] = await measure_plain(server, "/v1/chat/completions", bodies, config["refusal_requests"], 1)
    out["ratio_p50"] = out["refuse"]["latency_p50_s"] / out["allow"]["latency_p50_s"]
    return out


async def _measure_moderation(server, images, config) -> dict:
    bodies = [{"model": "safe", "input": [{"type": "image_url", "image_url": {"url": image}}]} for image in images]
    concurrency = config["moderation_concurrency"]
    return await measure_plain(server, "/v1/moderations", bodies, config["moderation_requests"], concurrency)


# -- targets and report ------------------------------------------------------------------------------------------


def evaluate_targets(results: dict, config: dict) -> list[dict]:
    targets, chat = config["targets"], results["chat"]
    rows = []
    for c in config["concurrency"]:
        c = str(c)
        ratio = chat["safe"][c]["requests_per_s"] / chat["stock"][c]["requests_per_s"]
        rows.append(_row(f"safe / stock requests/s at concurrency {c}", ratio, targets["safe_throughput_ratio_min"], True))
    c_hi, c_lo = str(config["scaling_concurrency"]), "1"
    for name in ("safe", "stock"):
        scaling = chat[name][c_hi]["requests_per_s"] / chat[name][c_lo]["requests_per_s"]
        rows.append(_row(f"{name}: requests/s at concurrency {c_hi} / at 1", scaling, targets["scaling_min"], True))
    rows += _long_answer_rows(results, config)
    for c in config["concurrency"]:
        c = str(c)
        overhead = chat["gate"][c]["latency_p50_s"] / chat["stock"][c]["latency_p50_s"]
        rows.append(_row(f"gate / upstream alone p50 latency at concurrency {c}", overhead, targets["gate_latency_ratio_max"], False))
    rows.append(_row("refused / allowed p50 latency", results["refusal"]["ratio_p50"], targets["refusal_ratio_max"], False))
    return rows


def _long_answer_rows(results: dict, config: dict) -> list[dict]:
    """The scaling target again with `long_new_tokens`-token answers, and, for each answer length, the server's gain
    over the in-process ceiling (`batching_ceiling`): what share of what batching can give on this machine the server
    delivers (`targets.ceiling_share_min`)."""
    rows, long, ceiling = [], results.get("long_answers") or {}, results.get("batching_ceiling") or {}
    c_hi, targets = str(config["scaling_concurrency"]), config["targets"]
    gains = {config["new_tokens"]: _gain(results["chat"]["safe"], c_hi)}
    if long:
        gains[long["new_tokens"]] = _gain(long, c_hi)
        rows.append(_row(f"safe: requests/s at concurrency {c_hi} / at 1, {long['new_tokens']}-token answers",
                         gains[long["new_tokens"]], targets["scaling_min"], True))  # fmt: skip
    for new_tokens, gain in gains.items() if "ceiling_share_min" in targets else ():
        if str(new_tokens) in ceiling:
            share = gain / ceiling[str(new_tokens)]["gain"]
            rows.append(_row(f"safe's gain at concurrency {c_hi} / in-process generate's at batch {c_hi}, "
                             f"{new_tokens}-token answers", share, targets["ceiling_share_min"], True))  # fmt: skip
    return rows


def _gain(per_concurrency: dict, c_hi: str) -> float:
    return per_concurrency[c_hi]["requests_per_s"] / per_concurrency["1"]["requests_per_s"]


def _row(name, measured, target, at_least) -> dict:
    passed = measured >= target if at_least else measured <= target
    return {"name": name, "measured": float(measured), "target": f"{'>=' if at_least else '<='} {target}", "passed": bool(passed)}


def _metadata(config, command, wall, exit_codes) -> dict:
    import transformers

    return {
        "config": config["name"],
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "wall_time_s": wall,
        "server_exit_codes": exit_codes,
    }


def write_results(results: dict, output_dir: Path, name: str) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{name}.json", "markdown": output_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths["markdown"].write_text(render_markdown(results))
    return {k: str(v) for k, v in paths.items()}


def _batching_lines(results: dict, config: dict) -> list[str]:
    """The batching section: `safe`'s gain from concurrency 1 to `scaling_concurrency` per answer length, next to the
    in-process ceiling (`batching_ceiling`)."""
    ceiling, long = results.get("batching_ceiling") or {}, results.get("long_answers") or {}
    if not ceiling:
        return []
    c_hi = str(config["scaling_concurrency"])
    served = {config["new_tokens"]: results["chat"]["safe"]}
    if long:
        served[long["new_tokens"]] = long
    lines = [
        "",
        f"## Batching: the gain from concurrency 1 to {c_hi}, and its ceiling",
        "",
        f"The ceiling is in-process `generate` of the served model, batch {c_hi} against batch 1 (rows/s over rows/s; "
        f"{ceiling['threads']} torch thread(s), CPU time of the benchmark process, fastest of {config['repeats']}, run "
        "after the servers stopped). No server can batch better than the model computes.",
        "",
        f"| answer tokens | `safe` requests/s at 1 | at {c_hi} | served gain | in-process batch 1 (s) | batch {c_hi} (s) "
        "| ceiling gain | served / ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for new_tokens, rows in served.items():
        bound = ceiling.get(str(new_tokens))
        if bound is None:
            continue
        gain = _gain(rows, c_hi)
        lines.append(
            f"| {new_tokens} | {rows['1']['requests_per_s']:.2f} | {rows[c_hi]['requests_per_s']:.2f} | {gain:.2f} | "
            f"{bound['batch_1_s']:.3f} | {bound[f'batch_{c_hi}_s']:.3f} | {bound['gain']:.2f} | {gain / bound['gain']:.2f} |"
        )
    return lines


def render_markdown(results: dict) -> str:
    meta, config = results["metadata"], results["config"]
    lines = [
        f"# Serving benchmark: `{meta['config']}`",
        "",
        f"- **Date (UTC):** {meta['date_utc']}; wall time {meta['wall_time_s']:.0f} s; {meta['cpu_count']} cores "
        f"(load after: {', '.join(f'{x:.1f}' for x in meta['load_average_after'])}); torch {meta['torch']}, "
        f"transformers {meta['transformers']}",
        f"- **Command:** `{meta['command']}`",
        f"- **Servers** (one process each, {config.get('server_threads', 1)} torch thread(s)): `stock` = `transformers "
        "serve` with the stock LLaVA (default settings); `safe` = `safe-llava serve`, safety on, every action `allow`; "
        "`gate` = `safe-llava serve --upstream` in front of that same `transformers serve`. Same random weights.",
        f"- **Load:** streamed chat completions, one {config['model']['vision_config']['image_size']} px data-URL image "
        f"each, greedy, {config['new_tokens']} new tokens; medians over {config['repeats']} interleaved repeats.",
        "",
        "## Targets",
        "",
        "| target | measured | wanted | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['measured']:.3f} | {r['target']} | **{'PASS' if r['passed'] else 'FAIL'}** |" for r in results["targets"]]
    lines += ["", "## Chat completions", "", "| server | concurrency | requests/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | failed |", "|---|---|---|---|---|---|---|"]
    for name in SERVERS:
        for c, row in results["chat"][name].items():
            lines.append(
                f"| {name} | {c} | {row['requests_per_s']:.2f} | {row['latency_p50_s']:.3f} | {row['latency_p95_s']:.3f} "
                f"| {row.get('ttft_p50_s', float('nan')):.3f} | {row['failed']} |"
            )
    lines += _batching_lines(results, config)
    refusal, moderation = results["refusal"], results["moderation"]
    lines += [
        "",
        "## Refusals and moderation (`safe`)",
        "",
        f"- Refused request p50 {refusal['refuse']['latency_p50_s']:.3f} s vs allowed {refusal['allow']['latency_p50_s']:.3f} s "
        f"(max_tokens {config['refusal_new_tokens']}; the allowed answers had {refusal['allow']['completion_tokens_mean']} "
        f"tokens on average, the refusals {refusal['refuse']['completion_tokens_mean']}): ratio {refusal['ratio_p50']:.3f}.",
        f"- Moderation: {moderation['requests_per_s']:.1f} requests/s at concurrency {config['moderation_concurrency']} "
        f"(p50 {moderation['latency_p50_s']:.3f} s).",
        "",
        "## Memory of one gate at each base's 7B-class preset (bf16, counted on the meta device)",
        "",
        "| base (preset) | vision tower GiB | safety module GiB | input embeddings GiB | gate GiB | whole head-only model GiB |",
        "|---|---|---|---|---|---|",
        *(
            f"| {m['base']} (`{m['preset']}`) | {m['vision_tower'] / 2**30:.2f} | {m['safety_module'] / 2**30:.2f} | "
            f"{m['embed_tokens'] / 2**30:.2f} | **{m['gate_bytes'] / 2**30:.2f}** | {m['full_bytes'] / 2**30:.2f} |"
            for m in results["gate_memory"].values()
        ),
        "",
        "Measured here, each server process's resident memory at its peak (MiB; Python, torch and the web stack "
        "included): " + ", ".join(f"{name} {m.get('peak_rss_mib', float('nan')):.0f}" for name, m in results.get("process_memory", {}).items())
        + ". The gate holds no language model; at this toy shape the runtime dominates, at 7B the weights above do.",
        "",
        "## What these numbers do and do not prove",
        "",
        f"- The gate's own compute per request (vision tower, safety projector and head, one image) is "
        f"{results['verdict_flop_share']['config']['share']:.1%} of stock generation's FLOPs at this shape "
        f"({config['new_tokens']} new tokens), and {results['verdict_flop_share'].get('reference_7b', {}).get('share', float('nan')):.1%} "
        "at LLaVA-1.5-7B's shape with 64 new tokens (counted on the meta device). At concurrency 1 the gate's latency is "
        "the engine's plus that verdict, run before the engine starts, plus one loopback hop that carries the image "
        "again: the toy shape overstates the verdict's share.",
        "- They compare three servers on the same toy model and machine, side by side: relative costs (the verdict's "
        "overhead, the gate's extra hop, a refusal's shortcut, the batching's gain) under the same load.",
        "- They say nothing about absolute throughput on a GPU or at the 7B shape: random weights, a 2-core CPU shared "
        "with other work, one torch thread per server, and a load generator on the same cores.",
        "- `transformers serve` (default settings) generates one request at a time, so concurrency buys it little; "
        "`safe-llava serve` batches compatible requests. The gate's latency is the upstream's plus one verdict and "
        "one loopback hop; on a GPU engine (vLLM) the verdict's share is smaller still.",
        "",
    ]
    return "\n".join(lines) + "\n"
