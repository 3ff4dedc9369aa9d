"""Calibration: temperature scaling on synthetic logits, the finite-sample false-flag guarantee over simulated draws,
hand-checked binomial maths, refusals, and `safe-llava calibrate` end to end on the mini benchmark (then `evaluate`
on test, and the calibrated model folder reloaded)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import chat_prompt, random_image
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.data.mini_benchmark import write_mini_benchmark
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.calibration import (
    allowed_exceedances,
    calibrate,
    category_thresholds,
    clopper_pearson_interval,
    clopper_pearson_upper,
    expected_calibration_error,
    fit_temperature,
    guaranteed_threshold,
    minimum_clean_rows,
    negative_log_likelihood,
    risk_of,
)
from modeling_safe_llava.tools.cli import main
from modeling_safe_llava.tools.evaluation import load_evaluation_data


def synthetic_logits(seed: int, rows: int = 3000, classes: int = 4, scale: float = 2.0):
    """True logits and labels drawn from their softmax: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, classes)) * scale
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (rng.random(rows)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    return logits, np.minimum(labels, classes - 1)


# -- temperature scaling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distortion", [3.0, 1 / 3])  # over-confident (logits x3) and under-confident (x1/3)
def test_temperature_scaling_lowers_ece_on_mis_calibrated_logits(seed, distortion):
    logits, labels = synthetic_logits(seed)
    distorted = logits * distortion
    temperature = fit_temperature(distorted, labels)
    assert temperature == pytest.approx(distortion, rel=0.15)  # undoes the distortion
    is_risky = labels > 0
    before = expected_calibration_error(risk_of(distorted, 1.0), is_risky)
    after = expected_calibration_error(risk_of(distorted, temperature), is_risky)
    assert after < before / 2
    assert negative_log_likelihood(distorted, labels, temperature) < negative_log_likelihood(distorted, labels, 1.0)


def test_temperature_stays_one_on_calibrated_logits_and_rejects_bad_shapes():
    logits, labels = synthetic_logits(5)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(logits[:, 0], labels)


def test_ece_matches_hand_computation():
    # Bins of width 1/15: 0.05 and 0.06 share bin 0, 0.5 is in bin 7, 1.0 in the last bin (closed).
    confidence = [0.05, 0.06, 0.5, 0.5, 1.0]
    outcome = [False, True, True, True, True]
    expected = 2 / 5 * abs(0.055 - 0.5) + 2 / 5 * abs(0.5 - 1.0) + 1 / 5 * 0.0
    assert expected_calibration_error(confidence, outcome) == pytest.approx(expected)


# -- binomial maths ------------------------------------------------------------------------------------------------


def test_binomial_rule_matches_hand_computation():
    # n = 10, R = 0.3: P(Bin <= 0) = 0.7^10 = 0.0282, P(Bin <= 1) = 0.0282 + 10 * 0.3 * 0.7^9 = 0.1493.
    assert allowed_exceedances(10, 0.3, 0.9) == 0
    assert allowed_exceedances(10, 0.3, 0.85) == 1
    assert allowed_exceedances(10, 0.3, 0.98) == -1
    # n_min = ceil(log(1 - C) / log(1 - R)): 59 for (0.05, 0.95), 299 for (0.01, 0.95), 7 for (0.3, 0.9).
    minima = [minimum_clean_rows(0.05, 0.95), minimum_clean_rows(0.01, 0.95), minimum_clean_rows(0.3, 0.9)]
    assert minima == [59, 299, 7]
    for rate, confidence in ((0.05, 0.95), (0.2, 0.99), (0.5, 0.5)):
        needed = minimum_clean_rows(rate, confidence)
        assert allowed_exceedances(needed, rate, confidence) == 0
        assert allowed_exceedances(needed - 1, rate, confidence) == -1


def test_clopper_pearson_matches_closed_forms():
    # 0 successes: upper = 1 - alpha^(1/n); n successes: lower = (alpha/2)^(1/n) (two-sided).
    assert clopper_pearson_upper(0, 20, 0.95) == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-9)
    assert clopper_pearson_interval(12, 12, 0.95) == pytest.approx((0.025 ** (1 / 12), 1.0), abs=1e-9)
    low, high = clopper_pearson_interval(3, 10, 0.95)
    assert (low, high) == pytest.approx((0.0667395, 0.6524529), abs=1e-6)  # Beta(3, 8) 2.5 %, Beta(4, 7) 97.5 %
    assert clopper_pearson_interval(0, 0, 0.95) is None


