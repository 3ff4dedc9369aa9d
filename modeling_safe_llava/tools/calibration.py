"""Calibrate a SafeLlava's safety head on labelled validation rows: temperature scaling of both heads, and a default
threshold whose false-flag rate on clean images is guaranteed (finite-sample, distribution-free).

```python
>>> from modeling_safe_llava.tools.calibration import calibrate
>>> from modeling_safe_llava.tools.evaluation import load_evaluation_data
>>> report = calibrate(model, processor, load_evaluation_data("bench", "validation"), "runs/calib",
...                    target_false_flag_rate=0.05, confidence=0.95)
>>> report["threshold"], report["ece_before"], report["ece_after"]
```

`calibrate` writes to its output folder `calibration.json` (every number below), `reliability.png` (reliability
diagrams before and after), `threshold.png` (flag rates against the threshold), `summary.md`, and `model/`: the model
and processor (`save_pretrained`, remote code included) with the fitted temperatures in `config.json` and the
guaranteed threshold as the default `safety_threshold` (in `config.json` and `generation_config.json`), so that
`from_pretrained` + `generate` / `assess_safety` use both with no extra code. The model passed in is left calibrated
the same way.

Temperature scaling
-------------------
The model decides on `P(level) = softmax(level_logits / T_level)` and `P(type) = softmax(type_logits / T_type)`
(`config.safety_level_temperature`, `config.safety_type_temperature`). The head's probabilities are read with both
temperatures at 1.0; `log P` equals the logits up to a per-row constant, which the softmax ignores, so each `T` is
fitted on log-probabilities by minimising the mean negative log-likelihood (NLL) of the labels (`safe_level`,
`safe_type`) over the validation rows. The NLL is convex in `1 / T` (a log-sum-exp of linear functions minus a linear
one), hence unimodal in `log T`: a golden-section search over `log T` in `[log 0.05, log 20]` finds its minimum; the
fit keeps `T = 1` unless that lowers the NLL. Temperature scaling changes no argmax: predicted level, type and the
category of a flag stay the same; only `risk` moves.

Calibration error: `risk = 1 - P(level 0)` against the outcome "the row is risky" (`safe_level > 0`), with 15
equal-width bins `[0, 1/15), ..., [14/15, 1]`: `ECE = sum_b (n_b / n) |mean risk in b - share of risky rows in b|`.

The guaranteed false-flag rate
------------------------------
A clean row (`safe_level == 0`) is falsely flagged at threshold `t` iff its `risk > t` (the model's rule). Let
`s_1, ..., s_n` be the calibrated risks of the `n` clean validation rows, assumed i.i.d. from the clean deployment
distribution (exchangeable with future clean images), and `s_(1) <= ... <= s_(n)` their order statistics. For the
threshold `t = s_(k)` the false-flag rate is `p(t) = P(s > t)`. With `F` the CDF of clean risks and `U_i = F(s_i)`,
`p(s_(k)) = 1 - F(s_(k)) <= 1 - U_(k)` (equality for continuous `F`; ties only lower it) and `U_(k) ~ Beta(k, n-k+1)`,
so

    P(p(s_(k)) > R) <= P(U_(k) < 1 - R) = P(at least k of the n U_i fall below 1 - R) = P(Binomial(n, R) <= n - k).

With `j = n - k` (clean validation rows allowed above the threshold), the rule takes the largest `j` such that
`BinomCDF(j; n, R) <= 1 - C` and sets `t = s_(n-j)`: then `P(p(t) <= R) >= C` over the draw of the validation set.
This is the distribution-free tolerance bound of Wilks (1941), the "training-conditional" (PAC) guarantee of split
conformal prediction (Vovk 2012). Equivalently: `j` is the largest count of validation exceedances whose one-sided
Clopper-Pearson upper confidence bound (level `C`) on the flag rate is at most `R`; `calibration.json` also gives
that bound for the exceedances actually observed at `t` (`clean_flag_rate_upper_bound`). The largest such `j` gives
the lowest valid threshold, hence the highest recall among thresholds with the guarantee.

Not enough clean rows: even `j = 0` (`t` = the largest clean risk) needs `P(Binomial(n, R) <= 0) = (1 - R)^n <= 1 - C`,
i.e. `n >= n_min = ceil(log(1 - C) / log(1 - R))` (e.g. 59 clean rows for R = 0.05, C = 0.95; 299 for R = 0.01,
C = 0.95). With fewer, `calibrate` refuses and names `n_min`.

Per-category thresholds (`per_category=True`): the model flags a row iff `risk > t_c` with `c` the row's most likely
risky type (the clean type excluded; temperature scaling does not change it). The clean rows are split by that
predicted category (Mondrian / category-conditional conformal) and each category gets its own threshold by the rule
above at confidence `1 - (1 - C) / K`, with `K` the number of risky types (Bonferroni). Then with probability at least
`C`, simultaneously for every category, the false-flag rate among clean images assigned to it is at most `R`, and so
is the overall clean false-flag rate (a mixture of them). Each category therefore needs
`ceil(log((1 - C) / K) / log(1 - R))` clean rows assigned to it; `calibrate` refuses, naming each short category,
otherwise. The per-category thresholds are saved with the model (`config.safety_thresholds`, the per-type defaults
`generate` and `assess_safety` apply); `safety_threshold` holds the global guaranteed threshold (computed as without
`per_category`), which a call-time number overrides for every type.

Recall: for each risky type, the share of its risky validation rows that are flagged at the chosen threshold(s),
with a two-sided Clopper-Pearson (exact binomial) interval at level `C`.

What the guarantee needs: validation rows drawn like the deployment's clean images (no shift); it says nothing about
recall, and nothing on a tiny or synthetic benchmark beyond that benchmark.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks_safe_llava import check_bool, check_integer, is_number
from ..fileio import load_image
from ..policy_safe_llava import generation_config_with_threshold
from ..safety_model_safe_llava import check_safety_ready
from .evaluation import load_evaluation_data
from .evaluation_common import batches, check_dataset, column, finish_flag_rate_plot, new_figure
from .loading import first_user_question, image_prompt, load_model_and_processor, model_description
from .loading import processor_batch


logger = logging.getLogger(__name__)

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
GOLDEN_SECTION_ITERATIONS = 80
DEFAULT_CONFIDENCE = 0.95
# Probabilities are clipped here before the log (a float32 softmax can underflow to exactly 0).
MIN_PROBABILITY = float(np.finfo(np.float32).tiny)
THRESHOLD_METHOD = (
    "order-statistic bound (Wilks' distribution-free tolerance bound; training-conditional split conformal): the "
    "threshold is the (n-j)-th smallest clean validation risk, j the largest count with BinomCDF(j; n, R) <= 1 - C, "
    "i.e. the one-sided Clopper-Pearson upper bound on the clean flag rate is <= R"
)
PER_CATEGORY_METHOD = (
    "per predicted category (Mondrian), each at confidence 1 - (1 - C) / K (Bonferroni over the K risky types)"
)
TEMPERATURE_METHOD = "temperature scaling of each head, NLL minimised by golden-section search over log T in [0.05, 20]"
INTERVAL_METHOD = "two-sided Clopper-Pearson (exact binomial) interval at level C"
OUTPUT_FILES = ("calibration.json", "reliability.png", "threshold.png", "summary.md", "model")


# ----------------------------------------------------------------------------------------------------------------
# Temperature scaling and calibration error (pure functions of arrays)
# ----------------------------------------------------------------------------------------------------------------


def log_probabilities(probs) -> np.ndarray:
    """`log(probs)` as float64, `(rows, classes)`; probabilities clipped to the smallest normal float32 first."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), MIN_PROBABILITY, 1.0))


