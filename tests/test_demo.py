"""The main job end to end (tiny language model, default benchmark size, the default pretrained EfficientNet-Lite0
tower): trains, calibrates, exports, reloads through the export's own remote code, and the trained head beats chance
by a wide margin on the held-out test split; the reports show the calibrated verdicts."""

import json

import pytest
from PIL import Image

from modeling_safe_llava.tools.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_the_head_beats_chance(tmp_path, capsys):
    results = run_demo(output_dir=tmp_path, language_model="tiny", seed=0, stage1_epochs=20, max_new_tokens=8)

    # 4 levels, 7 types; the majority class of the test split is a third of it: 0.6 is far above both.
    assert results["level_accuracy"] >= 0.6
    assert results["type_accuracy"] >= 0.6
    assert results["reloaded_class"].startswith("transformers_modules.")
    printed = capsys.readouterr().out
    for row in results["judged"]:
        assert row["id"] in printed and row["action"] in {"allow", "hint", "refuse"}
    assert {row["true"].split(" / ")[0] for row in results["judged"]} >= {"Clean", "Illegal Risk", "Privacy", "Misleading"}

    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["level_accuracy"] == results["level_accuracy"]
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["level"]["accuracy"] == results["level_accuracy"]
    assert "<img src=\"data:image/png;base64," in (tmp_path / "report.html").read_text()
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{results['level_accuracy']:.3f}"[:4] in card
    vision = json.loads((tmp_path / "export" / "config.json").read_text())["vision_config"]
    assert vision["model_type"] == "safe_llava_efficientnet_lite"  # the pretrained tower is the default
    check_calibration(tmp_path, results, printed)
    check_reports_show_the_calibrated_verdicts(tmp_path, results)


def check_calibration(folder, results, printed):
    """Calibrated on validation at the demo's target; checked on validation and shifted; carried by the export."""
    from modeling_safe_llava.tools.demo import DEMO_CONFIDENCE, DEMO_FALSE_FLAG_RATE

    calibration = results["calibration"]
    assert (calibration["target_false_flag_rate"], calibration["confidence"]) == (DEMO_FALSE_FLAG_RATE, DEMO_CONFIDENCE)
    report = json.loads((folder / "calibration" / "calibration.json").read_text())
    assert calibration["threshold"] == report["threshold"] and calibration["ece_after"] == report["ece_after"]
    validation, shifted = calibration["validation"], calibration["shifted"]
    assert validation["clean_flagged"] == report["counts"]["clean_flagged"] <= report["counts"]["allowed_exceedances"]
    assert validation["clean_rows"] == 10 and shifted["clean_rows"] == 10  # 5 per clean source at 24 per source
    assert shifted["clean_flag_rate"] == shifted["clean_flagged"] / shifted["clean_rows"]
    assert {"ece_before", "ece_after", "within_target", "clean_flag_rate_interval"} <= set(shifted)
    assert json.loads((folder / "evaluation" / "calibration.json").read_text()) == calibration
    assert f"{shifted['clean_flagged']}/{shifted['clean_rows']}" in printed
    assert f"{shifted['clean_flagged']}/{shifted['clean_rows']}" in (folder / "evaluation" / "calibration.md").read_text()
    exported = json.loads((folder / "export" / "generation_config.json").read_text())
    assert exported["safety_threshold"] == calibration["threshold"]
    assert json.loads((folder / "export" / "calibration.json").read_text()) == report


def check_reports_show_the_calibrated_verdicts(folder, results):
    """report.html names the calibrated threshold and shows every verdict; report.png has a cell for each."""
    page = (folder / "report.html").read_text()
    assert f"threshold {results['calibration']['threshold']:.4g} (calibrated)" in page
    for row in results["judged"]:
        assert f"{row['action'].upper()}</b> {row['category']} (level {row['level']}, risk {row['risk']})" in page
    width, height = Image.open(folder / "report.png").size
    assert (width, height) == (1280, 340 * -(-len(results["judged"]) // 4))  # a 4-column grid, one cell per verdict


def test_the_demo_fixes_torchs_thread_count_so_a_seed_prints_the_same_numbers(monkeypatch):
    import argparse

    import torch

    from modeling_safe_llava.tools import demo

    parser = argparse.ArgumentParser()
    demo.add_cli_arguments(parser)
    assert parser.parse_args([]).threads == demo.DEMO_THREADS == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        demo.run_from_args(parser.parse_args(["--threads", "1"]))
    finally:
        torch.set_num_threads(before)
    assert calls == [1]


def test_the_demo_skips_calibration_when_validation_has_too_few_clean_rows(tmp_path):
    import datasets

    from modeling_safe_llava.tools import demo

    data = {"validation": datasets.Dataset.from_dict({"safe_level": [0, 0, 2, 3]})}  # what --num-per-category 6 gives
    report, summary = demo._calibrate(None, None, data, tmp_path)  # refuses before the model is touched
    assert report is None and "2 clean rows" in summary["skipped"] and "needs 9" in summary["skipped"]
    assert demo._calibration_lines(summary) == [f"calibration {summary['skipped']}"]
    assert not (tmp_path / "calibration").exists()