def test_threshold_is_the_order_statistic_of_the_rule():
    risks = np.linspace(0.01, 0.99, 200)[::-1].copy()  # unsorted input
    result = guaranteed_threshold(risks, 0.1, 0.9)
    j = allowed_exceedances(200, 0.1, 0.9)
    assert result["allowed_exceedances"] == j > 0
    assert result["threshold"] == np.sort(risks)[200 - j - 1]
    assert result["flagged"] == j
    assert result["upper_bound"] <= 0.1


# -- the guarantee, empirically --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounded", [False, True])  # continuous risks, and risks with many ties
def test_false_flag_guarantee_holds_over_simulated_draws(rounded):
    """1000 validation draws of 300 clean rows with risk = U^2 (U uniform), so the exact false-flag rate of a
    threshold t is P(U^2 > t) = 1 - sqrt(t) (for risks rounded to 0.01: P(U^2 >= t + 0.005)). The rate must be <= R in
    at least a fraction C of the draws; for continuous risks the share of failures must also match the rule's exact
    failure probability BinomCDF(j; n, R) (the bound is tight, not vacuous: a threshold of 1.0 would never fail)."""
    rate, confidence, n, draws = 0.1, 0.9, 300, 1000
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(draws):
        risks = rng.random(n) ** 2
        if rounded:
            risks = np.round(risks, 2)
        threshold = guaranteed_threshold(risks, rate, confidence)["threshold"]
        rates.append(1 - math.sqrt(min(1.0, threshold + 0.005)) if rounded else 1 - math.sqrt(threshold))
    failures = (np.array(rates) > rate).mean()
    assert 1 - failures >= confidence
    if not rounded:
        j = allowed_exceedances(n, rate, confidence)
        exact = math.fsum(math.comb(n, i) * rate**i * (1 - rate) ** (n - i) for i in range(j + 1))
        assert exact <= 1 - confidence
        assert failures == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / draws))


def test_false_flag_guarantee_on_test_draws_of_a_heavy_tailed_score():
    """Validation / test draw pairs (200 each): the share of clean test rows flagged stays under R + its sampling
    noise (3 standard deviations of a test share) in at least a fraction C of the pairs."""
    rate, confidence = 0.2, 0.9
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(250):
        validation, test = rng.standard_cauchy(200), rng.standard_cauchy(200)
        threshold = guaranteed_threshold(validation, rate, confidence)["threshold"]
        noise = 3 * math.sqrt(rate * (1 - rate) / 200)
        hits += (test > threshold).mean() <= rate + noise
    assert hits / 250 >= confidence


@settings(max_examples=40, deadline=None)
@given(
    risks=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=60, max_size=200),
    rates=st.tuples(st.floats(0.05, 0.5), st.floats(0.05, 0.5)),
    confidence=st.floats(0.5, 0.95),
)
def test_thresholds_are_monotone_in_rate_and_confidence(risks, rates, confidence):
    low, high = sorted(rates)
    if len(risks) < minimum_clean_rows(low, confidence):
        return
    strict = guaranteed_threshold(risks, low, confidence)["threshold"]
    assert guaranteed_threshold(risks, high, confidence)["threshold"] <= strict  # a larger R never raises it
    assert guaranteed_threshold(risks, low, min(0.99, confidence + 0.04))["threshold"] >= strict


