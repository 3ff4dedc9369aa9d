"""Item `audit_scaling`: images per second of `python -m modeling_safe_llava audit` under `torchrun` with 1 and more
processes, and the scaling efficiency `(images/s with N processes) / (N x images/s with 1)`.

The benchmark's SafeLlava (random weights marked trained) is saved with its processor to a temporary folder, next to
a folder of random PNG images of the model's image size. Each run audits the folder into a fresh output folder:

- CPU: `--device cpu`, `OMP_NUM_THREADS` = the config's torch threads per process (default 1), so N processes use
  N cores;
- CUDA: one GPU per process (`cuda:LOCAL_RANK`); process counts above the number of GPUs are skipped (recorded).

Measured per run: the scan throughput (images / the slowest rank's scan seconds, from `summary.json`'s `last_run`:
decoding, preprocessing and `assess_safety`, without process start and model loading) and the end-to-end wall
time of the launch. Process counts are interleaved (1 N N 1 ...), medians over `repeats`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_safe_llava.tiny import build_tiny_llava_processor
from modeling_safe_llava import SafeLlavaProcessor


REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"images": 48, "batch_size": 8, "processes": [1, 2], "repeats": 2, "threads_per_process": 1}


def settings(config: dict) -> dict:
    """The config's `"audit"` section over `DEFAULTS`."""
    merged = {**DEFAULTS, **{k: v for k, v in config.get("audit", {}).items() if not k.startswith("_")}}
    if 1 not in merged["processes"]:
        raise ValueError(f"audit.processes must include 1 (the baseline of the efficiency), got {merged['processes']}.")
    return merged


def audit_scaling_steps(config: dict) -> int:
    chosen = settings(config)
    return len(chosen["processes"]) * chosen["repeats"]


def _save_model(bm, folder: Path):
    processor = SafeLlavaProcessor.from_llava(
        build_tiny_llava_processor(bm.tokenizer, bm.stock.config),
        num_llm_safety_tokens=bm.safe.config.num_llm_safety_tokens,
    )
    bm.safe.save_pretrained(folder)
    processor.save_pretrained(folder)


def _write_images(folder: Path, count: int, size: int):
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = (np.random.RandomState(index).rand(size, size, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img_{index:05d}.png")


def _usable_processes(requested: list[int], device: str) -> tuple[list[int], list[int]]:
    """`(measured, skipped)` process counts: on CUDA at most one process per visible GPU."""
    if not device.startswith("cuda"):
        return list(requested), []
    import torch

    gpus = torch.cuda.device_count()
    return [n for n in requested if n <= gpus], [n for n in requested if n > gpus]


def _run_audit(processes: int, model_dir: Path, images: Path, output: Path, chosen: dict, device: str) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "modeling_safe_llava", "audit", "--model", str(model_dir), "--images", str(images),
        "--output", str(output), "--batch-size", str(chosen["batch_size"]), "--contact-sheet-size", "0",
    ]  # fmt: skip
    if device == "cpu":
        command += ["--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(chosen["threads_per_process"]), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"audit with {processes} process(es) failed:\n{finished.stderr[-3000:]}")
    summary = json.loads((output / "summary.json").read_text())
    ranks = summary["last_run"]["ranks"]
    scan_seconds = max(rank["seconds"] for rank in ranks)
    return {
        "wall_s": wall,
        "scan_s": scan_seconds,
        "images": summary["num_images"],
        "images_per_rank": [rank["images"] for rank in ranks],
        "scan_images_per_second": summary["num_images"] / scan_seconds,
        "end_to_end_images_per_second": summary["num_images"] / wall,
    }


def audit_scaling(bm, config: dict, bar) -> dict:
    """Runs the audit with each process count (interleaved, `repeats` times); see the module docstring."""
    chosen, device = settings(config), config["device"]
    measured, skipped = _usable_processes(chosen["processes"], device)
    runs = {n: [] for n in measured}
    with tempfile.TemporaryDirectory(prefix="audit-scaling-") as scratch:
        scratch = Path(scratch)
        _save_model(bm, scratch / "model")
        _write_images(scratch / "images", chosen["images"], bm.stock.config.vision_config.image_size)
        for repeat in range(chosen["repeats"]):
            order = measured if repeat % 2 == 0 else measured[::-1]
            for processes in order:
                output = scratch / f"out-{processes}-{repeat}"
                runs[processes].append(
                    _run_audit(processes, scratch / "model", scratch / "images", output, chosen, device)
                )
                bar.update(1)
    bar.update(len(skipped) * chosen["repeats"])
    by_processes = {str(n): _medians(n, values) for n, values in runs.items()}
    baseline = by_processes["1"]["scan_images_per_second"] if "1" in by_processes else None
    for entry in by_processes.values():
        n = entry["processes"]
        entry["scaling_efficiency"] = None if baseline is None else entry["scan_images_per_second"] / (n * baseline)
    return {
        "settings": chosen,
        "skipped_process_counts": skipped,
        "by_processes": by_processes,
        "checks": {
            "every_image_once": all(run["images"] == chosen["images"] for values in runs.values() for run in values),
            "every_rank_worked": all(min(run["images_per_rank"]) > 0 for values in runs.values() for run in values),
        },
    }


def _medians(processes: int, values: list[dict]) -> dict:
    return {
        "processes": processes,
        "scan_images_per_second": statistics.median(v["scan_images_per_second"] for v in values),
        "end_to_end_images_per_second": statistics.median(v["end_to_end_images_per_second"] for v in values),
        "scan_s_runs": [v["scan_s"] for v in values],
        "wall_s_runs": [v["wall_s"] for v in values],
        "images_per_rank": values[0]["images_per_rank"],
    }


def audit_section(results: dict) -> list[str]:
    """Markdown of the `audit_scaling` item."""
    entry = results["audit_scaling"]
    chosen = entry["settings"]
    lines = [
        "## 7. Dataset audit over processes (`torchrun ... -m modeling_safe_llava audit`)",
        "",
        f"{chosen['images']} random PNG images, batch {chosen['batch_size']}, {chosen['threads_per_process']} torch "
        "thread(s) per process on CPU (one GPU per process on CUDA). Scan: images / the slowest rank's scan time "
        "(decode, preprocess, `assess_safety`, write); end to end: images / wall time of the whole launch (process "
        "start and model loading included). Efficiency: scan images/s with N processes / (N x with 1).",
        "",
        "| processes | scan images/s | scaling efficiency | end-to-end images/s | images per rank | scan s (runs) |",
        "|---|---|---|---|---|---|",
    ]
    for value in entry["by_processes"].values():
        efficiency = "n/a" if value["scaling_efficiency"] is None else f"{value['scaling_efficiency']:.2f}"
        lines.append(
            f"| {value['processes']} | {value['scan_images_per_second']:.2f} | {efficiency} | "
            f"{value['end_to_end_images_per_second']:.2f} | {value['images_per_rank']} | "
            f"{', '.join(f'{s:.2f}' for s in value['scan_s_runs'])} |"
        )
    if entry["skipped_process_counts"]:
        lines.append(f"\nSkipped (more processes than GPUs): {entry['skipped_process_counts']}.")
    lines += ["", f"Checks: {entry['checks']}.", ""]
    return lines
