"""Training data in the paper's record schema: loading, row validation, bad-row reports and clean subsampling.

A record (one row) is

```python
{
    "image": "relative/or/absolute/path.jpg" | PIL.Image.Image | bytes | {"bytes": ..., "path": ...},
    "conversations": [
        {"from": "USER" | "human", "value": "<image>\nWhat is shown?"},
        {"from": "ASSISTANT" | "gpt", "value": "I'm sorry, but I can't ..."},
    ],
    "safe_level": 0..3,    # "Safe to answer", "Answer carefully", "Answer or reject", "Reject"
    "safe_type": 0..6,     # Politics, ..., Misleading, Clean (the last type is the clean one)
}
```

Rows are read from a JSON (a list) or JSON Lines file, a list of dicts, or any `datasets.Dataset`, and validated
before training starts: every bad row is reported with its 0-based index and the reason. A row whose values cannot
share a column with the others (a float or string label among integers, a line that is not JSON) is one bad row; it
never spoils its column. Image paths of a data file must stay inside its data root (`image_root`, by default the
file's folder): an absolute path elsewhere or one that climbs out with `..` is a bad row unless
`allow_images_outside_root=True`, so that a downloaded data file cannot make training read `~/.ssh` or `/etc`.
"""

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from PIL import Image
from tqdm.auto import tqdm

from ..checks_safe_llava import is_integer
from ..fileio import load_image, read_json_list


logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's `from` field, case-insensitive, to chat-template roles.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SCHEMA_COLUMNS = ("image", "conversations", "safe_level", "safe_type")
SKIPPED_ROWS_FILE = "skipped_rows.json"
BAD_ROWS_FILE = "bad_rows.json"
# Set while loading for a row whose values had to be left out (see `_storable_record`); dropped after validation.
PROBLEM_COLUMN = "_row_problem"
LABEL_COLUMNS = ("safe_level", "safe_type")
_INT64_RANGE = (-(2**63), 2**63)


@dataclass(frozen=True)
class BadRow:
    """One row that cannot be trained on: its 0-based index in the source and why."""

    index: int
    reason: str


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_safety_dataset(source, image_root: str | Path | None = None) -> datasets.Dataset:
    """
    Reads records in the paper's schema into a `datasets.Dataset` (rows are not validated here).

    Args:
        source: a `.json` (list of records) or `.jsonl` file path, a list of record dicts, or a `datasets.Dataset`.
        image_root: folder that relative image paths are relative to. Defaults to the JSON file's folder for a
            file source; for other sources relative paths are left as they are (relative to the working directory).

    Returns:
        A `datasets.Dataset` whose string image paths are absolute. A row of a file or list whose values could not
        be stored next to the others' (e.g. `safe_level: 1.5` among integers, a JSON Lines line that does not parse)
        keeps its place with those values empty and the reason in the column `_row_problem`, which `check_record`
        reports: one bad value never changes the type of its whole column.
    """
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)):
        dataset = records_to_dataset(list(source))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in (".json", ".jsonl") or not path.is_file():
            raise ValueError(
                f"Training data {str(source)!r} is not an existing .json or .jsonl file; accepted sources: a .json "
                "(list of records) or .jsonl file, a list of record dicts, or a datasets.Dataset."
            )
        dataset = records_to_dataset(read_json_records(path))
        image_root = path.parent if image_root is None else image_root
    else:
        raise ValueError(
            f"Cannot read training data from a {type(source).__name__}; accepted sources: a .json (list of records) "
            "or .jsonl file path, a list of record dicts, or a datasets.Dataset."
        )
    if image_root is not None and "image" in dataset.column_names:
        dataset = _absolute_image_paths(dataset, Path(image_root))
    return dataset


def data_root(source, image_root: str | Path | None = None) -> Path | None:
    """The folder that image paths of `source` must stay in: `image_root`, else a data file's folder, else None
    (an in-memory list or dataset: its paths are the caller's own)."""
    if image_root is not None:
        return Path(image_root)
    if isinstance(source, (str, Path)):
        return Path(source).parent
    return None