def test_too_few_clean_rows_refused_with_the_minimum():
    with pytest.raises(ValueError, match="at least 59 are needed"):
        guaranteed_threshold(np.zeros(58), 0.05, 0.95)
    guaranteed_threshold(np.zeros(59), 0.05, 0.95)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        guaranteed_threshold(np.zeros(59), 0.0, 0.95)


def test_per_category_thresholds_use_bonferroni_and_name_short_categories():
    rng = np.random.default_rng(0)
    risks, categories = rng.random(300), np.repeat([0, 1, 2], 100)
    result = category_thresholds(risks, categories, ["A", "B", "C"], 0.1, 0.9)
    for index, name in enumerate("ABC"):  # each at confidence 1 - 0.1 / 3
        alone = guaranteed_threshold(risks[categories == index], 0.1, 1 - 0.1 / 3)
        assert result[name]["threshold"] == alone["threshold"]
        assert result[name]["allowed_exceedances"] == allowed_exceedances(100, 0.1, 1 - 0.1 / 3)
    needed = minimum_clean_rows(0.1, 1 - 0.1 / 4)
    with pytest.raises(ValueError, match=rf"at least {needed} clean rows .*'D': 0"):
        category_thresholds(risks, categories, ["A", "B", "C", "D"], 0.1, 0.9)


# -- end to end on the mini benchmark --------------------------------------------------------------------------------

RATE, CONFIDENCE = 0.3, 0.9  # 10 clean validation rows: j = 0 (see test_binomial_rule_matches_hand_computation)


