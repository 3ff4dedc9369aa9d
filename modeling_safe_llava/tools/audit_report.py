"""The reports of an audit, from its records: what share of a collection is flagged, per category and level, with
Wilson score confidence intervals; the riskiest images per category as a contact sheet; CSV, JSON and markdown.

Files (in the audit's output folder):

- `summary.json`: counts, shares with their intervals, the model, its threshold and calibration, unreadable files;
- `summary.md`: the same, readable;
- `shares.csv`: one row per (category, level) group: flagged, assessed, share, interval;
- `risky.csv`: the flagged images (`id, type, level, risk, action`), riskiest first;
- `contact_sheet.png`: per category, the thumbnails of its riskiest flagged images (saved while scanning in
  `thumbnails/`).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import math
import os
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from .loading import describe_thresholds
from .report import spreadsheet_safe


RISKY_COLUMNS = ("id", "type", "level", "risk", "action")
SHARE_COLUMNS = ("category", "level", "flagged", "assessed", "share", "ci_low", "ci_high")
ALL = "all"
CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal
THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SIZE = 96


# ----------------------------------------------------------------------------------------------------------------
# Shares and intervals
# ----------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """
    The Wilson score interval of a binomial proportion (95 % for the default `z`); `None` for 0 trials.
    Center `(p + z²/2n) / (1 + z²/n)`, half-width `z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)`.
    """
    if trials == 0:
        return None
    p, n = successes / trials, trials
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _share(flagged: int, assessed: int) -> dict:
    interval = wilson_interval(flagged, assessed)
    return {
        "flagged": flagged,
        "assessed": assessed,
        "share": flagged / assessed if assessed else None,
        "ci_low": interval[0] if interval else None,
        "ci_high": interval[1] if interval else None,
    }


def flagged_shares(records: list[dict], categories: list[str], levels: list[str]) -> list[dict]:
    """
    Share of assessed images that are flagged, per (category, level) group: `("all", "all")`, each category over all
    levels, each level over all categories, and each (category, level) pair. A flagged image counts under its
    decision category (its most likely risky type) and its most likely level.

    Returns:
        `list[dict]`: rows with the keys of `SHARE_COLUMNS`.
    """
    ok = [record for record in records if record["status"] == "ok"]
    flagged = Counter((r["category_name"], r["level_name"]) for r in ok if r["flagged"])
    categories = list(dict.fromkeys([*categories, *(category for category, _ in flagged)]))
    levels = list(dict.fromkeys([*levels, *(level for _, level in flagged)]))
    groups = [(ALL, ALL), *((c, ALL) for c in categories), *((ALL, level) for level in levels)]
    groups += [(c, level) for c in categories for level in levels]
    rows = []
    for category, level in groups:
        count = sum(
            number
            for (flag_category, flag_level), number in flagged.items()
            if category in (ALL, flag_category) and level in (ALL, flag_level)
        )
        rows.append({"category": category, "level": level, **_share(count, len(ok))})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# summary.json
# ----------------------------------------------------------------------------------------------------------------


def summarize(records: list[dict], num_ignored: int, config: dict) -> dict:
    """The content of `summary.json`, from the records of every image of the source."""
    ok = [record for record in records if record["status"] == "ok"]
    flagged = [record for record in ok if record["flagged"]]
    errors = [{"id": record["id"], "error": record["error"]} for record in records if record["status"] == "error"]
    categories, levels = list(config["safety_thresholds"]), config["model"]["level_labels"]
    return {
        "num_images": len(records),
        "num_assessed": len(ok),
        "num_errors": len(errors),
        "num_flagged": len(flagged),
        "flag_rate": len(flagged) / len(ok) if ok else None,
        "flagged_by_category": dict(sorted(Counter(record["category_name"] for record in flagged).items())),
        "flagged_by_level": dict(sorted(Counter(record["level_name"] for record in flagged).items())),
        "flagged_by_action": dict(sorted(Counter(record["action"] for record in flagged).items())),
        "decision_category_all_images": dict(sorted(Counter(record["category_name"] for record in ok).items())),
        "confidence_interval": {"method": "Wilson score interval", "level": CONFIDENCE},
        "flagged_shares": flagged_shares(records, categories, levels),
        "errors": errors,
        "num_ignored_files": num_ignored,
        **config,
    }


# ----------------------------------------------------------------------------------------------------------------
# CSV files
# ----------------------------------------------------------------------------------------------------------------


def _write_csv(path: Path, header, rows):
    """A CSV file whose string cells cannot become spreadsheet formulas (`spreadsheet_safe`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)