class _UnparsedLine:
    """A JSON Lines line that is not JSON: kept as a row, so that the rows after it keep their indices."""

    def __init__(self, reason: str):
        self.reason = reason


def read_json_records(path: Path) -> list:
    """The records of a `.json` file (one list) or a `.jsonl` file (one per non-blank line), as parsed by `json`,
    so that `1` and `1.0` stay distinct."""
    if path.suffix == ".json":
        return read_json_list(path, "Training data")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                records.append(_UnparsedLine(f"line {number} is not valid JSON ({error})"))
    return records


def records_to_dataset(records: list) -> datasets.Dataset:
    """
    A `datasets.Dataset` of `records` (dicts), with the schema's columns always present. Values that would force a
    column to another type (a float or string label, a conversation that is not a list of turns, an image of an
    unknown kind) are left out of their row and named in `_row_problem` instead.
    """
    stored, problems = zip(*map(_storable_record, records)) if records else ((), ())
    columns = list(SCHEMA_COLUMNS)
    for record in stored:
        columns.extend(key for key in record if key not in columns)
    data = {column: [record.get(column) for record in stored] for column in columns}
    if any(problems):
        data[PROBLEM_COLUMN] = list(problems)
    try:
        return datasets.Dataset.from_dict(data)
    except (TypeError, ValueError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError are among them
        raise ValueError(
            f"The training records cannot form one table ({type(error).__name__}: {error}); every column must hold "
            "values of one type in every row."
        ) from error


def _storable_record(record) -> tuple[dict, str | None]:
    """`(record with the values that can be stored, the reason a value was left out or None)`."""
    if isinstance(record, _UnparsedLine):
        return {}, record.reason
    if not isinstance(record, dict):
        return {}, f"the row is a {type(record).__name__}, not a record object"
    stored, problem = dict(record), None
    for name in LABEL_COLUMNS:
        value = record.get(name)
        if value is None:
            continue
        if not is_integer(value):
            stored[name], problem = None, problem or f"{name}={value!r} is not an integer"
        elif not _INT64_RANGE[0] <= value < _INT64_RANGE[1]:
            stored[name], problem = None, problem or f"{name}={value} is out of range"
    conversations = record.get("conversations")
    if conversations is not None:
        if _is_list_of_turns(conversations):
            stored["conversations"] = [{"from": turn["from"], "value": turn["value"]} for turn in conversations]
        else:
            stored["conversations"], problem = None, problem or _check_conversations(conversations)
    image = record.get("image")
    if isinstance(image, dict) and isinstance(image.get("path"), str) and not image.get("bytes"):
        stored["image"] = image = image["path"]  # `{"path": ...}` and a path string share one column
    if image is not None and not isinstance(image, (str, bytes, bytearray, dict, Image.Image)):
        stored["image"], problem = None, problem or f"image={image!r} is not a path, encoded bytes or an image"
    return stored, problem


def _is_list_of_turns(conversations) -> bool:
    return isinstance(conversations, list) and all(
        isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
        for turn in conversations
    )


def _absolute_image_paths(dataset: datasets.Dataset, image_root: Path) -> datasets.Dataset:
    feature = dataset.features["image"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return dataset  # PIL images or bytes: nothing to resolve

    def resolve(row):
        image = row["image"]
        if isinstance(image, str) and image and not Path(image).is_absolute():
            row["image"] = os.path.normpath(image_root / image)  # "a/../b.png" is read as the root check sees it
        return row

    return dataset.map(resolve, desc="Resolving image paths")


# ----------------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------------


def to_chat_messages(conversations: list[dict], image=None, include_answers: bool = True) -> list[dict]:
    """
    Converts LLaVA-format turns into chat-template messages, the image placed where `<image>` was.

    Args:
        conversations: `[{"from": "USER" | "human" | "ASSISTANT" | "gpt" | "system", "value": str}, ...]`.
        image: the row's image (any value the processor accepts, e.g. a PIL image), or `None`.
        include_answers: `False` keeps only the turns before the first assistant turn (a prompt to answer).

    Returns:
        `[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": ...}]}, ...]`.
    """
    messages = []
    for turn in conversations:
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"Unknown conversation role {turn['from']!r}; accepted: {sorted(ROLE_ALIASES)}.")
        if role == "assistant" and not include_answers:
            break
        text = turn["value"]
        content = []
        if IMAGE_PLACEHOLDER in text:
            content.append({"type": "image", "image": image} if image is not None else {"type": "image"})
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def check_record(
    record: dict,
    num_levels: int,
    num_types: int,
    check_image: bool = True,
    image_root: str | Path | None = None,
) -> str | None:
    """
    The reason why `record` cannot be trained on, or `None` if it is fine.

    Checks the labels (`0 <= safe_level < num_levels`, `0 <= safe_type < num_types`), the conversation (a list of
    `{from, value}` turns with known roles, exactly one `<image>` placeholder, at least one non-empty assistant turn),
    with `image_root` that an image path lies inside that folder (no absolute path elsewhere, no `..` out of it),
    and, when `check_image`, that the image exists and decodes (a decompression bomb is an unreadable image).
    """
    if record.get(PROBLEM_COLUMN):
        return record[PROBLEM_COLUMN]
    for name, num_classes in (("safe_level", num_levels), ("safe_type", num_types)):
        value = record.get(name)
        if value is None:
            return f"{name} is missing"
        if not is_integer(value):
            return f"{name}={value!r} is not an integer"
        if not 0 <= value < num_classes:
            return f"{name}={value} is out of range [0, {num_classes - 1}]"
    reason = _check_conversations(record.get("conversations"))
    if reason is not None:
        return reason
    image = record.get("image")
    if image is None or (isinstance(image, dict) and not (image.get("bytes") or image.get("path"))):
        return "image is missing"
    reason = image_outside_root(image, image_root) if image_root is not None else None
    if reason is not None:
        return reason
    if check_image:
        try:
            load_image(image)
        except ValueError as error:
            return str(error) if str(error).startswith("unreadable") else f"unreadable image ({error})"
    return None


def image_outside_root(image, image_root: str | Path) -> str | None:
    """Why the file `image` (a path, or `{"path": ...}` without bytes) names lies outside `image_root`, or None
    (also for in-memory images). Checked on the path's text, so a link inside the root may point elsewhere."""
    path = image.get("path") if isinstance(image, dict) and not image.get("bytes") else image
    if not isinstance(path, (str, Path)):
        return None
    root = os.path.normpath(os.path.abspath(image_root))
    resolved = os.path.normpath(os.path.join(root, path))
    if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return (
        f"image path {str(path)!r} lies outside the data root {root} (an absolute path elsewhere, or '..' climbing "
        "out); pass allow_images_outside_root=True (--allow-images-outside-root) if you trust this data file"
    )


def _check_conversations(conversations) -> str | None:
    if not isinstance(conversations, list) or not conversations:
        return "conversations is missing or empty"
    placeholders, has_answer = 0, False
    for position, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return f"conversation turn {position} is not a {{'from': str, 'value': str}} dict"
        role = ROLE_ALIASES.get(turn["from"].lower())
        if role is None:
            return f"conversation turn {position} has unknown role {turn['from']!r} (accepted: {sorted(ROLE_ALIASES)})"
        placeholders += turn["value"].count(IMAGE_PLACEHOLDER)
        if role == "assistant":
            if IMAGE_PLACEHOLDER in turn["value"]:
                return f"conversation turn {position} is an assistant turn holding {IMAGE_PLACEHOLDER}"
            has_answer = has_answer or bool(turn["value"].strip())
    if placeholders == 0:
        return f"the conversation has no {IMAGE_PLACEHOLDER} placeholder"
    if placeholders > 1:
        return f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders for one image"
    if not has_answer:
        return "the conversation has no (non-empty) assistant turn"
    return None


def find_bad_rows(
    dataset: datasets.Dataset,
    num_levels: int,
    num_types: int,
    check_images: bool = True,
    num_proc: int | None = None,
    image_root: str | Path | None = None,
) -> list[BadRow]:
    """
    Every row of `dataset` that cannot be trained on (see `check_record`), with a progress bar.

    Images are read without `datasets`' own decoding, so one broken image (or a decompression bomb) is reported as
    a bad row instead of stopping the scan. Decoding every image takes a while on large sets: `num_proc` > 1 spreads
    the check over that many processes (`datasets.Dataset.map`). With `image_root`, image paths outside that folder
    are bad rows (see `image_outside_root`).
    """
    missing = [column for column in SCHEMA_COLUMNS if column not in dataset.column_names]
    if missing:
        return [BadRow(index, f"column(s) {missing} missing") for index in range(len(dataset))]
    if isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if num_proc is not None and num_proc > 1:
        reasons = dataset.map(
            lambda record: {"reason": check_record(record, num_levels, num_types, check_images, image_root) or ""},
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            desc="Validating rows",
        )["reason"]
    else:
        rows = tqdm(dataset, desc="Validating rows", total=len(dataset), unit="row")
        reasons = [check_record(record, num_levels, num_types, check_images, image_root) for record in rows]
    return [BadRow(index, reason) for index, reason in enumerate(reasons) if reason]


def drop_bad_rows(
    dataset: datasets.Dataset,
    bad_rows: list[BadRow],
    skip_bad_rows: bool = False,
    output_dir: str | Path | None = None,
    split_name: str = "train",
) -> datasets.Dataset:
    """
    Stops on bad rows, or drops them and lists them in `output_dir`.

    Args:
        bad_rows: from `find_bad_rows`.
        skip_bad_rows: `False` raises a `ValueError` naming every bad row (and writes them to
            `output_dir/bad_rows.json`); `True` drops them and writes them to `output_dir/skipped_rows.json`.
        split_name: names the data in messages and in the report (`"train"`, `"eval"`).
    """
    if not bad_rows:
        return dataset
    report_name = SKIPPED_ROWS_FILE if skip_bad_rows else BAD_ROWS_FILE
    if split_name != "train":
        report_name = f"{split_name}_{report_name}"
    report_path = write_bad_rows_report(bad_rows, len(dataset), output_dir, report_name, skipped=skip_bad_rows)
    if not skip_bad_rows:
        shown = "\n".join(f"  row {row.index}: {row.reason}" for row in bad_rows[:20])
        more = f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""
        written = f" (all listed in {report_path})" if report_path else ""
        raise ValueError(
            f"{len(bad_rows)} of {len(dataset)} {split_name} rows cannot be trained on{written}:\n{shown}{more}\n"
            "Fix them, or skip them with skip_bad_rows=True (--skip_bad_rows)."
        )
    logger.warning(
        "Skipping %d of %d %s rows that cannot be trained on (listed in %s).",
        len(bad_rows),
        len(dataset),
        split_name,
        report_path,
    )
    bad = {row.index for row in bad_rows}
    return dataset.select([index for index in range(len(dataset)) if index not in bad])


def write_bad_rows_report(
    bad_rows: list[BadRow], num_rows: int, output_dir: str | Path | None, file_name: str, skipped: bool
) -> Path | None:
    """Writes `{"num_rows", "num_bad_rows", "skipped", "rows": [{"index", "reason"}]}`; `None` without a folder."""
    if output_dir is None:
        return None
    path = Path(output_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "num_rows": num_rows,
        "num_bad_rows": len(bad_rows),
        "skipped": skipped,
        "rows": [asdict(row) for row in bad_rows],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Clean subsampling and the whole preparation
# ----------------------------------------------------------------------------------------------------------------


def subsample_clean_rows(
    dataset: datasets.Dataset, target: int, clean_type: int, seed: int = 42
) -> datasets.Dataset:
    """
    Keeps every risky row and `target` randomly chosen clean rows (`safe_type == clean_type`), in source order.

    The paper keeps 3,000 of ~82k clean rows for stage 1 (seed 42), about the size of one risky class. With fewer
    clean rows than `target` all are kept. The choice depends only on `seed` and the dataset.
    """
    if not is_integer(target) or target < 0:
        raise ValueError(f"The clean-row target must be an integer >= 0, got {target!r}.")
    types = dataset["safe_type"]
    clean = [index for index, value in enumerate(types) if value == clean_type]
    if len(clean) <= target:
        logger.info("Keeping all %d clean rows (target %d).", len(clean), target)
        return dataset
    kept_clean = set(random.Random(seed).sample(clean, target))
    keep = [index for index, value in enumerate(types) if value != clean_type or index in kept_clean]
    logger.info("Kept %d of %d clean rows (seed %d) and every risky row.", target, len(clean), seed)
    return dataset.select(keep)


def prepare_safety_dataset(
    source,
    num_levels: int,
    num_types: int,
    image_root: str | Path | None = None,
    skip_bad_rows: bool = False,
    output_dir: str | Path | None = None,
    clean_subsample: int | None = None,
    clean_subsample_seed: int = 42,
    split_name: str = "train",
    num_proc: int | None = None,
    allow_images_outside_root: bool = False,
) -> datasets.Dataset:
    """
    Loads, validates (stopping on bad rows unless `skip_bad_rows`) and optionally subsamples clean rows.

    Args:
        source: anything `load_safety_dataset` accepts.
        image_root: where relative image paths start, and the folder image paths must stay in (default: a data
            file's folder; an in-memory source without `image_root` is not checked).
        allow_images_outside_root: accept image paths outside that folder (absolute, or climbing out with `..`);
            only for data files you trust.
        num_levels, num_types: the model's label counts (`len(config.safety_level_labels)`, ...); the clean type
            is the last type.
        clean_subsample: keep this many clean rows (paper stage 1: 3000); `None` keeps all.
        num_proc: processes for the row check (see `find_bad_rows`).
    """
    dataset = load_safety_dataset(source, image_root)
    root = None if allow_images_outside_root else data_root(source, image_root)
    bad_rows = find_bad_rows(dataset, num_levels, num_types, num_proc=num_proc, image_root=root)
    dataset = drop_bad_rows(dataset, bad_rows, skip_bad_rows, output_dir, split_name)
    if PROBLEM_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(PROBLEM_COLUMN)
    if clean_subsample is not None:
        dataset = subsample_clean_rows(dataset, clean_subsample, clean_type=num_types - 1, seed=clean_subsample_seed)
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# A built-in synthetic dataset (offline examples only: never a benchmark)
# ----------------------------------------------------------------------------------------------------------------

_SYNTHETIC_CLASSES = (
    # (safe_level, safe_type, colour, answer)
    (0, 6, (40, 160, 60), "The image shows a green field."),
    (3, 0, (200, 30, 30), "I'm sorry, but I can't help with this request: it looks politically sensitive."),
    (2, 1, (30, 30, 200), "I'm sorry, but I can't help with this request: it looks illegal."),
    (1, 5, (220, 200, 40), "I will answer cautiously: the text may be misleading."),
)


def synthetic_safety_records(num_rows: int = 64, seed: int = 0, image_size: int = 32) -> list[dict]:
    """
    Records in the paper's schema with made-up images: each class is a solid colour with a little noise, so the
    classes are trivially separable. For running the examples offline; says nothing about real data.
    """
    import numpy as np

    rng = np.random.RandomState(seed)
    records = []
    for index in range(num_rows):
        level, type_index, colour, answer = _SYNTHETIC_CLASSES[index % len(_SYNTHETIC_CLASSES)]
        pixels = np.clip(np.array(colour) + rng.randint(-25, 26, size=(image_size, image_size, 3)), 0, 255)
        records.append(
            {
                "image": Image.fromarray(pixels.astype("uint8")),
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nWhat is shown in this image?"},
                    {"from": "gpt", "value": answer},
                ],
                "safe_level": level,
                "safe_type": type_index,
            }
        )
    return records


__all__ = [
    "BadRow",
    "load_safety_dataset",
    "data_root",
    "read_json_records",
    "records_to_dataset",
    "image_outside_root",
    "load_image",
    "to_chat_messages",
    "check_record",
    "find_bad_rows",
    "drop_bad_rows",
    "write_bad_rows_report",
    "subsample_clean_rows",
    "prepare_safety_dataset",
    "synthetic_safety_records",
]