def softmax_with_temperature(logits, temperature: float) -> np.ndarray:
    """`softmax(logits / temperature)` over the last axis, float64 (`logits` may be log-probabilities)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits, labels, temperature: float) -> float:
    """Mean NLL of integer `labels` `(rows,)` under `softmax(logits / temperature)`, `logits` `(rows, classes)`."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    log_normaliser = np.log(np.exp(scaled).sum(axis=-1))
    return float(np.mean(log_normaliser - scaled[np.arange(len(scaled)), np.asarray(labels)]))


def fit_temperature(logits, labels, bounds=TEMPERATURE_BOUNDS) -> float:
    """
    The temperature minimising `negative_log_likelihood(logits, labels, T)` over `T` in `bounds` (golden-section
    search on `log T`; the NLL is unimodal there, see the module docstring). Returns 1.0 unless the fit lowers the NLL.

    Args:
        logits (`array` of shape `(rows, classes)`): Logits or log-probabilities.
        labels (`array` of shape `(rows,)`): Integer class of each row.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"fit_temperature needs logits (rows, classes) and labels (rows,), got {logits.shape} and "
                         f"{labels.shape}.")

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    loss_left, loss_right = loss(left), loss(right)
    for _ in range(GOLDEN_SECTION_ITERATIONS):
        if loss_left <= loss_right:
            high, right, loss_right = right, left, loss_left
            left = high - ratio * (high - low)
            loss_left = loss(left)
        else:
            low, left, loss_left = left, right, loss_right
            right = low + ratio * (high - low)
            loss_right = loss(right)
    best = math.exp((low + high) / 2)
    if loss(math.log(best)) >= loss(0.0):
        return 1.0
    if min(abs(best - bound) / bound for bound in bounds) < 1e-3:
        logger.warning("The fitted temperature %.4g sits at a bound of %s: the head is extremely mis-calibrated or "
                       "the validation rows are separable.", best, bounds)
    return best


def reliability_bins(confidence, outcome, num_bins: int = ECE_BINS) -> list[dict]:
    """
    Equal-width bins of `confidence` in [0, 1] (the last one closed): `lower`, `upper`, `count`, `mean_confidence`
    and `observed` (share of `outcome` True), the two means `None` for an empty bin.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    if confidence.shape != outcome.shape or confidence.ndim != 1:
        raise ValueError(f"confidence and outcome must be 1-D of one length, got {confidence.shape}, {outcome.shape}.")
    index = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    bins = []
    for b in range(num_bins):
        members = index == b
        count = int(members.sum())
        bins.append({
            "lower": b / num_bins,
            "upper": (b + 1) / num_bins,
            "count": count,
            "mean_confidence": float(confidence[members].mean()) if count else None,
            "observed": float(outcome[members].mean()) if count else None,
        })
    return bins


def expected_calibration_error(confidence, outcome, num_bins: int = ECE_BINS) -> float:
    """`sum_b (n_b / n) |mean confidence_b - share of outcome_b|` over equal-width bins (see `reliability_bins`)."""
    bins = reliability_bins(confidence, outcome, num_bins)
    total = sum(entry["count"] for entry in bins)
    if not total:
        raise ValueError("expected_calibration_error needs at least one row.")
    return float(sum(
        entry["count"] / total * abs(entry["mean_confidence"] - entry["observed"]) for entry in bins if entry["count"]
    ))


def risk_of(level_logits, temperature: float) -> np.ndarray:
    """`1 - P(level 0)` of each row under `softmax(level_logits / temperature)`."""
    return 1.0 - softmax_with_temperature(level_logits, temperature)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# The guaranteed threshold (finite-sample binomial maths)
