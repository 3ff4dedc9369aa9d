"""The `cpu-serve` benchmark's code path end to end on a tiny shape (three real servers, a few requests): every
measurement and target is written, and nothing failed. No timing is asserted (targets live in benchmarks/)."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run as benchmark_run  # noqa: E402
from benchmarks.serve import SERVERS, summarize  # noqa: E402
from modeling_safe_llava.bases import BASES  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("modeling_safe_llava.serving.app", reason="safe-llava serve's HTTP layer is serve-core's")
    config, _ = benchmark_run.load_config("cpu-serve")
    config.update(
        name="serve-smoke", new_tokens=4, concurrency=[1, 2], scaling_concurrency=2, requests={"1": 2, "2": 2},
        long_new_tokens=6, long_requests={"1": 1, "2": 2}, repeats=1, refusal_new_tokens=8, refusal_requests=2, moderation_requests=4, moderation_concurrency=2,
        reference_flops=False,
    )  # fmt: skip
    config["model"] = json.loads((REPO_ROOT / "configuration" / "tiny.json").read_text())
    config["model"].update(num_llm_safety_tokens=0)
    config["model"]["vision_config"]["image_size"] = 16
    folder = tmp_path_factory.mktemp("serve-bench")
    path = folder / "serve-smoke.json"
    path.write_text(json.dumps(config))
    exit_code = benchmark_run.main(["--config", str(path), "--output-dir", str(folder / "results")])
    return exit_code, folder / "results", config


def test_serve_benchmark_writes_every_measurement(smoke):
    exit_code, results_dir, config = smoke
    assert exit_code == 0
    results = json.loads((results_dir / "serve-smoke.json").read_text())
    for name in SERVERS:
        for concurrency in ("1", "2"):
            row = results["chat"][name][concurrency]
            assert row["failed"] == 0 and row["requests"] == 2 and row["requests_per_s"] > 0
            assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"]
    assert results["refusal"]["refuse"]["failed"] == results["refusal"]["allow"]["failed"] == 0
    assert results["moderation"]["failed"] == 0 and results["moderation"]["requests"] == 4
    assert results["metadata"]["server_exit_codes"]["safe"] == 0 and results["metadata"]["server_exit_codes"]["gate"] == 0
    assert set(results["gate_memory"]) == {base.name for base in BASES}
    assert all(memory["gate_bytes"] < memory["full_bytes"] for memory in results["gate_memory"].values())
    assert all(results["process_memory"][name]["peak_rss_mib"] > 0 for name in SERVERS)
    assert 0 < results["verdict_flop_share"]["config"]["share"] < 1
    long = results["long_answers"]
    assert long["new_tokens"] == 6 and long["1"]["failed"] == long["2"]["failed"] == 0 and long["2"]["requests"] == 2
    ceiling = results["batching_ceiling"]
    for new_tokens in ("4", "6"):  # in-process generate of the served model, batch 2 against batch 1
        assert ceiling[new_tokens]["gain"] == pytest.approx(
            2 * ceiling[new_tokens]["batch_1_s"] / ceiling[new_tokens]["batch_2_s"]
        )
    markdown = (results_dir / "serve-smoke.md").read_text()
    # throughput x2, scaling x2 (+ long answers), served / ceiling per answer length, gate x2, refusal
    assert markdown.count("**PASS**") + markdown.count("**FAIL**") == len(results["targets"]) == 2 + 3 + 2 + 2 + 1
    assert "its ceiling" in markdown
    assert "What these numbers do and do not prove" in markdown


def test_summarize_percentiles():
    rows = [{"ok": True, "latency": x, "ttft": x / 2} for x in (1.0, 2.0, 3.0, 4.0)] + [{"ok": False, "latency": 5.0, "ttft": None}]
    summary = summarize(rows, wall=10.0)
    assert summary["requests"] == 5 and summary["failed"] == 1 and summary["requests_per_s"] == 0.5
    assert summary["latency_p50_s"] == 3.0 and summary["ttft_p50_s"] == 1.25


def test_serve_latency_benchmark_writes_every_measurement(tmp_path):
    """`benchmarks.serve_latency` (issue 24's single-request table) end to end with one repeat: both servers and the
    in-process model answer every kind of request, and each target gets a verdict. No timing is asserted."""
    from benchmarks import serve_latency

    assert serve_latency.main(["--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cpu-serve-latency.json").read_text())
    assert {"health/stock", "chat_32/in-process", "refusal/safe", "moderation/safe-nowait"} <= set(results["latency"])
    codes = results["metadata"]["server_exit_codes"]
    assert codes["safe"] == codes["safe-nowait"] == codes["safe-interval-50"] == 0  # transformers serve: SIGTERM (-15)
    assert {"safe", "safe-interval-50", "stock", "in_process"} == set(results["stream"]["runs"])
    assert len(results["targets"]) == 12 and all(isinstance(row["pass"], bool) for row in results["targets"])
    assert "## Targets (issue 24)" in (tmp_path / "cpu-serve-latency.md").read_text()
