"""Audit a collection of images with the safety head alone (no language model): which images would be flagged,
as what, and how risky; and what share of the collection that is.

`audit_images` scans an image folder (recursively), a `datasets.Dataset` or a streaming `datasets.IterableDataset`
in batches, in one process or in several (`torchrun`, `accelerate launch`: see `audit_distributed`), and writes to
its output folder:

- `results.jsonl`: one record per image, sorted by id. While scanning, every batch is appended and fsynced (to
  `results.jsonl` by a single process, to `shards/rank-R-of-W.jsonl` by each of `W` processes), so an interrupted
  scan resumes where it stopped, at any world size: images already recorded are skipped, none is recorded twice.
  A record is either `{"id", "status": "ok", "risk", "flagged", "threshold", "level", "level_name", "category",
  "category_name", "action", "level_probs", "type_probs"}` or, for a file that is not a readable image,
  `{"id", "status": "error", "error"}`.
- `audit_config.json`: the model, thresholds, calibration and prompt of the scan; resuming with different ones is
  refused.
- `risky.csv`, `shares.csv`, `summary.json`, `summary.md`, `contact_sheet.png`: see `audit_report`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..checks_safe_llava import check_integer
from ..fileio import MARKER_FILE, has_marker, load_image, write_marker
from ..safety_model_safe_llava import check_safety_ready
from .audit_distributed import (
    DistributedContext,
    append_records,
    record_files,
    clear_records,
    default_device,
    distributed_context,
    iter_records,
    launch_env,
    merge_records,
    own_records_path,
    read_results,
)
from .audit_report import (
    THUMBNAILS_DIR,
    ThumbnailKeeper,
    render_summary,
    summarize,
    write_contact_sheet,
    write_risky_csv,
    write_shares_csv,
)
from .audit_sources import DatasetSource, FolderSource, StreamingSource, load_dataset_source, make_source
from .loading import (
    DEFAULT_QUESTION,
    add_model_cli_arguments,
    image_prompt,
    load_model_and_processor,
    model_description,
    processor_batch,
    resolved_thresholds,
)


logger = logging.getLogger(__name__)

CONFIG_FILE = "audit_config.json"
AUDIT_COMMAND = "audit"


# ----------------------------------------------------------------------------------------------------------------
# The audit's settings
# ----------------------------------------------------------------------------------------------------------------


def calibration(model) -> dict:
    """The temperatures the head's probabilities are divided by (1.0: uncalibrated)."""
    return {
        name: float(getattr(model.config, name, 1.0))
        for name in ("safety_level_temperature", "safety_type_temperature")
    }


def _check_config(output_dir: Path, config: dict, resuming: bool):
    """Refuses to resume a scan made with other settings (read only: every rank checks, with the same answer)."""
    path = output_dir / CONFIG_FILE
    if not (resuming and path.exists()):
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(key for key in config if saved.get(key) != config[key])
    if changed:
        raise ValueError(
            f"Cannot resume the audit in {str(output_dir)!r}: {changed} differ from the interrupted scan "
            f"({ {key: saved.get(key) for key in changed} } then, { {key: config[key] for key in changed} } now). "
            "Use another output folder, or resume=False to scan everything again."
        )


# ----------------------------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------------------------


def _error_record(item_id: str, error: Exception) -> dict:
    """An error row; a message holding an undecodable file name (surrogate escapes) is written with `\\x` escapes."""
    message = f"{type(error).__name__}: {error}".encode("utf-8", "backslashreplace").decode("utf-8")
    return {"id": item_id, "status": "error", "error": message}


def _assess_batch(model, processor, ids, values, prompt, settings) -> tuple[list[dict], dict]:
    """Records of one batch in input order, and the decoded images `{position: PIL image}`."""
    records: list[dict | None] = [None] * len(ids)
    images = {}
    for position, (item_id, value) in enumerate(zip(ids, values)):
        try:
            images[position] = load_image(value)
        except ValueError as error:
            records[position] = _error_record(item_id, error)
    if images:
        inputs = processor_batch(processor, model, list(images.values()), [prompt] * len(images))
        assessment = model.assess_safety(**inputs, **settings)
        for position, record in zip(images, assessment.to_records()):
            records[position] = {"id": ids[position], "status": "ok", **record}
    return records, images


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
    settings = {
        "safety_threshold": safety_threshold,
        "safety_actions": safety_actions,
        "allow_untrained_safety": allow_untrained_safety,
    }
    return _assess_batch(model, processor, ids, values, prompt, settings)[0]


def _scan(model, processor, source, context: DistributedContext, plan: dict) -> dict:
    """Scans this rank's pending images into its own records file; returns what it did (images, seconds)."""
    done, batch_size, keeper = plan["done"], plan["batch_size"], plan["thumbnails"]
    total = source.pending_count(done, context.rank, context.world_size)
    description = "Auditing images" + (f" (rank 0 of {context.world_size})" if context.world_size > 1 else "")
    progress = tqdm(total=total, desc=description, unit="image", disable=not context.is_main)
    started, scanned = time.perf_counter(), 0
    with open(plan["path"], "a", encoding="utf-8") as handle:
        for ids, values in source.batches(done, context.rank, context.world_size, batch_size):
            records, images = _assess_batch(model, processor, ids, values, plan["prompt"], plan["settings"])
            for position, image in images.items():  # before the records: a kill may leave a spare thumbnail,
                keeper.offer(records[position], image)  # never a recorded image without its thumbnail
            append_records(handle, records)
            scanned += len(records)
            progress.update(len(records))
    progress.close()
    return {"rank": context.rank, "images": scanned, "seconds": round(time.perf_counter() - started, 3)}


