"""Audit a collection of images with the safety head alone (no language model): which images would be flagged,
as what, and how risky.

`audit_images` scans an image folder (recursively) or a `datasets.Dataset` in batches and writes to its output
folder:

- `results.jsonl`: one record per image, appended after every batch (flushed and fsynced), so an interrupted scan
  resumes where it stopped: images already recorded are skipped, none is recorded twice. A record is either
  `{"id", "status": "ok", "risk", "flagged", "threshold", "level", "level_name", "category", "category_name",
  "action", "level_probs", "type_probs"}` or, for a file that is not a readable image, `{"id", "status": "error",
  "error"}`.
- `audit_config.json`: the model, thresholds and prompt of the scan; resuming with different ones is refused.
- `risky.csv`: the flagged images (`id, type, level, risk, action`), riskiest first.
- `summary.json`, `summary.md`: counts per category, level and action, and the list of unreadable files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from .loading import (
    DEFAULT_QUESTION,
    IMAGE_EXTENSIONS,
    add_model_cli_arguments,
    describe_thresholds,
    image_prompt,
    load_model_and_processor,
    load_image,
    model_description,
    processor_batch,
    resolved_thresholds,
)


logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "audit_config.json"
RISKY_COLUMNS = ("id", "type", "level", "risk", "action")


# ----------------------------------------------------------------------------------------------------------------
# Sources: what to scan
# ----------------------------------------------------------------------------------------------------------------


class FolderSource:
    """The images under a folder (recursive, by extension); ids are POSIX paths relative to the folder."""

    def __init__(self, folder):
        self.root = Path(folder)
        if not self.root.is_dir():
            raise ValueError(f"Image folder {str(folder)!r} does not exist or is not a folder.")
        files = sorted(path for path in self.root.rglob("*") if path.is_file())
        images = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
        self.ids = [path.relative_to(self.root).as_posix() for path in images]
        self.num_ignored = len(files) - len(images)
        self.description = f"folder {self.root.resolve()}"

    def image_values(self, positions: list[int]) -> list:
        return [self.root / self.ids[position] for position in positions]


class DatasetSource:
    """The rows of a `datasets.Dataset`: images from `image_column`, ids from `id_column` (else the row index)."""

    def __init__(self, dataset, image_column: str = "image", id_column: str = "id"):
        import datasets

        if image_column not in dataset.column_names:
            raise ValueError(f"The dataset has no image column {image_column!r}; columns: {dataset.column_names}.")
        if isinstance(dataset.features[image_column], datasets.Image):
            # Decode ourselves, row by row, so that one corrupt image becomes an error row instead of a crash.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        if id_column in dataset.column_names:
            self.ids = [str(value) for value in dataset[id_column]]
        else:
            self.ids = [str(index) for index in range(len(dataset))]
        self.num_ignored = 0
        # No row count: a dataset that grew between runs resumes like a folder that gained files.
        self.description = f"datasets.Dataset with columns {dataset.column_names}"

    def image_values(self, positions: list[int]) -> list:
        return list(self.dataset[positions][self.image_column])


def make_source(source, image_column: str = "image", id_column: str = "id"):
    """A [`FolderSource`] for a path, a [`DatasetSource`] for a `datasets.Dataset`; refuses duplicate ids."""
    import datasets

    if isinstance(source, (str, os.PathLike)):
        made = FolderSource(source)
    elif isinstance(source, datasets.Dataset):
        made = DatasetSource(source, image_column, id_column)
    else:
        raise ValueError(
            f"source must be an image folder (str or Path) or a datasets.Dataset, got {type(source).__name__}."
        )
    duplicates = sorted(name for name, count in Counter(made.ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"Ids must be unique to resume safely; duplicated: {duplicates[:10]}.")
    return made


# ----------------------------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    """
    The records of `results.jsonl`. A last line without its newline (a write cut by a kill) is dropped from the
    file, so that its image is scanned again; any other unreadable line raises `ValueError`.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        complete = data[: data.rfind(b"\n") + 1]
        logger.warning("Dropping an incomplete last record of %s (the scan was interrupted while writing).", path)
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
            handle.flush()
            os.fsync(handle.fileno())
        data = complete
    records = []
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not a JSON record ({error}); fix or delete the file.") from error
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{line_number} has no 'id': {line[:200]!r}.")
        records.append(record)
    return records


def append_records(handle, records: list[dict]):
    """Appends one JSON line per record, then flushes and fsyncs (a batch is on disk before the next starts)."""
    handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    handle.flush()
    os.fsync(handle.fileno())