def read_predictions(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """A tiny model (random head, marked trained) saved, the mini benchmark (5 images per source and split) written,
    `safe-llava calibrate` on validation, then `safe-llava evaluate` of the calibrated model on validation and test."""
    root = tmp_path_factory.mktemp("calibration")
    write_mini_benchmark(root / "bench", seed=0, num_per_category=25, image_size=32)
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    command = ["calibrate", "--model", str(root / "model"), "--data", str(root / "bench"), "--output",
               str(root / "out"), "--target-false-flag-rate", str(RATE), "--confidence", str(CONFIDENCE),
               "--device", "cpu"]
    assert main(command) == 0
    for split in ("validation", "test"):
        assert main(["evaluate", "--model", str(root / "out" / "model"), "--data", str(root / "bench"), "--split",
                     split, "--output", str(root / f"eval_{split}"), "--device", "cpu"]) == 0
    report = json.loads((root / "out" / "calibration.json").read_text())
    return root, report, (model, processor)


def test_calibrate_writes_every_output(calibrated_run):
    root, report, _ = calibrated_run
    for name in ("calibration.json", "reliability.png", "threshold.png", "summary.md"):
        assert (root / "out" / name).stat().st_size > 0
    for key in ("ece_before", "ece_after", "threshold", "thresholds", "target_false_flag_rate", "confidence",
                "method", "counts", "temperatures"):
        assert key in report
    assert "Clopper-Pearson" in report["method"] and "Wilks" in report["method"]
    summary = (root / "out" / "summary.md").read_text()
    assert f"{report['threshold']:.6g}" in summary and "with probability at least 0.9" in summary


def test_calibration_numbers_match_a_hand_computation(calibrated_run):
    root, report, _ = calibrated_run
    rows = read_predictions(root / "eval_validation" / "predictions.csv")  # the calibrated model's own risks
    clean = [float(row["risk"]) for row in rows if int(row["true_level"]) == 0]
    risky = [row for row in rows if int(row["true_level"]) > 0]
    assert (report["counts"]["rows"], report["counts"]["clean"], report["counts"]["risky"]) == (30, 10, 20)
    # n = 10, R = 0.3, C = 0.9: no clean row may lie above the threshold, so it is the largest clean risk.
    assert report["counts"]["allowed_exceedances"] == 0
    assert report["threshold"] == max(clean)
    assert set(report["thresholds"].values()) == {report["threshold"]}
    assert report["counts"]["clean_flagged"] == sum(risk > report["threshold"] for risk in clean) == 0
    assert report["clean_flag_rate_upper_bound"] == pytest.approx(1 - 0.1 ** (1 / 10), abs=1e-9)
    for name, entry in report["recall"].items():
        members = [row for row in risky if int(row["true_type"]) == entry_type(report, name)]
        flagged = sum(float(row["risk"]) > report["threshold"] for row in members)
        assert (entry["risky_rows"], entry["flagged"]) == (len(members), flagged)
        assert entry["interval"] == pytest.approx(list(clopper_pearson_interval(flagged, len(members), CONFIDENCE)))
    risks = [float(row["risk"]) for row in rows]
    labels = [int(row["true_level"]) > 0 for row in rows]
    assert report["ece_after"] == pytest.approx(hand_ece(risks, labels), abs=1e-6)


def entry_type(report, name):
    return report["model"]["type_labels"].index(name)


def hand_ece(risks, labels, bins=15):
    total = 0.0
    for b in range(bins):
        members = [(r, y) for r, y in zip(risks, labels) if min(int(r * bins), bins - 1) == b]
        if members:
            gap = np.mean([r for r, _ in members]) - np.mean([y for _, y in members])
            total += len(members) / len(risks) * abs(gap)
    return total


def test_evaluate_on_test_uses_the_calibrated_threshold(calibrated_run):
    root, report, _ = calibrated_run
    metrics = json.loads((root / "eval_test" / "metrics.json").read_text())
    assert set(metrics["safety_thresholds"].values()) == {round(report["threshold"], 6)}
    rows = read_predictions(root / "eval_test" / "predictions.csv")
    flagged = [float(row["risk"]) > report["threshold"] for row in rows]
    assert [row["flagged"] == "True" for row in rows] == flagged
    clean = [f for f, row in zip(flagged, rows) if int(row["true_level"]) == 0]
    assert metrics["flag_rates_at_model_threshold"]["flag_rate_clean"] == pytest.approx(sum(clean) / len(clean))


def test_saved_model_reloads_with_temperatures_and_threshold(calibrated_run):
    root, report, (original, processor) = calibrated_run
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(root / "out" / "model").eval()
    assert reloaded.config.safety_level_temperature == report["temperatures"]["level"] != 1.0
    assert reloaded.config.safety_type_temperature == report["temperatures"]["type"] != 1.0
    assert reloaded.config.safety_threshold == reloaded.generation_config.safety_threshold == report["threshold"]
    for name in ("configuration_safe_llava.py", "modeling_safe_llava.py", "processing_safe_llava.py"):
        assert (root / "out" / "model" / name).is_file()
    inputs = processor(images=[random_image(3)], text=[chat_prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        calibrated = reloaded.assess_safety(**inputs)
        raw = original.assess_safety(**inputs)  # the original in-memory model: temperatures 1.0
        output = reloaded.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert original.config.safety_level_temperature == 1.0
    expected = torch.softmax(raw.level_probs.double().log() / report["temperatures"]["level"], dim=-1)
    assert torch.allclose(calibrated.level_probs.double(), expected, atol=1e-5)
    assert float(calibrated.threshold[0]) == pytest.approx(report["threshold"])
    assert float(output.safety_assessment.threshold[0]) == pytest.approx(report["threshold"])


def test_function_leaves_the_model_calibrated_and_per_category_refuses_short_categories(calibrated_run, tmp_path):
    root, report, _ = calibrated_run
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    validation = load_evaluation_data(root / "bench", "validation")
    needed = minimum_clean_rows(RATE, 1 - (1 - CONFIDENCE) / len(model.config.risky_type_labels))
    with pytest.raises(ValueError, match=rf"at least {needed} clean rows assigned to each category"):
        calibrate(model, processor, validation, tmp_path / "per", RATE, CONFIDENCE, per_category=True)
    assert not (tmp_path / "per" / "calibration.json").exists()
    assert model.config.safety_level_temperature == 1.0  # a refusal leaves the model untouched
    again = calibrate(model, processor, validation, tmp_path / "out", RATE, CONFIDENCE, batch_size=4)
    assert again["threshold"] == report["threshold"]  # batching does not change the numbers
    assert model.config.safety_level_temperature == report["temperatures"]["level"]
    assert model.generation_config.safety_threshold == report["threshold"]


def test_cli_refuses_too_few_clean_rows_with_the_minimum(calibrated_run, capsys):
    root, _, _ = calibrated_run
    code = main(["calibrate", "--model", str(root / "model"), "--data", str(root / "bench"), "--output",
                 str(root / "refused"), "--target-false-flag-rate", "0.01", "--confidence", "0.95"])
    assert code == 2
    error = capsys.readouterr().err
    assert "10 clean rows" in error and "at least 299" in error
    assert not (root / "refused").exists()


# -- the model card ----------------------------------------------------------------------------------------------


def test_export_card_reports_the_calibration_and_refuses_an_uncalibrated_model(calibrated_run, tmp_path):
    root, report, (original, processor) = calibrated_run
    calibration = root / "out" / "calibration.json"
    main(["export", "--model", str(root / "out" / "model"), "--output", str(tmp_path / "hub"),
          "--calibration", str(calibration)])
    card = (tmp_path / "hub" / "README.md").read_text()
    section = " ".join(card[card.index("## Calibration"):card.index("## Limitations")].split())
    assert f"{report['ece_before']:.4f}" in section and f"{report['ece_after']:.4f}" in section
    assert f"default threshold **{report['threshold']:g}**" in section
    assert f"with probability at least {CONFIDENCE:g}" in section and f"at most {RATE:g} of clean images" in section
    assert "Wilks" in section and "Clopper-Pearson" in section
    for name, entry in report["recall"].items():
        assert f"| {name} | {entry['risky_rows']} | {entry['flagged']} |" in section
    assert json.loads((tmp_path / "hub" / "calibration.json").read_text()) == report
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path / "hub")
    assert reloaded.generation_config.safety_threshold == report["threshold"]
    # The original model (temperatures 1.0, threshold 0.5) does not carry this calibration: refused, nothing written.
    with pytest.raises(ValueError, match="does not carry the calibration"):
        from modeling_safe_llava.tools.hub import export_for_hub

        export_for_hub(original, processor, tmp_path / "wrong", calibration=calibration)
    assert not (tmp_path / "wrong").exists()


def test_per_category_thresholds_become_the_models_per_type_defaults(tmp_path):
    """`--per-category` thresholds are saved with the model (`config.safety_thresholds`) and applied by default."""
    from modeling_safe_llava import SafeLlavaForConditionalGeneration
    from modeling_safe_llava.tiny import build_tiny_safe_llava
    from modeling_safe_llava.tools.calibration import apply_calibration

    model, _ = build_tiny_safe_llava(seed=0)
    names = model.config.risky_type_labels
    thresholds = {name: 0.1 * (i + 1) for i, name in enumerate(names)}
    report = {"temperatures": {"level": 2.0, "type": 0.5}, "threshold": 0.7, "per_category": True, "thresholds": thresholds}
    apply_calibration(model, report)
    model.save_pretrained(tmp_path)
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.safety_thresholds == pytest.approx(thresholds)
    resolved = lambda value: reloaded.safety_policy.for_call(value, generation_config=reloaded.generation_config)  # noqa: E731
    assert resolved(None).thresholds.tolist() == pytest.approx([thresholds[name] for name in names])
    assert resolved(0.9).thresholds.tolist() == pytest.approx([0.9] * len(names))  # a call-time number wins