def _check_audit_folder(output_dir: Path):
    """Starting over deletes the records: only in a folder an earlier audit wrote (its marker), never a user's file."""
    if not has_marker(output_dir, AUDIT_COMMAND):
        raise ValueError(
            f"{str(output_dir)!r} holds results but was not written by safe-llava audit (no {MARKER_FILE}); resume=False "
            "(--no-resume) would delete them. Choose another --output, or remove those files yourself."
        )


def _prepare(output_dir: Path, config: dict, resume: bool, context: DistributedContext, keeper) -> set:
    """
    Checks or writes `audit_config.json`, clears an old scan when `resume=False`, repairs this rank's own file, and
    returns the ids already recorded, showing their records to the thumbnail `keeper` (the same on every rank:
    barriers keep these reads before any new write). Records are streamed, not held.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    own = own_records_path(output_dir, context)
    _check_config(output_dir, config, resuming=resume and bool(record_files(output_dir)))
    context.barrier()
    if context.is_main:
        if not resume and record_files(output_dir):
            _check_audit_folder(output_dir)
            logger.info("resume=False: starting the audit in %s over.", output_dir)
            clear_records(output_dir)
            shutil.rmtree(output_dir / THUMBNAILS_DIR, ignore_errors=True)
        (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_marker(output_dir, AUDIT_COMMAND)
    context.barrier()
    own.parent.mkdir(parents=True, exist_ok=True)
    read_results(own, repair=True)
    context.barrier()
    done = set()
    for record in iter_records(output_dir):
        done.add(record["id"])
        keeper.observe(record)
    context.barrier()
    return done


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _records_of_source(records: list[dict], ids) -> list[dict]:
    """The records of the source's ids (all records when the ids are only known from the records: streaming)."""
    if ids is None:
        return records
    wanted = set(ids)
    kept = [record for record in records if record["id"] in wanted]
    if len(kept) < len(records):
        logger.warning(
            "%d records of results.jsonl are for images no longer in the source; left out of the reports.",
            len(records) - len(kept),
        )
    return kept


def write_reports(output_dir: Path, records: list[dict], num_ignored: int, config: dict, extra: dict) -> dict:
    """Writes `summary.json`, `summary.md`, `risky.csv`, `shares.csv` and `contact_sheet.png`; returns the summary."""
    summary = summarize(records, num_ignored, config)
    summary["contact_sheet"] = write_contact_sheet(
        output_dir / "contact_sheet.png", output_dir, records, extra.pop("contact_sheet_size")
    )
    summary.update(extra)
    write_risky_csv(output_dir / "risky.csv", records)
    write_shares_csv(output_dir / "shares.csv", summary["flagged_shares"])
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output_dir / "summary.md").write_text(render_summary(summary), encoding="utf-8")
    return summary


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
    contact_sheet_size: int = 8,
    distributed_timeout_minutes: float = 120.0,
) -> dict:
    """
    Scans images with the safety head only (`model.assess_safety`) and writes the files listed in the module
    docstring. Resumable: rerun with the same arguments after an interruption. Under a torch.distributed launcher
    (`torchrun`, `accelerate launch`: `WORLD_SIZE` > 1) every process calls this with the same arguments, scans its
    own shard, and rank 0 merges the results once all are done.

    Args:
        model ([`SafeLlavaForConditionalGeneration`]): Safety modules trained, or `allow_untrained_safety=True`.
        processor ([`SafeLlavaProcessor`]): Its processor (with the chat template).
        source (`str`, `os.PathLike`, `datasets.Dataset` or `datasets.IterableDataset`): An image folder, scanned
            recursively for `.jpg .jpeg .png .webp .bmp .gif` files, or a dataset with an image column and an
            optional id column (without one, ids are row numbers).
        output_dir (`str` or `os.PathLike`): Folder for the results (created if missing; shared by all processes).
        batch_size (`int`, *optional*, defaults to 16): Images per model call (and per write of the records).
        safety_threshold (`float` or `dict`, *optional*): As in `generate` (default: the model's).
        resume (`bool`, *optional*, defaults to `True`): Skip images already recorded (error rows included: to
            retry unreadable files, delete their lines); `False` starts over.
        allow_untrained_safety (`bool`, *optional*, defaults to `False`): Scan even though the safety modules are
            untrained (tests only; the summary then carries a warning).
        safety_actions (`dict`, *optional*): Call-time policy overrides, as in `generate`; they change the
            `action` column only.
        question (`str`, *optional*): The user turn of the prompt (the head reads the prompt's first token).
        image_column, id_column (`str`, *optional*): Columns of a dataset source.
        contact_sheet_size (`int`, *optional*, defaults to 8): Thumbnails per category in `contact_sheet.png`.
        distributed_timeout_minutes (`float`, *optional*): How long a process waits for the others at a barrier.

    Returns:
        `dict`: the content of `summary.json` (on every rank).
    """
    check_integer("batch_size", batch_size, 1)
    check_integer("contact_sheet_size", contact_sheet_size, 0)
    check_safety_ready(model.config, allow_untrained_safety)
    made = make_source(source, image_column, id_column)
    prompt = image_prompt(processor, question)
    config = {
        "source": made.description,
        "model": model_description(model),
        "safety_thresholds": resolved_thresholds(model, safety_threshold),
        "calibration": calibration(model),
        "safety_actions": model.safety_policy.resolve_actions(safety_actions),
        "prompt": prompt,
    }
    output_dir = Path(output_dir)
    context = distributed_context(model.device, distributed_timeout_minutes)
    try:
        keeper = ThumbnailKeeper(output_dir, contact_sheet_size)
        plan = {
            "done": _prepare(output_dir, config, resume, context, keeper),
            "batch_size": batch_size,
            "path": own_records_path(output_dir, context),
            "prompt": prompt,
            "settings": {
                "safety_threshold": safety_threshold,
                "safety_actions": safety_actions,
                "allow_untrained_safety": allow_untrained_safety,
            },
            "thumbnails": keeper,
        }
        if plan["done"]:
            logger.info("Resuming: %d images already recorded in %s are skipped.", len(plan["done"]), output_dir)
        ranks = context.gather(_scan(model, processor, made, context, plan))
        if context.is_main:
            records = _records_of_source(merge_records(output_dir), made.ids)
            extra = {"last_run": {"world_size": context.world_size, "ranks": ranks}}
            write_reports(output_dir, records, made.num_ignored, config, {**extra, "contact_sheet_size": contact_sheet_size})
            logger.info("Audit of %d images written to %s", len(records), output_dir)
        context.barrier()
        return json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    finally:
        context.close()