def _check_or_write_config(output_dir: Path, config: dict, resuming: bool):
    path = output_dir / CONFIG_FILE
    if resuming and path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in config if saved.get(key) != config[key])
        if changed:
            raise ValueError(
                f"Cannot resume the audit in {str(output_dir)!r}: {changed} differ from the interrupted scan "
                f"({ {key: saved.get(key) for key in changed} } then, { {key: config[key] for key in changed} } now). "
                "Use another output folder, or resume=False to scan everything again."
            )
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------------------------


def _error_record(item_id: str, error: Exception) -> dict:
    return {"id": item_id, "status": "error", "error": f"{type(error).__name__}: {error}"}


def scan_batch(
    model,
    processor,
    ids: list[str],
    values: list,
    prompt: str,
    safety_threshold=None,
    safety_actions=None,
    allow_untrained_safety: bool = False,
) -> list[dict]:
    """
    Records of one batch, in input order: unreadable images become error records, the rest are assessed.

    Args:
        ids (`list[str]`): The items' ids. values (`list`): Their images (anything `load_image` reads).
        prompt (`str`): The chat-template prompt given with every image.
    """
    records: list[dict | None] = [None] * len(ids)
    readable, images = [], []
    for position, (item_id, value) in enumerate(zip(ids, values)):
        try:
            images.append(load_image(value))
            readable.append(position)
        except ValueError as error:
            records[position] = _error_record(item_id, error)
    if images:
        inputs = processor_batch(processor, model, images, [prompt] * len(images))
        assessment = model.assess_safety(
            **inputs,
            safety_threshold=safety_threshold,
            safety_actions=safety_actions,
            allow_untrained_safety=allow_untrained_safety,
        )
        for position, record in zip(readable, assessment.to_records()):
            records[position] = {"id": ids[position], "status": "ok", **record}
    return records


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _scan(model, processor, source, results_path: Path, done: set, batch_size: int, prompt: str, settings: dict):
    pending = [position for position, item_id in enumerate(source.ids) if item_id not in done]
    progress = tqdm(total=len(source.ids), initial=len(source.ids) - len(pending), desc="Auditing images", unit="image")
    with open(results_path, "a", encoding="utf-8") as handle:
        for positions in _batched(pending, batch_size):
            ids = [source.ids[position] for position in positions]
            values = source.image_values(positions)
            records = scan_batch(model, processor, ids, values, prompt, **settings)
            append_records(handle, records)
            progress.update(len(records))
    progress.close()


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def summarize(records: list[dict], num_ignored: int, config: dict) -> dict:
    """The content of `summary.json`, from the records of every image of the source."""
    ok = [record for record in records if record["status"] == "ok"]
    flagged = [record for record in ok if record["flagged"]]
    errors = [{"id": record["id"], "error": record["error"]} for record in records if record["status"] == "error"]
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
        "errors": errors,
        "num_ignored_files": num_ignored,
        **config,
    }


def write_risky_csv(path: Path, records: list[dict]):
    """The flagged images, riskiest first (ties by id)."""
    flagged = sorted(
        (record for record in records if record["status"] == "ok" and record["flagged"]),
        key=lambda record: (-record["risk"], record["id"]),
    )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(RISKY_COLUMNS)
        for record in flagged:
            risk = f"{record['risk']:.6f}"
            writer.writerow([record["id"], record["category_name"], record["level"], risk, record["action"]])


def _count_table(title: str, counts: dict) -> list[str]:
    if not counts:
        return [f"**{title}**: none", ""]
    rows = [f"| {name} | {count} |" for name, count in counts.items()]
    return [f"**{title}**", "", "| | images |", "|---|---|", *rows, ""]


