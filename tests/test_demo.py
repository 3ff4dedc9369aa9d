"""The main job end to end (tiny language model, default benchmark size): trains, exports, reloads through the
export's own remote code, and the trained head beats chance by a wide margin on the held-out test split."""

import json

import pytest
from PIL import Image

from modeling_safe_llava.tools.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_the_head_beats_chance(tmp_path, capsys):
    results = run_demo(output_dir=tmp_path, language_model="tiny", seed=0, stage1_epochs=30, max_new_tokens=8)

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
    assert Image.open(tmp_path / "report.png").size[0] > 0
    assert "<img src=\"data:image/png;base64," in (tmp_path / "report.html").read_text()
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{results['level_accuracy']:.3f}"[:4] in card


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
