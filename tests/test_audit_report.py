"""The audit's report checked against hand computations: Wilson score intervals against published values, shares per
category and level, the contact sheet's choice of thumbnails, and what summary.md states (model, threshold,
calibration, unreadable files)."""

import csv

import pytest

from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.audit import audit_images, read_results

# helpers of the single-process audit tests (tests/ is on sys.path under pytest's default import mode)
from test_audit import make_image_folder

def test_wilson_intervals_and_shares_match_a_hand_computation():
    from modeling_safe_llava.tools.audit_report import flagged_shares, wilson_interval

    # Published 95 % Wilson intervals (Newcombe 1998, Table I style): x of n -> (low, high)
    for (successes, trials), expected in {
        (0, 10): (0.0, 0.2775), (1, 10): (0.0179, 0.4042), (2, 10): (0.0567, 0.5098), (3, 10): (0.1078, 0.6032),
        (10, 10): (0.7225, 1.0),
    }.items():  # fmt: skip
        assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4), (successes, trials)
    assert wilson_interval(0, 0) is None

    def ok(category, level, flagged):
        return {"id": f"{category}{level}{flagged}", "status": "ok", "flagged": flagged, "category_name": category,
                "level_name": level}  # fmt: skip

    records = [ok("Privacy", "L1", True), ok("Privacy", "L1", True), ok("Politics", "L3", True)]
    records += [ok("Privacy", "L0", False)] * 7 + [{"id": "bad", "status": "error", "error": "x"}]
    rows = {(r["category"], r["level"]): r for r in flagged_shares(records, ["Politics", "Privacy", "Fairness"], ["L0", "L1", "L3"])}
    expected = {
        ("all", "all"): (3, 0.1078, 0.6032), ("Privacy", "all"): (2, 0.0567, 0.5098),
        ("Politics", "L3"): (1, 0.0179, 0.4042), ("Fairness", "all"): (0, 0.0, 0.2775), ("all", "L0"): (0, 0.0, 0.2775),
        ("Privacy", "L1"): (2, 0.0567, 0.5098), ("Politics", "L1"): (0, 0.0, 0.2775),
    }  # fmt: skip
    for group, (flagged, low, high) in expected.items():
        row = rows[group]
        assert (row["flagged"], row["assessed"], row["share"]) == (flagged, 10, flagged / 10), group
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-4), group
    assert len(rows) == 1 + 3 + 3 + 3 * 3


def test_report_shares_contact_sheet_and_summary_follow_the_records(tmp_path):
    from PIL import Image

    from modeling_safe_llava.tools.audit_report import thumbnail_path

    model, processor = build_tiny_safe_llava(seed=1)
    model.config.safety_modules_trained = True
    model.config.safety_level_temperature = 2.0  # a calibrated model: summary.md must say so
    make_image_folder(tmp_path / "images", count=12, corrupt=("zz.png",))
    summary = audit_images(model, processor, tmp_path / "images", tmp_path / "out", batch_size=5, contact_sheet_size=2)
    records = read_results(tmp_path / "out" / "results.jsonl")
    ok = [r for r in records if r["status"] == "ok"]
    flagged = [r for r in ok if r["flagged"]]
    assert len(ok) == 12 and flagged  # the random tiny head flags some images at 0.5
    shares = {(row["category"], row["level"]): row for row in summary["flagged_shares"]}
    for category in summary["safety_thresholds"]:
        count = sum(r["category_name"] == category for r in flagged)
        assert (shares[(category, "all")]["flagged"], shares[(category, "all")]["assessed"]) == (count, 12)
    with open(tmp_path / "out" / "shares.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(summary["flagged_shares"])
    assert float(csv_rows[0]["share"]) == pytest.approx(len(flagged) / 12, abs=1e-6)

    expected_sheet = {}
    for record in sorted(flagged, key=lambda r: (-r["risk"], r["id"])):
        chosen = expected_sheet.setdefault(record["category_name"], [])
        if len(chosen) < 2:
            chosen.append(record["id"])
    assert summary["contact_sheet"] == dict(sorted(expected_sheet.items()))
    assert all(thumbnail_path(tmp_path / "out", i).is_file() for ids in expected_sheet.values() for i in ids)
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.height > 100 * len(expected_sheet)

    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "`safety_level_temperature` = 2" in markdown and "safety_type_temperature" not in markdown
    assert "threshold: 0.5" in markdown and "1 unreadable" in markdown and "Wilson" in markdown
    assert summary["calibration"] == {"safety_level_temperature": 2.0, "safety_type_temperature": 1.0}

