"""The benchmark machinery end to end on the `micro` config (seconds): every measurement is written, the sanity
checks the benchmark records hold, and the GPU config refuses cleanly without CUDA. No timing is asserted."""

import json
import sys
from pathlib import Path

import pytest
import torch

# `benchmarks/` is a folder of the repository, not an installed package: `python -m pytest` (scripts/test.sh) puts
# the repository root on sys.path, the bare `pytest` entry point does not.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run as benchmark_run  # noqa: E402
from benchmarks.measure import LiveTensorBytes  # noqa: E402
from benchmarks.models import build_models  # noqa: E402
from benchmarks.scenarios import repeats_for  # noqa: E402


@pytest.fixture(scope="module")
def micro_results(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark-results")
    exit_code = benchmark_run.main(["--config", "micro", "--output-dir", str(output_dir)])
    results = json.loads((output_dir / "micro.json").read_text())
    config, _ = benchmark_run.load_config("micro")
    return exit_code, output_dir, results, config


def test_run_writes_json_markdown_and_latest(micro_results):
    exit_code, output_dir, results, _ = micro_results
    assert exit_code == 0
    markdown = (output_dir / "micro.md").read_text()
    assert (output_dir / "LATEST.md").read_text() == markdown
    for heading in ("## Targets", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Parameters and FLOPs", "## Method"):
        assert heading in markdown
    # one PASS/FAIL verdict in the table per evaluated target
    verdicts = markdown.count("**PASS**") + markdown.count("**FAIL**")
    assert verdicts == len(results["targets"])


def test_run_is_stamped(micro_results):
    _, _, results, _ = micro_results
    meta = results["metadata"]
    assert meta["config"] == "micro"
    assert meta["torch"] == torch.__version__
    for key in ("transformers", "peft", "device", "date_utc", "git_commit", "load_average_before", "load_average_after"):
        assert meta[key], key
    assert set(meta["load_average_per_item"]) == set(benchmark_run.DEFAULT_ITEMS)
    assert meta["timer"] == results["config"]["timer"]


def test_every_measurement_is_present(micro_results):
    _, _, results, config = micro_results
    for batch in config["generate_batch_sizes"]:
        entry = results["generate_overhead"][f"batch_{batch}"]
        for phase in ("end_to_end", "prefill"):
            assert set(entry[phase]) == {"stock", "safe", "head_only"}
            repeats = repeats_for(config, "generate" if phase == "end_to_end" else "prefill", batch)
            for timing in entry[phase].values():
                assert len(timing["wall_runs_s"]) == len(timing["process_cpu_runs_s"]) == repeats
        for name in ("stock", "safe", "head_only"):
            memory = entry["memory"][name]
            assert memory["peak_bytes"] == memory["resident_bytes"] + memory["transient_peak_bytes"]
            assert memory["transient_peak_bytes"] > 0
        for ratio in ("end_to_end_safe_vs_stock", "prefill_head_only_vs_stock", "peak_memory_safe_vs_stock"):
            assert entry["ratios"][ratio] > 0
    for batch in config["paper_way_batch_sizes"]:
        assert results["paper_way"][f"batch_{batch}"]["ratios"]["paper_way_vs_ours"] > 0
    assert results["refusal"]["ratios"]["all_refused_vs_full"] > 0
    for batch in config["throughput_batch_sizes"]:
        assert results["assess_throughput"][f"batch_{batch}"]["images_per_second"]["assess_safety"] > 0
    training = results["training"]
    assert set(training["timing"]) == set(training["memory"]) == {"stock_lora", "stage1", "stage2"}
    trainable = training["trainable_parameters"]
    # stage 1 trains exactly the safety modules; stage 2 the same LoRA as the stock baseline
    assert trainable["stage1"] == results["flops"]["config"]["parameters"]["safety_total"]
    assert trainable["stage2"] == trainable["stock_lora"] > 0
    assert all(training["flops_per_step"][name] > 0 for name in trainable)


def test_compared_calls_do_what_they_claim(micro_results):
    """The recorded checks: each side generated the asked tokens, head-only SafeLlava's tokens are stock LLaVA's,
    ours encodes images once and the paper's way twice, an all-refused batch never reaches the language model."""
    _, _, results, config = micro_results
    for entry in results["generate_overhead"].values():
        checks = entry["checks"]
        assert checks["stock_new_tokens"] == checks["safe_new_tokens"] == checks["head_only_new_tokens"] == config["new_tokens"]
        assert checks["head_only_tokens_equal_stock"] is True
    for entry in results["paper_way"].values():
        assert entry["checks"]["vision_tower_calls"] == {"ours": 1, "paper_way": 2}
        assert entry["checks"]["same_tokens"] is True
    call = results["call_overhead"]
    assert call["checks"]["safety_head_calls"] == 0  # nothing judged: the head never runs
    assert set(call["python_outside_ops_s"]) == set(call["torch_ops_per_call"]) == {"stock", "safe", "head_only"}
    refusal = results["refusal"]["checks"]
    assert refusal["all_rows_refused"] is True
    assert refusal["language_model_calls_when_refused"] == 0
    for entry in results["assess_throughput"].values():
        assert entry["checks"]["language_model_calls_in_assess"] == 0


def test_flop_and_parameter_accounting(micro_results):
    _, _, results, _ = micro_results
    flops = results["flops"]
    verification = flops["verification"]
    assert verification["meta_equals_real"] is True  # FlopCounterMode on meta counts what real tensors count
    assert verification["components_add_up"] is True  # per-module counts cover the whole forward
    parameters = flops["reference_7b"]["parameters"]
    assert parameters["non_safety_params_match_stock"] is True
    assert parameters["safety_total"] == sum(parameters["safety_by_module"].values())
    for section in (flops["reference_7b"], flops["config"]):
        totals = section["totals"]
        assert totals["safe_prefill"] > totals["head_only_prefill"] > totals["stock_prefill"] > totals["assess_safety"]
    memory = flops["reference_7b"]["memory_estimate_bf16"]["by_batch"]
    assert all(entry["safe_vs_stock"] > entry["head_only_vs_stock"] > 1.0 for entry in memory.values())


def test_targets_have_verdicts(micro_results):
    _, _, results, config = micro_results
    rows = results["targets"]
    assert {row["item"] for row in rows} == {1, 2, 3, 4, 6}
    expected = 5 * len(config["generate_batch_sizes"]) + 1 + len(config["paper_way_batch_sizes"]) + 1
    expected += len(config["throughput_batch_sizes"])
    assert len(rows) == expected
    assert all(isinstance(row["passed"], bool) for row in rows)


def test_compared_models_share_one_copy_of_the_stock_weights():
    config, _ = benchmark_run.load_config("micro")
    bm = build_models(config)

    def storages(model, safety: bool):
        return {
            tensor.untyped_storage().data_ptr()
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if name.startswith("model.safety_module.") == safety
        }

    stock = storages(bm.stock, safety=False)
    assert storages(bm.safe, safety=False) == storages(bm.head_only, safety=False) == stock
    assert storages(bm.head_only, safety=True) < storages(bm.safe, safety=True)  # all but the LLM safety tokens
    assert not storages(bm.safe, safety=True) & stock
    assert not any(tensor.is_meta for model in (bm.safe, bm.head_only) for tensor in model.state_dict().values())
    assert bm.safe.model.safety_module.tokens.std() > 0 and bm.safe.model.safety_module.llm_tokens.std() > 0  # initialised


def test_memory_only_item_measures_every_model_without_touching_latest(tmp_path):
    config, _ = benchmark_run.load_config("micro")
    config_path = tmp_path / "micro-memory.json"
    config_path.write_text(json.dumps({**config, "name": "micro-memory", "items": ["generate_memory"], "update_latest": False}))
    assert benchmark_run.main(["--config", str(config_path), "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "micro-memory.json").read_text())
    assert not (tmp_path / "LATEST.md").exists()
    assert set(results) >= {"generate_memory", "flops", "targets"} and "generate_overhead" not in results
    for batch in config["generate_batch_sizes"]:
        entry = results["generate_memory"][f"batch_{batch}"]
        assert set(entry["checks"].values()) == {config["new_tokens"]}
        for name, memory in entry["memory"].items():
            assert memory["peak_bytes"] == memory["resident_bytes"] + memory["transient_peak_bytes"] > 0, name
        assert entry["ratios"]["peak_memory_safe_vs_stock"] == pytest.approx(
            entry["memory"]["safe"]["peak_bytes"] / entry["memory"]["stock"]["peak_bytes"]
        )
    memory_rows = [row for row in results["targets"] if "peak memory" in row["name"]]
    assert len(memory_rows) == 2 * len(config["generate_batch_sizes"])
    assert "## 1. `generate` peak memory" in (tmp_path / "micro-memory.md").read_text()


def test_live_tensor_bytes_counts_what_the_block_creates_until_it_is_freed():
    existing = torch.zeros(1024)
    with LiveTensorBytes() as tracker:
        view, _ = existing[:512], existing.add_(1)  # a view and an in-place operator create nothing
        assert tracker.peak == 0
        first, second = torch.ones(256), torch.ones(512)  # 1 KiB + 2 KiB
        del first
        third = torch.ones(128)  # 0.5 KiB, into the room the first one left
        assert tracker.live == 2048 + 512
        assert (second.sum() + third.sum()).item() == 640  # a 0-d result: 4 bytes, freed at once
        del second, third
    assert tracker.peak == 1024 + 2048 and tracker.live == 0


def test_gpu_config_refuses_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exit_code = benchmark_run.main(["--config", "gpu-7b", "--output-dir", str(tmp_path)])
    assert exit_code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_config_lists_available():
    with pytest.raises(ValueError, match="cpu-small"):
        benchmark_run.load_config("no-such-config")


def test_calibration_item_compares_the_same_generation(micro_results):
    """Item 6: calibrated temperatures change the level head's probabilities but not the tokens of an unflagged
    generation."""
    _, _, results, config = micro_results
    for batch in config["generate_batch_sizes"]:
        entry = results["calibration"][f"batch_{batch}"]
        assert entry["checks"] == {"same_tokens": True, "new_tokens": config["new_tokens"], "level_probs_changed": True}
        assert set(entry["timing"]) == {"uncalibrated", "calibrated"}
        assert entry["ratios"]["calibrated_vs_uncalibrated"] > 0
    assert any(row["item"] == 6 for row in results["targets"])


# -- every base ---------------------------------------------------------------------------------------------------

OTHER_BASES = {
    "micro-llava-next": "LlavaNextForConditionalGeneration",
    "micro-gemma3": "Gemma3ForConditionalGeneration",
    "micro-qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


@pytest.fixture(scope="module", params=sorted(OTHER_BASES))
def base_results(request, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp(request.param)
    exit_code = benchmark_run.main(["--config", request.param, "--output-dir", str(output_dir)])
    results = json.loads((output_dir / f"{request.param}.json").read_text())
    return request.param, exit_code, results, (output_dir / f"{request.param}.md").read_text()


def test_every_base_runs_every_item_against_its_own_stock_class(base_results):
    """`cpu-small` per base: the same measurements and checks as LLaVA-1.5's, against the base's stock class with
    the same weights; FLOP predictions are n/a (no FLOP model) and the parameter counts come from the base's preset."""
    name, exit_code, results, markdown = base_results
    assert exit_code == 0
    meta = results["metadata"]
    assert meta["stock_class"] == OTHER_BASES[name] and meta["stock_class"] in markdown.splitlines()[0]
    assert meta["prompt_length"]["safe"] == meta["prompt_length"]["stock"] + results["config"]["model"]["num_llm_safety_tokens"]
    for entry in results["generate_overhead"].values():
        assert entry["checks"]["head_only_tokens_equal_stock"] is True
    for entry in results["paper_way"].values():
        assert entry["checks"]["vision_tower_calls"] == {"ours": 1, "paper_way": 2}
        assert entry["checks"]["same_tokens"] is True
    assert results["refusal"]["checks"]["all_rows_refused"] is True
    assert results["refusal"]["checks"]["language_model_calls_when_refused"] == 0
    for entry in results["calibration"].values():
        assert entry["checks"]["same_tokens"] and entry["checks"]["level_probs_changed"]
    parameters = results["parameters"]
    assert results["training"]["trainable_parameters"]["stage1"] == parameters["config"]["parameters"]["safety_total"]
    assert parameters["reference_7b"]["parameters"]["non_safety_params_match_stock"] is True
    assert "flops" not in results and "## Parameters (counted on the meta device)" in markdown
    rows = results["targets"]
    assert {row["item"] for row in rows} == {1, 2, 3, 4, 6}
    assert all(row["flops_config"] is None for row in rows)


def test_tied_weights_stay_tied_when_the_models_share_stock_tensors():
    """Gemma 3 ties `lm_head` to the input embeddings: SafeLlava built on meta must get stock's tensor under both
    names (a forgotten tied copy would compute logits with an empty weight)."""
    config, _ = benchmark_run.load_config("micro-gemma3")
    bm = build_models(config)
    embeddings = bm.stock.model.language_model.embed_tokens.weight
    for model in (bm.safe, bm.head_only):
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight is embeddings


def test_cpu_small_qwen2_5_vl_splits_its_flops_as_the_7b():
    """`cpu-small-qwen2_5_vl` is sized so that one row's FLOPs split between vision tower, prefill and decode as at
    Qwen2.5-VL-7B (same image and prompt), and the benchmark's processor keeps its 448 px image as it is (256 image
    tokens, the prompt the split counts)."""
    from benchmarks.bases import benchmark_base
    from benchmarks.models import random_images, split_model_spec
    from benchmarks.qwen2_5_vl_flops import config_splits

    config, _ = benchmark_run.load_config("cpu-small-qwen2_5_vl")
    splits = config_splits(config)
    for part, share in splits["reference"]["shares"].items():
        assert abs(splits["config"]["shares"][part] - share) < 0.01, part
    assert splits["config"]["image_tokens"] == splits["reference"]["image_tokens"] == 256
    base = benchmark_base(config["base"])
    tokenizer = base.build_tokenizer()
    processor = base.build_processor(tokenizer, base.stock_config(split_model_spec(config["model"], tokenizer, base)[0]))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config["prompt"]}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=[text], images=[random_images(tuple(config["image_size"]), 1, 0)], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == splits["config"]["prompt_length"]