def riskiest_first(records: list[dict]) -> list[dict]:
    """The flagged records, riskiest first (ties by id)."""
    flagged = (record for record in records if record["status"] == "ok" and record["flagged"])
    return sorted(flagged, key=lambda record: (-record["risk"], record["id"]))


def write_risky_csv(path: Path, records: list[dict]):
    """The flagged images, riskiest first (ties by id)."""
    rows = [
        [record["id"], record["category_name"], record["level"], f"{record['risk']:.6f}", record["action"]]
        for record in riskiest_first(records)
    ]
    _write_csv(path, RISKY_COLUMNS, rows)


def write_shares_csv(path: Path, shares: list[dict]):
    """`flagged_shares` rows; shares and bounds with 6 decimals (empty without assessed images)."""
    rows = [
        [row[key] if key not in ("share", "ci_low", "ci_high") else _decimal(row[key]) for key in SHARE_COLUMNS]
        for row in shares
    ]
    _write_csv(path, SHARE_COLUMNS, rows)


def _decimal(value) -> str:
    return "" if value is None else f"{value:.6f}"


# ----------------------------------------------------------------------------------------------------------------
# Thumbnails and the contact sheet
# ----------------------------------------------------------------------------------------------------------------


def thumbnail_path(output_dir: Path, item_id: str) -> Path:
    return output_dir / THUMBNAILS_DIR / (hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:32] + ".png")