# ----------------------------------------------------------------------------------------------------------------


def check_rate_and_confidence(target_false_flag_rate, confidence):
    """Both must be numbers strictly between 0 and 1."""
    for name, value in (("target_false_flag_rate", target_false_flag_rate), ("confidence", confidence)):
        if not is_number(value) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}.")


def binomial_log_cdf(n: int, p: float) -> np.ndarray:
    """`log P(Binomial(n, p) <= j)` for `j = 0..n`, `(n + 1,)` float64, computed in log space."""
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    j = np.arange(n + 1)
    with np.errstate(divide="ignore"):
        log_pmf = (log_factorial[n] - log_factorial[j] - log_factorial[n - j]
                   + j * np.log(p) + (n - j) * np.log1p(-p))
    return np.logaddexp.accumulate(log_pmf)


def allowed_exceedances(n: int, rate: float, confidence: float) -> int:
    """The largest `j` in `0..n` with `P(Binomial(n, rate) <= j) <= 1 - confidence`; -1 when none (too few rows)."""
    if n == 0:
        return -1
    feasible = np.nonzero(binomial_log_cdf(n, rate) <= math.log1p(-confidence))[0]
    return int(feasible[-1]) if feasible.size else -1


def minimum_clean_rows(rate: float, confidence: float) -> int:
    """The smallest `n` with `(1 - rate)^n <= 1 - confidence`: `ceil(log(1 - C) / log(1 - R))`."""
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-rate)))
    log_delta = math.log1p(-confidence)
    while n * math.log1p(-rate) > log_delta:  # guards the float rounding of the ceil
        n += 1
    while n > 1 and (n - 1) * math.log1p(-rate) <= log_delta:
        n -= 1
    return n


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    """One-sided upper Clopper-Pearson bound: the `p` with `P(Binomial(trials, p) <= successes) = 1 - confidence`."""
    if successes >= trials:
        return 1.0
    return _bisect_probability(lambda p: _binomial_log_cdf_at(successes, trials, p) > math.log1p(-confidence))


def clopper_pearson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float] | None:
    """Two-sided Clopper-Pearson interval at level `confidence` (each tail `(1 - confidence) / 2`); None if no trial."""
    if trials == 0:
        return None
    tail = (1.0 - confidence) / 2
    upper = clopper_pearson_upper(successes, trials, 1.0 - tail)
    if successes == 0:
        return 0.0, upper
    # lower: the p with P(Binomial(trials, p) >= successes) = tail, i.e. P(<= successes - 1) = 1 - tail.
    lower = _bisect_probability(lambda p: _binomial_log_cdf_at(successes - 1, trials, p) > math.log1p(-tail))
    return lower, upper