def add_cli_arguments(parser):
    """Options of `safe-llava audit` (added to an `argparse` parser, which is returned)."""
    add_model_cli_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images, scanned recursively.")
    source.add_argument(
        "--dataset",
        help="Hugging Face dataset: a local .parquet/.arrow/.jsonl/.csv file, a save_to_disk folder, a folder of "
        "data files, or a Hub dataset id (needs network).",
    )
    parser.add_argument("--split", default="train", help="Split of --dataset (default: train).")
    parser.add_argument("--image-column", default="image", help="Image column of --dataset (default: image).")
    parser.add_argument(
        "--id-column", default=None, help="Id column of --dataset (default: 'id' when present, else row numbers)."
    )
    parser.add_argument(
        "--streaming", action="store_true", help="Stream --dataset row by row instead of loading it (large sets)."
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Images per model call (default: 16).")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="User turn of the prompt the head reads.")
    parser.add_argument("--no-resume", action="store_true", help="Scan everything again instead of resuming.")
    parser.add_argument(
        "--contact-sheet-size", type=int, default=8, help="Thumbnails per category in contact_sheet.png (default: 8)."
    )
    parser.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=120.0,
        help="Under torchrun/accelerate: how long a process waits for the slowest one (default: 120).",
    )
    return parser


def _cli_source(args):
    """The folder, or the loaded dataset split, that `args` name."""
    if args.images is not None:
        if args.streaming:
            raise ValueError("--streaming applies to --dataset, not to --images.")
        return args.images
    dataset = load_dataset_source(args.dataset, args.split, args.streaming)
    columns = dataset.column_names
    if args.id_column is not None and columns is not None and args.id_column not in columns:
        raise ValueError(f"--id-column {args.id_column!r} is not a column of the dataset; columns: {columns}.")
    return dataset


def run_from_args(args) -> int:
    """Runs `safe-llava audit` from parsed arguments; returns the process exit code."""
    source = _cli_source(args)
    model, processor = load_model_and_processor(args.model, args.device or default_device())
    summary = audit_images(
        model,
        processor,
        source,
        args.output,
        batch_size=args.batch_size,
        safety_threshold=args.safety_threshold,
        resume=not args.no_resume,
        allow_untrained_safety=args.allow_untrained_safety,
        question=args.question,
        image_column=args.image_column,
        id_column=args.id_column or "id",
        contact_sheet_size=args.contact_sheet_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    if launch_env()[0] == 0:  # under torchrun, one summary line (rank 0's)
        print(
            f"Audited {summary['num_images']} images: {summary['num_flagged']} flagged, {summary['num_errors']} "
            f"unreadable. Reports in {args.output} (summary.md, risky.csv, shares.csv, contact_sheet.png)."
        )
    return 0


__all__ = [
    "audit_images",
    "scan_batch",
    "read_results",
    "append_records",
    "summarize",
    "calibration",
    "write_reports",
    "make_source",
    "load_dataset_source",
    "FolderSource",
    "DatasetSource",
    "StreamingSource",
    "add_cli_arguments",
    "run_from_args",
]