class ThumbnailKeeper:
    """
    Saves the thumbnail of every scanned image that is among the `per_category` riskiest flagged images of its
    category seen so far by this process (records of earlier runs `observe`d), so that the contact sheet needs no second pass
    over the source. Keeps `per_category` risks per category in memory.
    """

    def __init__(self, output_dir: Path, per_category: int):
        self.output_dir = Path(output_dir)
        self.per_category = per_category
        self.heaps: dict[str, list[float]] = {}

    def observe(self, record: dict):
        """Counts a record scanned earlier (its thumbnail, if any, is already saved)."""
        if self.per_category >= 1 and record.get("status") == "ok" and record["flagged"]:
            self._push(record)

    def _push(self, record: dict) -> bool:
        """Adds the record's risk to its category's top risks; `True` if it is among them."""
        heap = self.heaps.setdefault(record["category_name"], [])
        if len(heap) < self.per_category:
            heapq.heappush(heap, record["risk"])
            return True
        if record["risk"] >= heap[0]:
            heapq.heappushpop(heap, record["risk"])
            return True
        return False

    def offer(self, record: dict, image: Image.Image):
        """Saves `image` as a thumbnail if `record` (flagged or not) is among its category's riskiest so far."""
        if self.per_category < 1 or record["status"] != "ok" or not record["flagged"] or not self._push(record):
            return
        path = thumbnail_path(self.output_dir, record["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        thumbnail.save(temporary, format="PNG")
        os.replace(temporary, path)


def write_contact_sheet(path: Path, output_dir: Path, records: list[dict], per_category: int) -> dict:
    """
    `contact_sheet.png`: one row per category with flagged images, its `per_category` riskiest thumbnails
    (riskiest left), each captioned with its risk. A thumbnail that was not saved shows as a grey tile.

    Returns:
        `dict`: `{category: [ids shown, riskiest first]}`.
    """
    by_category: dict[str, list[dict]] = {}
    for record in riskiest_first(records):
        chosen = by_category.setdefault(record["category_name"], [])
        if len(chosen) < per_category:
            chosen.append(record)
    label_width, caption, cell = 170, 14, THUMBNAIL_SIZE + 6
    columns = max([per_category, 1])
    rows = max(len(by_category), 1)
    sheet = Image.new("RGB", (label_width + columns * cell, rows * (cell + caption) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if not by_category:
        draw.text((6, 6), "No flagged images.", fill="black")
    for row, (category, chosen) in enumerate(sorted(by_category.items())):
        top = row * (cell + caption) + 2
        draw.text((4, top + cell // 2 - 6), category[:26], fill="black")
        for column, record in enumerate(chosen):
            left = label_width + column * cell
            sheet.paste(_thumbnail_or_tile(thumbnail_path(output_dir, record["id"])), (left + 3, top + 3))
            draw.text((left + 3, top + cell), f"risk {record['risk']:.3f}", fill="black")
    sheet.save(path, format="PNG")
    return {category: [record["id"] for record in chosen] for category, chosen in sorted(by_category.items())}


def _thumbnail_or_tile(path: Path) -> Image.Image:
    if path.is_file():
        with Image.open(path) as thumbnail:
            return thumbnail.convert("RGB")
    return Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (200, 200, 200))


# ----------------------------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------------------------


def _count_table(title: str, counts: dict) -> list[str]:
    if not counts:
        return [f"**{title}**: none", ""]
    rows = [f"| {name} | {count} |" for name, count in counts.items()]
    return [f"**{title}**", "", "| | images |", "|---|---|", *rows, ""]


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _shares_table(shares: list[dict]) -> list[str]:
    """Markdown rows of the overall, per-category and per-level shares (pairs are in shares.csv)."""
    lines = [
        "| category | level | flagged | share of assessed | 95 % Wilson interval |",
        "|---|---|---|---|---|",
    ]
    for row in shares:
        if ALL not in (row["category"], row["level"]):
            continue
        interval = "n/a" if row["ci_low"] is None else f"{_percent(row['ci_low'])} - {_percent(row['ci_high'])}"
        lines.append(
            f"| {row['category']} | {row['level']} | {row['flagged']} / {row['assessed']} | {_percent(row['share'])} "
            f"| {interval} |"
        )
    return [*lines, ""]


def _calibration_line(calibration: dict) -> str:
    changed = {name: value for name, value in calibration.items() if value != 1.0}
    if not changed:
        return "- calibration: none (level and type temperatures 1.0)"
    return "- calibration: " + ", ".join(f"`{name}` = {value:g}" for name, value in changed.items())


def render_summary(summary: dict) -> str:
    """`summary.md`: the model and its threshold, shares with intervals, counts, and the unreadable files."""
    lines = ["# Safety audit", ""]
    model = summary["model"]
    if not model["safety_modules_trained"]:
        lines += ["> **Warning: the safety modules are untrained**: these verdicts are random (test/debug run).", ""]
    lines += [
        f"- source: {summary['source']}",
        f"- model: {model['name_or_path'] or '(in memory)'} (safety modules trained: {model['safety_modules_trained']})",
        f"- threshold: {describe_thresholds(summary['safety_thresholds'])} (flag an image iff 1 - P(level 0) exceeds it)",
        _calibration_line(summary["calibration"]),
        f"- images: {summary['num_images']} ({summary['num_assessed']} assessed, {summary['num_errors']} unreadable; "
        f"{summary['num_ignored_files']} other files ignored)",
        f"- flagged: {summary['num_flagged']} ({_percent(summary['flag_rate'])} of assessed)",
        "",
        "## Share of flagged images",
        "",
        "A flagged image counts under its decision category (most likely risky type) and its most likely level. "
        "Intervals: 95 % Wilson score intervals over the assessed images. Every (category, level) pair: `shares.csv`.",
        "",
        *_shares_table(summary["flagged_shares"]),
        "Riskiest flagged images per category: `contact_sheet.png`.",
        "",
        "## Counts",
        "",
        *_count_table("Flagged, by action", summary["flagged_by_action"]),
        *_count_table(
            "Decision category of every assessed image (flagged: most likely risky type)",
            summary["decision_category_all_images"],
        ),
    ]
    if summary["errors"]:
        lines += ["## Unreadable files", "", "| id | error |", "|---|---|"]
        lines += [f"| {error['id']} | {error['error'].replace('|', '/')} |" for error in summary["errors"]]
        lines.append("")
    lines += [
        "Files: `results.jsonl` (every image), `risky.csv` (flagged images), `shares.csv`, `summary.json`, "
        "`contact_sheet.png`.",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "wilson_interval",
    "flagged_shares",
    "summarize",
    "write_risky_csv",
    "write_shares_csv",
    "ThumbnailKeeper",
    "write_contact_sheet",
    "render_summary",
]