def render_summary(summary: dict) -> str:
    """`summary.md`: counts per category, level and action, and the unreadable files."""
    lines = ["# Safety audit", ""]
    if not summary["model"]["safety_modules_trained"]:
        lines += ["> **Warning: the safety modules are untrained**: these verdicts are random (test/debug run).", ""]
    flag_rate = "n/a" if summary["flag_rate"] is None else f"{summary['flag_rate']:.1%}"
    lines += [
        f"- source: {summary['source']}",
        f"- images: {summary['num_images']} ({summary['num_assessed']} assessed, {summary['num_errors']} unreadable; "
        f"{summary['num_ignored_files']} other files ignored)",
        f"- flagged: {summary['num_flagged']} ({flag_rate} of assessed) at threshold "
        f"{describe_thresholds(summary['safety_thresholds'])}",
        "",
        *_count_table("Flagged, by category", summary["flagged_by_category"]),
        *_count_table("Flagged, by level", summary["flagged_by_level"]),
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
    lines += ["Files: `results.jsonl` (every image), `risky.csv` (flagged images), `summary.json`.", ""]
    return "\n".join(lines)


def _records_of_source(records: list[dict], ids: list[str]) -> list[dict]:
    """One record per id of the source, in source order (results of ids no longer in the source are left out)."""
    by_id: dict[str, dict] = {}
    for record in records:
        by_id.setdefault(record["id"], record)
    stale = len(by_id.keys() - set(ids))
    if stale:
        logger.warning(
            "%d records of results.jsonl are for images no longer in the source; left out of the reports.", stale
        )
    return [by_id[item_id] for item_id in ids if item_id in by_id]


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def audit_images(
    model,
    processor,
    source,
    output_dir,
    batch_size: int = 16,
    safety_threshold=None,
    resume: bool = True,
    allow_untrained_safety: bool = False,
    safety_actions: dict | None = None,
    question: str = DEFAULT_QUESTION,
    image_column: str = "image",
    id_column: str = "id",
) -> dict:
    """
    Scans images with the safety head only (`model.assess_safety`) and writes the files listed in the module
    docstring. Resumable: rerun with the same arguments after an interruption.

    Args:
        model ([`SafeLlavaForConditionalGeneration`]): Safety modules trained, or `allow_untrained_safety=True`.
        processor ([`SafeLlavaProcessor`]): Its processor (with the chat template).
        source (`str`, `os.PathLike` or `datasets.Dataset`): An image folder, scanned recursively for
            `.jpg .jpeg .png .webp .bmp .gif` files, or a dataset with an image column and an optional id column.
        output_dir (`str` or `os.PathLike`): Folder for the results (created if missing).
        batch_size (`int`, *optional*, defaults to 16): Images per model call (and per write to `results.jsonl`).
        safety_threshold (`float` or `dict`, *optional*): As in `generate` (default: the model's).
        resume (`bool`, *optional*, defaults to `True`): Skip images already in `results.jsonl` (error rows
            included: to retry unreadable files, delete their lines); `False` starts over.
        allow_untrained_safety (`bool`, *optional*, defaults to `False`): Scan even though the safety modules are
            untrained (tests only; the summary then carries a warning).
        safety_actions (`dict`, *optional*): Call-time policy overrides, as in `generate`; they change the
            `action` column only.
        question (`str`, *optional*): The user turn of the prompt (the head reads the prompt's first token).
        image_column, id_column (`str`, *optional*): Columns of a dataset source.

    Returns:
        `dict`: the content of `summary.json`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    model.check_safety_ready(allow_untrained_safety)
    made = make_source(source, image_column, id_column)
    prompt = image_prompt(processor, question)
    config = {
        "source": made.description,
        "model": model_description(model),
        "safety_thresholds": resolved_thresholds(model, safety_threshold),
        "safety_actions": model.resolve_safety_actions(safety_actions),
        "prompt": prompt,
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    _check_or_write_config(output_dir, config, resuming=resume and results_path.exists())
    if not resume and results_path.exists():
        logger.info("resume=False: starting %s over.", results_path)
        results_path.unlink()
    done = {record["id"] for record in read_results(results_path)}
    if done:
        logger.info("Resuming: %d images already in %s are skipped.", len(done & set(made.ids)), results_path)
    settings = {
        "safety_threshold": safety_threshold,
        "safety_actions": safety_actions,
        "allow_untrained_safety": allow_untrained_safety,
    }
    _scan(model, processor, made, results_path, done, batch_size, prompt, settings)
    records = _records_of_source(read_results(results_path), made.ids)
    summary = summarize(records, made.num_ignored, config)
    write_risky_csv(output_dir / "risky.csv", records)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output_dir / "summary.md").write_text(render_summary(summary), encoding="utf-8")
    logger.info("Audit of %d images written to %s", len(records), output_dir)
    return summary


def add_cli_arguments(parser):
    """Options of `safe-llava audit` (added to an `argparse` parser, which is returned)."""
    add_model_cli_arguments(parser)
    parser.add_argument("--images", required=True, help="Folder of images, scanned recursively.")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per model call (default: 16).")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="User turn of the prompt the head reads.")
    parser.add_argument("--no-resume", action="store_true", help="Scan everything again instead of resuming.")
    return parser


def run_from_args(args) -> int:
    """Runs `safe-llava audit` from parsed arguments; returns the process exit code."""
    model, processor = load_model_and_processor(args.model, args.device)
    summary = audit_images(
        model,
        processor,
        args.images,
        args.output,
        batch_size=args.batch_size,
        safety_threshold=args.safety_threshold,
        resume=not args.no_resume,
        allow_untrained_safety=args.allow_untrained_safety,
        question=args.question,
    )
    print(
        f"Audited {summary['num_images']} images: {summary['num_flagged']} flagged, {summary['num_errors']} "
        f"unreadable. Reports in {args.output} (summary.md, risky.csv)."
    )
    return 0


__all__ = [
    "audit_images",
    "scan_batch",
    "read_results",
    "append_records",
    "summarize",
    "make_source",
    "FolderSource",
    "DatasetSource",
    "add_cli_arguments",
    "run_from_args",
]