def _binomial_log_cdf_at(j: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 0.0 if j >= n else -math.inf
    return float(binomial_log_cdf(n, p)[j])


def _bisect_probability(is_below) -> float:
    """The boundary in [0, 1] of a predicate true below it and false above it (60 bisections)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if is_below(middle) else (low, middle)
    return (low + high) / 2


def guaranteed_threshold(clean_risk, rate: float, confidence: float, what: str = "clean validation rows") -> dict:
    """
    The lowest threshold whose clean false-flag rate is at most `rate` with probability >= `confidence` (see the
    module docstring): `threshold`, `clean_rows`, `allowed_exceedances`, `flagged` (clean rows above it) and
    `upper_bound` (one-sided Clopper-Pearson bound at level `confidence` for the observed `flagged`).

    Args:
        clean_risk (`array` of shape `(n,)`): Risks of the clean rows, exactly as the model computes them.

    Raises:
        ValueError: fewer than `minimum_clean_rows(rate, confidence)` clean rows (the message gives that minimum).
    """
    check_rate_and_confidence(rate, confidence)
    clean_risk = np.sort(np.asarray(clean_risk, dtype=np.float64))
    n = int(clean_risk.size)
    allowed = allowed_exceedances(n, rate, confidence)
    if allowed < 0:
        raise ValueError(
            f"{n} {what} cannot guarantee a false-flag rate <= {rate:g} with confidence {confidence:g}: at least "
            f"{minimum_clean_rows(rate, confidence)} are needed (n >= log(1 - C) / log(1 - R)). Add clean rows, or "
            "raise the target rate or lower the confidence."
        )
    threshold = float(clean_risk[n - allowed - 1])
    flagged = int((clean_risk > threshold).sum())
    return {
        "threshold": threshold,
        "clean_rows": n,
        "allowed_exceedances": allowed,
        "flagged": flagged,
        "flag_rate": flagged / n,
        "upper_bound": clopper_pearson_upper(flagged, n, confidence),
        "confidence": confidence,
    }


def category_thresholds(clean_risk, clean_category, category_names, rate: float, confidence: float) -> dict:
    """
    Per-category guaranteed thresholds (Mondrian, Bonferroni over the `K = len(category_names)` categories): the
    `guaranteed_threshold` of the clean rows assigned to each category, at confidence `1 - (1 - confidence) / K`.

    Args:
        clean_risk (`array` of shape `(n,)`): Risks of the clean rows.
        clean_category (`array` of shape `(n,)`): Index into `category_names` of each clean row's predicted category.

    Returns:
        `dict` `{category name: guaranteed_threshold(...) dict}`.

    Raises:
        ValueError: naming every category with too few clean rows, its count and the minimum.
    """
    clean_risk, clean_category = np.asarray(clean_risk, dtype=np.float64), np.asarray(clean_category)
    per_category_confidence = 1.0 - (1.0 - confidence) / len(category_names)
    needed = minimum_clean_rows(rate, per_category_confidence)
    counts = {name: int((clean_category == index).sum()) for index, name in enumerate(category_names)}
    short = {name: count for name, count in counts.items() if count < needed}
    if short:
        raise ValueError(
            f"Per-category thresholds need at least {needed} clean rows assigned to each category (false-flag rate "
            f"<= {rate:g} at confidence {confidence:g}, Bonferroni over {len(category_names)} categories); too few "
            f"for {short} (clean rows per predicted category). Drop --per-category, add clean rows, or raise the "
            "target rate or lower the confidence."
        )
    return {
        name: guaranteed_threshold(clean_risk[clean_category == index], rate, per_category_confidence, name)
        for index, name in enumerate(category_names)
    }


def recall_by_type(risk, flag_threshold, true_type, true_level, type_names, confidence: float) -> dict:
    """
    `{risky type name: {risky_rows, flagged, recall, interval}}` for each type with risky rows: the share of rows of
    that (true) type and level > 0 with `risk > flag_threshold` (per-row thresholds), and its Clopper-Pearson
    interval at level `confidence`.
    """
    risk, flag_threshold = np.asarray(risk, dtype=np.float64), np.asarray(flag_threshold, dtype=np.float64)
    true_type, true_level = np.asarray(true_type), np.asarray(true_level)
    result = {}
    for index, name in enumerate(type_names):
        rows = (true_type == index) & (true_level > 0)
        total = int(rows.sum())
        if total:
            flagged = int((risk[rows] > flag_threshold[rows]).sum())
            interval = clopper_pearson_interval(flagged, total, confidence)
            result[name] = {"risky_rows": total, "flagged": flagged, "recall": flagged / total,
                            "interval": list(interval)}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def temperatures(model, level: float, type_: float):
    """Sets `config.safety_level_temperature` / `safety_type_temperature` inside the block, restoring them after."""
    config = model.config
    before = (config.safety_level_temperature, config.safety_type_temperature)
    config.safety_level_temperature, config.safety_type_temperature = float(level), float(type_)
    try:
        yield
    finally:
        config.safety_level_temperature, config.safety_type_temperature = before


@torch.no_grad()
def safety_probabilities(model, processor, dataset, batch_size: int, allow_untrained_safety: bool,
                         description: str, safety_threshold=1.0) -> dict:
    """
    `model.assess_safety` over `dataset` (one call per batch, the model's current temperatures): `level_probs`
    `(rows, levels)`, `type_probs` `(rows, types)` and `risk` `(rows,)` exactly as the model computes them (float32
    values held as float64), `flagged` `(rows,)` at `safety_threshold` (as in `generate`; None: the model's
    default), plus the labels `safe_level` and `safe_type` `(rows,)`.
    """
    arrays = {"level_probs": [], "type_probs": [], "risk": [], "flagged": [], "safe_level": [], "safe_type": []}
    progress = tqdm(total=len(dataset), desc=description, unit="row")
    for _, rows in batches(dataset, batch_size):
        images = [load_image(row["image"]) for row in rows]
        prompts = [image_prompt(processor, first_user_question(row["conversations"])) for row in rows]
        inputs = processor_batch(processor, model, images, prompts)
        assessment = model.assess_safety(
            **inputs, safety_threshold=safety_threshold, allow_untrained_safety=allow_untrained_safety
        )
        for key in ("level_probs", "type_probs", "risk"):
            arrays[key].append(getattr(assessment, key).float().cpu().numpy().astype(np.float64))
        arrays["flagged"].append(assessment.flagged.cpu().numpy().astype(bool))
        arrays["safe_level"].append(np.array([int(row["safe_level"]) for row in rows]))
        arrays["safe_type"].append(np.array([int(row["safe_type"]) for row in rows]))
        progress.update(len(rows))
    progress.close()
    return {key: np.concatenate(values) for key, values in arrays.items()}


def apply_calibration(model, report: dict):
    """Sets a calibration report's temperatures and threshold on `model` (config and generation config)."""
    model.config.safety_level_temperature = float(report["temperatures"]["level"])
    model.config.safety_type_temperature = float(report["temperatures"]["type"])
    model.config.safety_threshold = float(report["threshold"])
    model.generation_config.safety_threshold = float(report["threshold"])
    if report.get("per_category"):
        # Per-category defaults travel with the model too (config.safety_thresholds); types keep them at call time.
        model.config.safety_thresholds = {name: float(value) for name, value in report["thresholds"].items()}


def default_threshold(model) -> float:
    """The default `safety_threshold` that `generate` and `assess_safety` apply: the generation config's, else the
    model config's."""
    return generation_config_with_threshold(model.generation_config, model.config.safety_threshold).safety_threshold


def save_calibrated_model(model, processor, folder: Path) -> Path:
    """`save_pretrained` of model and processor (remote code included), and a generation config that keeps the
    default `safety_threshold` (`policy_safe_llava.generation_config_with_threshold`)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    generation_config_with_threshold(model.generation_config, model.config.safety_threshold).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# A calibration on other rows (does the guarantee hold there?)
# ----------------------------------------------------------------------------------------------------------------


def check_calibration_on(model, processor, dataset, report: dict, batch_size: int = 8,
                         description: str = "Calibration check") -> dict:
    """
    How a calibration does on labelled rows it was not fitted on (e.g. the mini benchmark's `shifted` split): one
    `assess_safety` pass at the report's temperatures before calibration, one with the model's own (calibrated)
    temperatures and default threshold(s).

    The guarantee of `calibrate` covers clean images drawn like the clean validation rows; rows of another
    distribution may break it, and this measures whether they do. `clean_flag_rate` is the share of clean rows
    (`safe_level == 0`) the model flags, with a two-sided Clopper-Pearson interval at the report's confidence;
    `within_target` says whether that share is at most the target rate (a point estimate: with few clean rows the
    interval is wide). `ece_before` / `ece_after`: the ECE of `risk` before and after calibration.

    Args:
        model ([`SafeLlavaForConditionalGeneration`]): A model that carries `report`'s calibration.
        processor ([`SafeLlavaProcessor`]): Its processor.
        dataset (`datasets.Dataset` or `list[dict]`): Labelled rows (paper schema), at least one of them clean.
        report (`dict`): What `calibrate` returned (the content of `calibration.json`).
        batch_size (`int`, *optional*, defaults to 8): Rows per model call.

    Returns:
        `dict`: `rows`, `clean_rows`, `clean_flagged`, `clean_flag_rate`, `clean_flag_rate_interval`,
        `target_false_flag_rate`, `within_target`, `risky_rows`, `risky_flagged`, `recall`, `ece_before`, `ece_after`
        (the keys of `calibration_on_validation`).

    Raises:
        ValueError: a model that does not carry `report`'s calibration, bad rows, or no clean row.
    """
    check_integer("batch_size", batch_size)
    config = model.config
    check_calibration_applied(config, default_threshold(model), report)
    check_dataset(dataset, len(config.safety_level_labels), len(config.safety_type_labels))
    if not (np.asarray(column(dataset, "safe_level")) == 0).any():
        raise ValueError("check_calibration_on needs at least one clean row (safe_level 0) to measure false flags.")
    before = report["temperatures_before"]
    with temperatures(model, before["level"], before["type"]):
        raw = safety_probabilities(model, processor, dataset, batch_size, False, f"{description}: before")
    seen = safety_probabilities(model, processor, dataset, batch_size, False, description, safety_threshold=None)
    is_risky = seen["safe_level"] > 0
    return flag_numbers(
        {"clean": seen["flagged"][~is_risky], "risky": seen["flagged"][is_risky]}, report,
        expected_calibration_error(raw["risk"], is_risky), expected_calibration_error(seen["risk"], is_risky),
    )


def calibration_on_validation(report: dict) -> dict:
    """What `check_calibration_on` gives on the validation rows `report` was fitted on, read from the report."""
    counts = report["counts"]
    flags = {
        "clean": np.arange(counts["clean"]) < counts["clean_flagged"],
        "risky": np.arange(counts["risky"]) < counts["risky_flagged"],
    }
    return flag_numbers(flags, report, report["ece_before"], report["ece_after"])


def flag_numbers(flagged: dict, report: dict, ece_before: float, ece_after: float) -> dict:
    """The numbers of `check_calibration_on` from the flags of the clean and the risky rows (boolean arrays)."""
    clean, risky = int(flagged["clean"].size), int(flagged["risky"].size)
    clean_flagged, risky_flagged = int(flagged["clean"].sum()), int(flagged["risky"].sum())
    rate, confidence = float(report["target_false_flag_rate"]), float(report["confidence"])
    return {
        "rows": clean + risky,
        "clean_rows": clean,
        "clean_flagged": clean_flagged,
        "clean_flag_rate": clean_flagged / clean,
        "clean_flag_rate_interval": list(clopper_pearson_interval(clean_flagged, clean, confidence)),
        "target_false_flag_rate": rate,
        "within_target": clean_flagged / clean <= rate,
        "risky_rows": risky,
        "risky_flagged": risky_flagged,
        "recall": risky_flagged / risky if risky else None,
        "ece_before": float(ece_before),
        "ece_after": float(ece_after),
    }


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def _check_clean_rows(labels_level, rate: float, confidence: float):
    """Refuses before any model call when the labels hold too few clean rows for the global threshold."""
    clean = int((np.asarray(labels_level) == 0).sum())
    needed = minimum_clean_rows(rate, confidence)
    if clean < needed:
        raise ValueError(
            f"The validation rows hold {clean} clean rows (safe_level 0); a false-flag rate <= {rate:g} with "
            f"confidence {confidence:g} needs at least {needed} (n >= log(1 - C) / log(1 - R)). Add clean rows, or "
            "raise --target-false-flag-rate or lower --confidence."
        )


def fit_temperatures(raw: dict) -> dict:
    """`{"level": T, "type": T}` fitted on the log-probabilities of a pass at temperature 1.0."""
    return {
        "level": fit_temperature(log_probabilities(raw["level_probs"]), raw["safe_level"]),
        "type": fit_temperature(log_probabilities(raw["type_probs"]), raw["safe_type"]),
    }


def threshold_section(calibrated: dict, model, rate: float, confidence: float, per_category: bool) -> dict:
    """The global guaranteed threshold, the per-category ones (or the global one for each category), the row
    thresholds they give and the recall per risky type."""
    risky_names = list(model.config.risky_type_labels)
    is_clean = calibrated["safe_level"] == 0
    category = calibrated["type_probs"][:, :-1].argmax(axis=-1)  # the model's category of a flag
    overall = guaranteed_threshold(calibrated["risk"][is_clean], rate, confidence)
    per_type = None
    if per_category:
        per_type = category_thresholds(calibrated["risk"][is_clean], category[is_clean], risky_names, rate, confidence)
        thresholds = {name: per_type[name]["threshold"] for name in risky_names}
    else:
        thresholds = {name: overall["threshold"] for name in risky_names}
    row_threshold = np.array([thresholds[risky_names[c]] for c in category])
    flagged_clean = int((calibrated["risk"][is_clean] > row_threshold[is_clean]).sum())
    recall = recall_by_type(calibrated["risk"], row_threshold, calibrated["safe_type"], calibrated["safe_level"],
                            list(model.config.safety_type_labels), confidence)
    risky = ~is_clean
    flagged_risky = int((calibrated["risk"][risky] > row_threshold[risky]).sum())
    return {
        "overall": overall,
        "per_category": per_type,
        "thresholds": thresholds,
        "clean_flagged": flagged_clean,
        "risky_flagged": flagged_risky,
        "recall": recall,
        "recall_overall": {
            "risky_rows": int(risky.sum()), "flagged": flagged_risky,
            "recall": flagged_risky / int(risky.sum()) if risky.any() else None,
            "interval": (list(clopper_pearson_interval(flagged_risky, int(risky.sum()), confidence))
                         if risky.any() else None),
        },
    }


def build_report(raw: dict, calibrated: dict, fitted: dict, before: dict, section: dict, model, rate: float,
                 confidence: float, per_category: bool) -> dict:
    """The content of `calibration.json` (see the module docstring for every definition)."""
    is_risky = raw["safe_level"] > 0
    risk_before = risk_of(log_probabilities(raw["level_probs"]), before["level"])
    nll = {
        f"{head}_{when}": negative_log_likelihood(log_probabilities(raw[f"{head}_probs"]), raw[f"safe_{head}"], t[head])
        for when, t in (("before", before), ("after", fitted)) for head in ("level", "type")
    }
    overall = section["overall"]
    return {
        "method": THRESHOLD_METHOD + ("; " + PER_CATEGORY_METHOD if per_category else ""),
        "temperature_method": TEMPERATURE_METHOD,
        "interval_method": INTERVAL_METHOD,
        "target_false_flag_rate": rate,
        "confidence": confidence,
        "per_category": per_category,
        "threshold": overall["threshold"],
        "thresholds": section["thresholds"],
        "temperatures": fitted,
        "temperatures_before": before,
        "ece_before": expected_calibration_error(risk_before, is_risky),
        "ece_after": expected_calibration_error(calibrated["risk"], is_risky),
        "ece_bins": ECE_BINS,
        "nll": nll,
        "counts": {
            "rows": int(raw["safe_level"].size),
            "clean": int((~is_risky).sum()),
            "risky": int(is_risky.sum()),
            "minimum_clean_rows": minimum_clean_rows(rate, confidence),
            "allowed_exceedances": overall["allowed_exceedances"],
            "clean_flagged": section["clean_flagged"],
            "clean_flagged_at_default_threshold": overall["flagged"],
            "risky_flagged": section["risky_flagged"],
        },
        "clean_flag_rate_validation": section["clean_flagged"] / int((~is_risky).sum()),
        "clean_flag_rate_upper_bound": overall["upper_bound"],
        "category_guarantees": section["per_category"],
        "recall": section["recall"],
        "recall_overall": section["recall_overall"],
        "reliability": {
            "before": reliability_bins(risk_before, is_risky),
            "after": reliability_bins(calibrated["risk"], is_risky),
        },
        "model": model_description(model),
    }


def plot_reliability(path: Path, report: dict):
    """Two reliability diagrams (before, after): share of risky rows against mean risk per bin, bar width = bin."""
    figure = new_figure(9, 4)
    for position, when in enumerate(("before", "after"), start=1):
        axes = figure.add_subplot(1, 2, position)
        bins = [entry for entry in report["reliability"][when] if entry["count"]]
        axes.bar([(e["lower"] + e["upper"]) / 2 for e in bins], [e["observed"] for e in bins],
                 width=1 / report["ece_bins"], edgecolor="black", alpha=0.7, label="share of risky rows")
        axes.plot([e["mean_confidence"] for e in bins], [e["observed"] for e in bins], "o", color="C1",
                  label="mean risk in bin")
        axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        temperature = report[f"temperatures{'_before' if when == 'before' else ''}"]["level"]
        axes.set_title(f"{when}: T_level {temperature:.3g}, ECE {report[f'ece_{when}']:.3f}")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("risk = 1 - P(level 0)")
        axes.set_ylabel("share of risky rows")
        axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)


def plot_thresholds(path: Path, risk, is_risky, report: dict):
    """Share of clean and of risky validation rows flagged against a single threshold, the target rate and the
    chosen threshold(s)."""
    risk, is_risky = np.asarray(risk), np.asarray(is_risky, dtype=bool)
    grid = np.linspace(0.0, 1.0, 401)
    figure = new_figure(6.5, 4)
    axes = figure.add_subplot(1, 1, 1)
    for mask, label in ((~is_risky, "clean rows flagged"), (is_risky, "risky rows flagged (recall)")):
        if mask.any():
            axes.plot(grid, [(risk[mask] > t).mean() for t in grid], label=label)
    axes.axhline(report["target_false_flag_rate"], color="red", linestyle=":",
                 label=f"target false-flag rate {report['target_false_flag_rate']:g}")
    axes.axvline(report["threshold"], color="black", linestyle="--",
                 label=f"guaranteed threshold {report['threshold']:.4g}")
    if report["per_category"]:
        for name, value in report["thresholds"].items():
            axes.axvline(value, color="grey", linestyle="-.", linewidth=0.8)
            axes.text(value, 0.5, name, rotation=90, fontsize=6, va="center")
    finish_flag_rate_plot(
        figure, axes, path, "safety_threshold (flag iff risk > threshold), calibrated risk",
        "share of validation rows flagged", 7,
    )


def _interval_text(entry: dict) -> str:
    if entry.get("interval") is None:
        return "n/a"
    low, high = entry["interval"]
    return f"{entry['recall']:.3f} [{low:.3f}, {high:.3f}]"


def render_summary(report: dict) -> str:
    """`summary.md`: the guarantee in words, calibration before/after, thresholds and recall per type."""
    counts, rate, confidence = report["counts"], report["target_false_flag_rate"], report["confidence"]
    fitted, before = report["temperatures"], report["temperatures_before"]
    lines = ["# Safety head calibration", ""]
    if not report["model"]["safety_modules_trained"]:
        lines += ["> **Warning: untrained safety modules** (`allow_untrained_safety=True`): these numbers describe a "
                  "random head.", ""]
    lines += [
        f"- model: `{report['model']['name_or_path'] or '(in memory)'}`",
        f"- validation rows: {counts['rows']} ({counts['clean']} clean, {counts['risky']} risky)",
        f"- temperatures: level {fitted['level']:.4g} (was {before['level']:.4g}), type {fitted['type']:.4g} (was "
        f"{before['type']:.4g})",
        f"- ECE of risk ({report['ece_bins']} bins): {report['ece_before']:.4f} before, {report['ece_after']:.4f} "
        "after",
        f"- NLL of level: {report['nll']['level_before']:.4f} -> {report['nll']['level_after']:.4f}; of type: "
        f"{report['nll']['type_before']:.4f} -> {report['nll']['type_after']:.4f}",
        "",
        "## Guaranteed false-flag rate",
        "",
        f"Default threshold **{report['threshold']:.6g}**: with probability at least {confidence:g} over the draw of "
        f"the validation set, at most {rate:g} of clean images are flagged (risk > threshold), if the clean "
        "validation images are drawn like the deployment's.",
        "",
        f"- bound: {report['method']}",
        f"- clean validation rows: {counts['clean']} (at least {counts['minimum_clean_rows']} needed); allowed above "
        f"the threshold: {counts['allowed_exceedances']}; flagged: {counts['clean_flagged']} "
        f"({report['clean_flag_rate_validation']:.4f})",
        f"- one-sided Clopper-Pearson upper bound ({confidence:g}) on the clean flag rate at the default threshold: "
        f"{report['clean_flag_rate_upper_bound']:.4f}",
    ]
    if report["per_category"]:
        lines += ["", "Per-category thresholds (saved as the model's per-type defaults, `config.safety_thresholds`):",
                  "", "| category | threshold | clean rows | allowed | flagged |", "|---|---|---|---|---|"]
        for name, entry in report["category_guarantees"].items():
            lines.append(f"| {name} | {entry['threshold']:.6g} | {entry['clean_rows']} | "
                         f"{entry['allowed_exceedances']} | {entry['flagged']} |")
    lines += ["", f"## Recall at the threshold{'s' if report['per_category'] else ''} ({report['interval_method']})",
              "", "| risky type | risky rows | flagged | recall [interval] |", "|---|---|---|---|"]
    for name, entry in report["recall"].items():
        lines.append(f"| {name} | {entry['risky_rows']} | {entry['flagged']} | {_interval_text(entry)} |")
    overall = report["recall_overall"]
    lines.append(f"| all risky rows | {overall['risky_rows']} | {overall['flagged']} | {_interval_text(overall)} |")
    lines += [
        "",
        "Files: `calibration.json`, `reliability.png`, `threshold.png`, `model/` (the calibrated model: fitted "
        "temperatures and the default threshold in its config and generation config).",
        "Numbers from a tiny or synthetic benchmark say nothing about real-world safety.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(output_dir: Path, report: dict, calibrated: dict) -> dict[str, Path]:
    """`calibration.json`, the two PNGs and `summary.md`; returns `{name: path}`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in OUTPUT_FILES}
    paths["calibration.json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_reliability(paths["reliability.png"], report)
    plot_thresholds(paths["threshold.png"], calibrated["risk"], calibrated["safe_level"] > 0, report)
    paths["summary.md"].write_text(render_summary(report), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def calibrate(
    model,
    processor,
    dataset,
    output_dir,
    target_false_flag_rate: float,
    confidence: float = DEFAULT_CONFIDENCE,
    per_category: bool = False,
    batch_size: int = 8,
    allow_untrained_safety: bool = False,
) -> dict:
    """
    Fits both temperatures, chooses the guaranteed threshold(s), writes the outputs listed in the module docstring
    (`output_dir/model` included) and leaves `model` calibrated (temperatures and default threshold set).

    Args:
        model ([`SafeLlavaForConditionalGeneration`]): Trained safety modules (or `allow_untrained_safety=True`).
        processor ([`SafeLlavaProcessor`]): Its processor (with the chat template).
        dataset (`datasets.Dataset` or `list[dict]`): Labelled validation rows (paper schema: `image`,
            `conversations`, `safe_level`, `safe_type`), e.g. `load_evaluation_data(folder, "validation")`.
        output_dir (`str` or `os.PathLike`): Folder for the outputs (created if missing).
        target_false_flag_rate (`float`): `R` in (0, 1), the largest acceptable share of clean images flagged.
        confidence (`float`, *optional*, defaults to 0.95): `C` in (0, 1), the probability of the guarantee.
        per_category (`bool`, *optional*): Also choose one threshold per risky type (see the module docstring).
        batch_size (`int`, *optional*, defaults to 8): Rows per model call.
        allow_untrained_safety (`bool`, *optional*): Run on untrained safety modules (tests only).

    Returns:
        `dict`: the content of `calibration.json`.

    Raises:
        ValueError: bad arguments or rows, or too few clean rows for `R` and `C` (the message gives the minimum),
        checked before the model runs (per category: after the first pass, which assigns the categories).
    """
    check_rate_and_confidence(target_false_flag_rate, confidence)
    check_integer("batch_size", batch_size)
    check_bool("per_category", per_category)
    check_safety_ready(model.config, allow_untrained_safety)
    config = model.config
    check_dataset(dataset, len(config.safety_level_labels), len(config.safety_type_labels))
    _check_clean_rows(column(dataset, "safe_level"), target_false_flag_rate, confidence)
    before = {"level": float(config.safety_level_temperature), "type": float(config.safety_type_temperature)}
    with temperatures(model, 1.0, 1.0):
        raw = safety_probabilities(model, processor, dataset, batch_size, allow_untrained_safety, "Calibration: T = 1")
    fitted = fit_temperatures(raw)
    # Second pass with the fitted temperatures: thresholds are chosen on exactly the risks the saved model computes.
    with temperatures(model, fitted["level"], fitted["type"]):
        calibrated = safety_probabilities(
            model, processor, dataset, batch_size, allow_untrained_safety, "Calibration: fitted T"
        )
    section = threshold_section(calibrated, model, target_false_flag_rate, confidence, per_category)
    report = build_report(raw, calibrated, fitted, before, section, model, target_false_flag_rate, confidence,
                          per_category)
    output_dir = Path(output_dir)
    paths = write_outputs(output_dir, report, calibrated)
    apply_calibration(model, report)
    save_calibrated_model(model, processor, paths["model"])
    logger.info("Calibration of %d rows written to %s", report["counts"]["rows"], output_dir)
    return report


def load_calibration(calibration) -> tuple[dict | None, str | None]:
    """`(calibration report, where it came from)` from None, a dict, or the path of a `calibration.json`."""
    if calibration is None:
        return None, None
    if isinstance(calibration, dict):
        report, source = json.loads(json.dumps(calibration)), None
    else:
        path = Path(calibration)
        if not path.is_file():
            raise ValueError(f"calibration={str(calibration)!r} is not a file; pass a calibration.json path, a dict "
                             "or None.")
        report, source = json.loads(path.read_text()), path.name
    missing = [key for key in ("threshold", "temperatures", "ece_before", "ece_after", "target_false_flag_rate",
                               "confidence", "method", "counts") if key not in report]
    if missing:
        raise ValueError(f"The calibration report lacks {missing}; pass the calibration.json of safe-llava calibrate.")
    return report, source


def check_calibration_applied(config, threshold: float, report: dict):
    """The model must carry the report's temperatures and default threshold, or the card would describe another
    model: export `O/model` of the calibrate run."""
    expected = {
        "safety_level_temperature": report["temperatures"]["level"],
        "safety_type_temperature": report["temperatures"]["type"],
        "safety_threshold (default)": report["threshold"],
    }
    actual = {
        "safety_level_temperature": config.safety_level_temperature,
        "safety_type_temperature": config.safety_type_temperature,
        "safety_threshold (default)": threshold,
    }
    wrong = {name: (actual[name], value) for name, value in expected.items()
             if not math.isclose(float(actual[name]), float(value), rel_tol=1e-9, abs_tol=1e-12)}
    if wrong:
        raise ValueError(
            f"This model does not carry the calibration it is exported with ({{field: (model, report)}}: {wrong}); "
            "export the model folder that safe-llava calibrate wrote (<output>/model)."
        )


def add_cli_arguments(parser):
    """Options of `safe-llava calibrate` (added to an `argparse` parser, which is returned)."""
    parser.add_argument("--model", required=True, help="Folder of a saved SafeLlava (model and processor).")
    parser.add_argument("--data", required=True, help="Mini-benchmark folder or paper-schema .jsonl file.")
    parser.add_argument("--split", default="validation", help="Split to use when --data is a folder (default: "
                                                                "validation).")
    parser.add_argument("--image-root", default=None, help="Folder that relative image paths of a .jsonl start from.")
    parser.add_argument("--output", required=True, help="Folder for the reports and the calibrated model/.")
    parser.add_argument("--target-false-flag-rate", type=float, required=True,
                        help="Largest acceptable share of clean images flagged, in (0, 1).")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help=f"Probability that the rate holds, in (0, 1) (default: {DEFAULT_CONFIDENCE}).")
    parser.add_argument("--per-category", action="store_true", help="Also choose one threshold per risky type.")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available).")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per model call (default: 8).")
    parser.add_argument("--allow-untrained-safety", action="store_true",
                        help="Run on untrained safety modules (tests and debugging only).")
    return parser


def run_from_args(args) -> int:
    """Runs `safe-llava calibrate` from parsed arguments; returns the process exit code."""
    check_rate_and_confidence(args.target_false_flag_rate, args.confidence)
    model, processor = load_model_and_processor(args.model, args.device)
    dataset = load_evaluation_data(args.data, args.split, args.image_root)
    report = calibrate(
        model, processor, dataset, args.output, args.target_false_flag_rate, confidence=args.confidence,
        per_category=args.per_category, batch_size=args.batch_size, allow_untrained_safety=args.allow_untrained_safety,
    )
    print(
        f"Calibrated on {report['counts']['rows']} rows: T_level {report['temperatures']['level']:.4g}, T_type "
        f"{report['temperatures']['type']:.4g}, ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}; "
        f"threshold {report['threshold']:.6g} (clean flag rate <= {report['target_false_flag_rate']:g} with "
        f"confidence {report['confidence']:g}). Reports and model/ in {args.output}."
    )
    return 0


__all__ = [
    "calibrate",
    "apply_calibration",
    "fit_temperature",
    "expected_calibration_error",
    "reliability_bins",
    "guaranteed_threshold",
    "category_thresholds",
    "minimum_clean_rows",
    "allowed_exceedances",
    "clopper_pearson_upper",
    "clopper_pearson_interval",
    "recall_by_type",
    "load_calibration",
    "check_calibration_applied",
    "check_calibration_on",
    "calibration_on_validation",
    "default_threshold",
    "add_cli_arguments",
    "run_from_args",
]
