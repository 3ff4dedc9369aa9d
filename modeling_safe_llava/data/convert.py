"""Converters from public safety datasets to the paper's record schema: `safe-llava data convert`.

Each converter reads one source in its published layout and writes a self-contained folder `OUT`:

- `OUT/{split}.jsonl`: one paper-schema record per line, `{"id", "image", "conversations", "safe_level",
  "safe_type", "source", "category", "expect_refusal"}`; `image` is relative to `OUT`. `category` is the source's own
  label (what the per-category metrics of `safe-llava evaluate --generate-answers` group by) and `expect_refusal`
  says whether the *prompt* should be refused (a safe image with an unsafe instruction: yes, although the image
  itself is `Clean`). Both the training loader (`load_safety_dataset(OUT/train.jsonl)`) and
  `safe-llava evaluate --data OUT` read these files unchanged.
- `OUT/images/{split}/...`: the images, hard-linked where possible, else copied (decoded images are saved as PNG).
- `OUT/unmapped_report.json` (only with `unmapped="skip"` and skipped rows): the labels without a mapping.
- `OUT/.safe_llava_convert.json`: a marker with the source, the mapping and the row counts. Only a folder holding
  this marker may be replaced (`overwrite=True`: its images, split files, report and marker are removed, other
  files are kept); any other non-empty folder is refused.

Sources:

- `vlguard` (Zong et al., ICML 2024): `train.json` / `test.json` in `DIR`, images under `DIR/{split}/` or `DIR/`.
  A row is `{"id", "image", "safe", "harmful_category", "harmful_subcategory", "instr-resp"}` (the two harmful
  fields only on unsafe images). `instr-resp` of a safe image holds `{"safe_instruction", "response"}` and
  `{"unsafe_instruction", "response"}`; of an unsafe image `{"instruction", "response"}`. Every pair becomes one
  row. A safe image's rows are `Clean`, level 0 (the head judges the image; the answer teaches the refusal).
- `holisafe` (HoliSafe-Bench, `etri-vilab/holisafe-bench`): rows `{"id", "image", "query", "type", "category",
  "subcategory", "image_safe", "image_safety_label"}` in `.json` / `.jsonl` / `.parquet` files of `DIR`, or the Hub
  dataset through `datasets.load_dataset` when `DIR` is not a folder. The image's own label decides
  `safe_type`/`safe_level`; `type` (image/query/combination safety, S or U) decides `expect_refusal` (anything but
  `SSS`). It has no reference answers: its rows carry an empty assistant turn, for evaluation (the training check
  drops them).

The taxonomy mapping is data (`configuration/mapping_<source>.json`): see `docs/data_conversion.md`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..checks_safe_llava import is_integer
from ..configuration_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS
from ..presets import load_json_preset
from ..fileio import read_json_list
from .mini_benchmark import ASSISTANT_ROLE, IMAGE_PLACEHOLDER, USER_ROLE


logger = logging.getLogger(__name__)

MARKER_NAME = ".safe_llava_convert.json"
UNMAPPED_REPORT = "unmapped_report.json"
UNMAPPED_CHOICES = ("error", "skip")
CLEAN_TYPE = "Clean"
VLGUARD_SPLITS = ("train", "test")
HOLISAFE_HUB_NAME = "etri-vilab/holisafe-bench"
HOLISAFE_TYPES = ("SSS", "SSU", "USU", "UUU", "SUU")
HOLISAFE_EXTENSIONS = (".json", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------------------------------------------
# The taxonomy mapping
# ----------------------------------------------------------------------------------------------------------------


def normalize_label(label) -> str:
    """A label as the mapping compares it: lower case, runs of whitespace as one space, no outer spaces."""
    return " ".join(str(label).lower().split())


@dataclass(frozen=True)
class TaxonomyMapping:
    """A validated mapping from a source's labels to the paper's `(safe_type index, safe_level)`.

    Args:
        source (`str`): The source it is for (`"vlguard"`, `"holisafe"`).
        labels (`dict[str, tuple[int, int]]`): Normalized label -> (type index, level).
        safe (`tuple[int, int]`): The (type index, level) of a safe image.
        label_names (`tuple[str, ...]`): Names of integer labels (HoliSafe's `image_safety_label`), may be empty.
        origin (`str`): Where it was read from (for messages and the marker).
    """

    source: str
    labels: dict
    safe: tuple
    label_names: tuple
    origin: str

    def lookup(self, *candidates) -> tuple[int, int] | None:
        """The (type index, level) of the first candidate label with a mapping, else `None`."""
        for candidate in candidates:
            found = self.labels.get(normalize_label(candidate))
            if found is not None:
                return found
        return None


def _mapping_entry(origin: str, key: str, entry, risky: bool) -> tuple[int, int]:
    if not isinstance(entry, dict) or "type" not in entry or "level" not in entry:
        raise ValueError(f"Mapping {origin}: entry {key!r} must be {{\"type\": ..., \"level\": ...}}, got {entry!r}.")
    type_name, level = entry["type"], entry["level"]
    if type_name not in SAFETY_TYPE_LABELS:
        raise ValueError(f"Mapping {origin}: entry {key!r} has type {type_name!r}; accepted: {SAFETY_TYPE_LABELS}.")
    if not is_integer(level) or not 0 <= level < len(SAFETY_LEVEL_LABELS):
        raise ValueError(f"Mapping {origin}: entry {key!r} has level {level!r}; accepted: 0-{len(SAFETY_LEVEL_LABELS) - 1}.")
    if risky and (type_name == CLEAN_TYPE or level < 1):
        raise ValueError(
            f"Mapping {origin}: risky label {key!r} maps to type {type_name!r}, level {level}; a risky label needs a "
            f"type other than {CLEAN_TYPE!r} and a level >= 1."
        )
    if not risky and (type_name != CLEAN_TYPE or level != 0):
        raise ValueError(f"Mapping {origin}: 'safe' must be type {CLEAN_TYPE!r}, level 0, got {entry!r}.")
    return SAFETY_TYPE_LABELS.index(type_name), level


def load_mapping(mapping, source: str) -> TaxonomyMapping:
    """
    A taxonomy mapping, validated.

    Args:
        mapping (`str`, `os.PathLike`, `dict` or `None`): A JSON file, the name of a preset in `configuration/`
            (`"mapping_vlguard.json"`, or `"vlguard"` for short), an already-read dict, or `None` for the source's
            default preset.
        source (`str`): The source being converted (the mapping's own `source`, if any, must agree).
    """
    if mapping is None:
        mapping = f"mapping_{source}.json"
    if isinstance(mapping, dict):
        raw, origin = mapping, "(dict)"
    elif Path(mapping).is_file():
        origin = str(mapping)
        try:
            raw = json.loads(Path(mapping).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"Mapping file {origin!r} is not valid JSON ({error}).") from error
    else:
        name = str(mapping) if str(mapping).endswith(".json") else f"mapping_{mapping}.json"
        raw, origin = load_json_preset("configuration", name), name
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), dict) or not raw["labels"]:
        raise ValueError(f"Mapping {origin}: needs a non-empty 'labels' object {{label: {{type, level}}}}.")
    if raw.get("source", source) != source:
        raise ValueError(f"Mapping {origin} is for source {raw['source']!r}, not {source!r}.")
    labels = {}
    for key, entry in raw["labels"].items():
        normalized = normalize_label(key)
        if normalized in labels:
            raise ValueError(f"Mapping {origin}: label {key!r} appears twice (keys are compared case-insensitively).")
        labels[normalized] = _mapping_entry(origin, key, entry, risky=True)
    safe = _mapping_entry(origin, "safe", raw.get("safe", {"type": CLEAN_TYPE, "level": 0}), risky=False)
    names = raw.get("label_names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"Mapping {origin}: 'label_names' must be a list of strings.")
    return TaxonomyMapping(source, labels, safe, tuple(names), origin)


# ----------------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------------


def prepare_output(output_dir: Path, overwrite: bool):
    """Makes `output_dir` ready: missing or empty, or (with `overwrite`) a previous conversion's folder, emptied."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output {str(output_dir)!r} is a file; pass a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / MARKER_NAME).is_file():
            raise ValueError(
                f"--output {str(output_dir)!r} is not empty and was not written by `safe-llava data convert` (no "
                f"{MARKER_NAME}); choose an empty or missing folder. Nothing was changed."
            )
        if not overwrite:
            raise ValueError(
                f"--output {str(output_dir)!r} holds a previous conversion; pass --overwrite to replace it."
            )
        _remove_previous_conversion(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def _remove_previous_conversion(output_dir: Path):
    """Removes what a previous conversion wrote (its images, split files, report and marker), nothing else."""
    try:
        splits = list(json.loads((output_dir / MARKER_NAME).read_text(encoding="utf-8"))["rows"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{str(output_dir / MARKER_NAME)!r} is damaged ({error}); remove the folder by hand.") from error
    if (output_dir / "images").is_dir():
        shutil.rmtree(output_dir / "images")
    for name in [f"{split}.jsonl" for split in splits] + [UNMAPPED_REPORT, MARKER_NAME]:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()


def _safe_relative(row_name: str, field: str, value: str) -> PurePosixPath:
    """A source's relative image path, refused if absolute or climbing out of the data folder."""
    path = PurePosixPath(str(value).replace("\\", "/"))
    if not str(value).strip() or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{row_name}: field {field!r} must be a relative path inside the data folder, got {value!r}.")
    return path


class ImageStore:
    """Places source images under `OUT/images/{split}/` once each; returns their path relative to `OUT`."""

    def __init__(self, output_dir: Path, split: str):
        self.output_dir, self.split, self.placed = output_dir, split, {}

    def place_file(self, source_path: Path, relative: PurePosixPath) -> str:
        key = str(relative)
        if key not in self.placed:
            target = self.output_dir / "images" / self.split / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source_path, target)
            except OSError:  # other file system, or links not allowed: copy
                shutil.copyfile(source_path, target)
            self.placed[key] = f"images/{self.split}/{relative}"
        return self.placed[key]

    def place_image(self, image, name: str) -> str:
        """Saves a decoded PIL image (or encoded bytes) as `images/{split}/{name}.png`."""
        if name not in self.placed:
            target = self.output_dir / "images" / self.split / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(image, (bytes, bytearray)):
                from PIL import Image

                image = Image.open(io.BytesIO(image))
            image.convert("RGB").save(target, format="PNG")
            self.placed[name] = f"images/{self.split}/{name}.png"
        return self.placed[name]


def _record(row_id, image: str, question: str, answer: str, label: tuple, source: str, category: str, refuse: bool):
    type_index, level = label
    return {
        "id": str(row_id),
        "image": image,
        "conversations": [
            {"from": USER_ROLE, "value": f"{IMAGE_PLACEHOLDER}\n{question.strip()}"},
            {"from": ASSISTANT_ROLE, "value": answer},
        ],
        "safe_level": level,
        "safe_type": type_index,
        "source": source,
        "category": category,
        "expect_refusal": refuse,
    }


def _write_jsonl(path: Path, records: list[dict]):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_unmapped(unmapped: dict, mapping: TaxonomyMapping, policy: str):
    """Stops the run on unmapped labels (policy `error`), listing them with their row counts."""
    if unmapped and policy == "error":
        listed = ", ".join(f"{label!r} ({len(ids)} rows, e.g. {ids[0]})" for label, ids in sorted(unmapped.items()))
        raise ValueError(
            f"Labels without a mapping in {mapping.origin}: {listed}. Add them to a copy of the mapping and pass "
            "--mapping FILE, or pass --unmapped skip to leave those rows out (they are listed in "
            f"{UNMAPPED_REPORT}). Nothing was written."
        )


# ----------------------------------------------------------------------------------------------------------------
# VLGuard
# ----------------------------------------------------------------------------------------------------------------


def _require(row: dict, row_name: str, field: str, kinds, what: str):
    value = row.get(field) if isinstance(row, dict) else None
    if value is None or not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{row_name}: field {field!r} must be {what}, got {value!r}.")
    return value


def _vlguard_pairs(row: dict, row_name: str) -> list[tuple[str, str, str, bool]]:
    """`(suffix, instruction, response, expect_refusal)` of each pair of a VLGuard row's `instr-resp`."""
    pairs = _require(row, row_name, "instr-resp", list, "a non-empty list of instruction/response objects")
    keys = ("safe_instruction", "unsafe_instruction") if row["safe"] else ("instruction",)
    found = []
    for position, pair in enumerate(pairs):
        name = f"{row_name} instr-resp[{position}]"
        present = [key for key in keys if isinstance(pair, dict) and key in pair]
        if len(present) != 1:
            raise ValueError(
                f"{name}: needs exactly one of {list(keys)} (row safe={row['safe']}) and 'response', got "
                f"{sorted(pair) if isinstance(pair, dict) else pair!r}."
            )
        instruction = _require(pair, name, present[0], str, "a non-empty string")
        response = pair.get("response")
        if not isinstance(response, str):  # empty is allowed: 17 rows of the released test.json have ""
            raise ValueError(f"{name}: field 'response' must be a string, got {response!r}.")
        suffix = {"safe_instruction": "safe", "unsafe_instruction": "unsafe", "instruction": "unsafe"}[present[0]]
        found.append((suffix, instruction, response, present[0] != "safe_instruction"))
    if not found:
        raise ValueError(f"{row_name}: field 'instr-resp' is empty.")
    return found


def _vlguard_image(input_dir: Path, split: str, row_name: str, value: str) -> tuple[Path, PurePosixPath]:
    relative = _safe_relative(row_name, "image", value)
    for base in (input_dir / split, input_dir):
        if (base / relative).is_file():
            return base / relative, relative
    raise ValueError(
        f"{row_name}: field 'image' names {value!r}, found neither under {str(input_dir / split)!r} nor under "
        f"{str(input_dir)!r}."
    )


def _vlguard_label(row: dict, row_name: str, mapping: TaxonomyMapping):
    """`(label, category)`: the mapped (type, level) or `None`, and the row's category name."""
    if row["safe"]:
        return mapping.safe, "safe"
    category = _require(row, row_name, "harmful_category", str, "a non-empty string on an unsafe row")
    subcategory = _require(row, row_name, "harmful_subcategory", str, "a non-empty string on an unsafe row")
    label = mapping.lookup(f"{category}/{subcategory}", subcategory)
    return label, normalize_label(subcategory)


def convert_vlguard_split(input_dir: Path, split: str, mapping: TaxonomyMapping) -> tuple[list, dict]:
    """
    Reads and checks `input_dir/{split}.json`. Returns `(plans, unmapped)`: one `(row dict, row name, image path,
    relative path, label, category)` per source row with a mapping, and `{unmapped label: [row ids]}`.
    """
    path = input_dir / f"{split}.json"
    plans, unmapped = [], {}
    for index, row in enumerate(read_json_list(path, "VLGuard file")):
        row_name = f"{path.name} row {index}" + (f" (id {row.get('id')!r})" if isinstance(row, dict) else "")
        if not isinstance(row, dict):
            raise ValueError(f"{row_name}: must be a JSON object, got {row!r}.")
        _require(row, row_name, "id", (str, int), "a string or integer")
        _require(row, row_name, "safe", bool, "true or false")
        _vlguard_pairs(row, row_name)  # validate every row before writing anything
        label, category = _vlguard_label(row, row_name, mapping)
        if label is None:  # skipped or reported: its image is not needed
            unmapped.setdefault(category, []).append(str(row["id"]))
            continue
        image_path, relative = _vlguard_image(input_dir, split, row_name, _require(row, row_name, "image", str, "a path"))
        plans.append((row, row_name, image_path, relative, label, category))
    return plans, unmapped


def _write_vlguard_split(output_dir: Path, split: str, plans: list) -> list[dict]:
    store, records = ImageStore(output_dir, split), []
    for row, row_name, image_path, relative, label, category in tqdm(plans, desc=f"Converting {split}", unit="row"):
        image = store.place_file(image_path, relative)
        for suffix, instruction, response, refuse in _vlguard_pairs(row, row_name):
            records.append(_record(f"{row['id']}-{suffix}", image, instruction, response, label, "vlguard", category, refuse))
    _write_jsonl(output_dir / f"{split}.jsonl", records)
    empty = [record["id"] for record in records if not record["conversations"][1]["value"].strip()]
    if empty:
        logger.warning(
            "%s: %d rows have an empty reference response (e.g. %s); they evaluate normally, training drops them.",
            split, len(empty), empty[0],
        )
    return records


def convert_vlguard(input_dir, output_dir, splits=None, mapping=None, unmapped: str = "error", overwrite=False) -> dict:
    """
    Converts VLGuard's `train.json` / `test.json` (and their images) to paper-schema JSONL files.

    Args:
        input_dir (`str` or `os.PathLike`): The downloaded VLGuard folder.
        output_dir (`str` or `os.PathLike`): Missing or empty folder (or a previous conversion with `overwrite`).
        splits (`Sequence[str]`, *optional*): Splits to convert (default: those of `train`, `test` present).
        mapping: As in [`load_mapping`] (default: `configuration/mapping_vlguard.json`).
        unmapped (`str`, *optional*, defaults to `"error"`): `"error"` stops on labels without a mapping, listing
            them; `"skip"` leaves their rows out and lists them in `OUT/unmapped_report.json`.
        overwrite (`bool`, *optional*, defaults to `False`): Replace a previous conversion in `output_dir`.

    Returns:
        `dict`: the marker's content (source, mapping, rows per split, skipped rows per label).
    """
    input_dir = _check_input_dir(input_dir)
    splits = _resolve_splits(splits, [s for s in VLGUARD_SPLITS if (input_dir / f"{s}.json").is_file()], input_dir)
    mapping = load_mapping(mapping, "vlguard")
    _check_unmapped_policy(unmapped)
    planned = {split: convert_vlguard_split(input_dir, split, mapping) for split in splits}
    all_unmapped = _merge_unmapped(split_unmapped for _, split_unmapped in planned.values())
    _check_unmapped(all_unmapped, mapping, unmapped)
    output_dir = Path(output_dir)
    prepare_output(output_dir, overwrite)
    written = {split: _write_vlguard_split(output_dir, split, plans) for split, (plans, _) in planned.items()}
    return _finish(output_dir, "vlguard", mapping, written, all_unmapped)


# ----------------------------------------------------------------------------------------------------------------
# HoliSafe-Bench
# ----------------------------------------------------------------------------------------------------------------


def _holisafe_local_rows(input_dir: Path) -> list[tuple[str, dict]]:
    """`(row name, row)` of every `.json` / `.jsonl` / `.parquet` file directly in `input_dir`, or else in its `data/`
    subfolder (a Hub download's layout), sorted by name."""
    for folder in (input_dir, input_dir / "data"):
        files = sorted(p for p in folder.glob("*") if p.suffix in HOLISAFE_EXTENSIONS and p.is_file())
        if files:
            break
    else:
        raise ValueError(
            f"{str(input_dir)!r} (and its data/ subfolder) holds no {list(HOLISAFE_EXTENSIONS)} file of HoliSafe-Bench rows."
        )
    rows = []
    for path in files:
        if path.suffix == ".json":
            content = read_json_list(path, "HoliSafe-Bench file")
        elif path.suffix == ".jsonl":
            content = _read_jsonl(path)
        else:
            import datasets

            content = list(datasets.Dataset.from_parquet(str(path)))
        rows += [(f"{path.name} row {index}", row) for index, row in enumerate(content)]
    return rows


def _read_jsonl(path: Path) -> list:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name} row {number} (line {number + 1}) is not valid JSON ({error}).") from error
    return rows


def load_holisafe_hub(name: str = HOLISAFE_HUB_NAME, split: str = "test") -> list[tuple[str, dict]]:
    """HoliSafe-Bench rows from the Hub (`datasets.load_dataset(name, split=split)`; gated: log in first)."""
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    return [(f"{name}[{split}] row {index}", row) for index, row in enumerate(dataset)]


def _holisafe_label_name(row: dict, row_name: str, mapping: TaxonomyMapping) -> str:
    value = row.get("image_safety_label")
    if is_integer(value):
        if not 0 <= value < len(mapping.label_names):
            raise ValueError(
                f"{row_name}: field 'image_safety_label' is {value}, outside the {len(mapping.label_names)} "
                f"label_names of {mapping.origin}."
            )
        return normalize_label(mapping.label_names[value])
    return normalize_label(_require(row, row_name, "image_safety_label", str, "an integer or a label name"))


def _holisafe_label(row: dict, row_name: str, mapping: TaxonomyMapping):
    """`(label, category)` of a HoliSafe row: the image's own label decides."""
    image_safe = _require(row, row_name, "image_safe", bool, "true or false")
    name = _holisafe_label_name(row, row_name, mapping)
    if image_safe != (name == "safe"):
        raise ValueError(
            f"{row_name}: fields 'image_safe' ({image_safe}) and 'image_safety_label' ({name!r}) disagree; a safe "
            "image has the label 'safe'."
        )
    return (mapping.safe if image_safe else mapping.lookup(name)), name


def _file_stem(row_id) -> str:
    """A file name made from a row id: letters, digits, `-`, `_` and `.` kept, anything else `_`."""
    return "holisafe-" + re.sub(r"[^A-Za-z0-9._-]", "_", str(row_id)).lstrip(".")


def _holisafe_fields(row: dict, row_name: str, input_dir: Path | None) -> dict:
    """A HoliSafe row's checked fields: `id`, `query`, `kind` (its type) and `image` (`("file", path, relative)` or
    `("decoded", bytes or PIL image)`). Raises a `ValueError` naming the row and the field."""
    row_id = _require(row, row_name, "id", (str, int), "a string or integer")
    query = _require(row, row_name, "query", str, "a non-empty string")
    kind = _require(row, row_name, "type", str, f"one of {list(HOLISAFE_TYPES)}").upper()
    if kind not in HOLISAFE_TYPES:
        raise ValueError(f"{row_name}: field 'type' must be one of {list(HOLISAFE_TYPES)}, got {row['type']!r}.")
    image = row.get("image")
    if isinstance(image, str):
        relative = _safe_relative(row_name, "image", image)
        candidates = [input_dir / relative, input_dir / "images" / relative] if input_dir is not None else []
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise ValueError(f"{row_name}: field 'image' names {image!r}, not found under {str(input_dir)!r}.")
        source = ("file", found, relative)
    elif isinstance(image, dict) and image.get("bytes"):
        source = ("decoded", image["bytes"])
    elif hasattr(image, "convert"):
        source = ("decoded", image)
    else:
        raise ValueError(f"{row_name}: field 'image' must be a relative path, image bytes or an image, got {image!r}.")
    return {"id": row_id, "query": query, "kind": kind, "image": source}


def _holisafe_record(fields: dict, store: ImageStore, label, category) -> dict:
    """The paper-schema record of a checked HoliSafe row; places its image."""
    source = fields["image"]
    if source[0] == "file":
        placed = store.place_file(source[1], source[2])
    else:
        placed = store.place_image(source[1], _file_stem(fields["id"]))
    record = _record(fields["id"], placed, fields["query"], "", label, "holisafe", category, fields["kind"] != "SSS")
    record["holisafe_type"] = fields["kind"]
    return record


def convert_holisafe(
    input_dir, output_dir, split: str = "test", mapping=None, unmapped: str = "error", overwrite=False
) -> dict:
    """
    Converts HoliSafe-Bench to one paper-schema JSONL split (default `test`).

    Args:
        input_dir (`str` or `os.PathLike`): A local copy (folder of `.json` / `.jsonl` / `.parquet` row files, image
            paths relative to it or to its `images/`), or a Hub dataset id (default `etri-vilab/holisafe-bench`,
            read with `datasets.load_dataset`; needs network and access to the gated dataset).
        output_dir, mapping, unmapped, overwrite: As in [`convert_vlguard`] (default mapping:
            `configuration/mapping_holisafe.json`).
        split (`str`, *optional*, defaults to `"test"`): The output split's name (and the Hub split read).
    """
    local = Path(input_dir).is_dir()
    rows = _holisafe_local_rows(Path(input_dir)) if local else load_holisafe_hub(str(input_dir), split)
    mapping = load_mapping(mapping, "holisafe")
    _check_unmapped_policy(unmapped)
    planned, unmapped_ids = [], {}
    for row_name, row in rows:  # every row is checked before anything is written
        if not isinstance(row, dict):
            raise ValueError(f"{row_name}: must be a JSON object, got {row!r}.")
        label, category = _holisafe_label(row, row_name, mapping)
        if label is None:
            unmapped_ids.setdefault(category, []).append(str(row.get("id")))
        else:
            planned.append((_holisafe_fields(row, row_name, Path(input_dir) if local else None), label, category))
    _check_unmapped(unmapped_ids, mapping, unmapped)
    output_dir = Path(output_dir)
    prepare_output(output_dir, overwrite)
    store = ImageStore(output_dir, split)
    records = [
        _holisafe_record(fields, store, label, category)
        for fields, label, category in tqdm(planned, desc=f"Converting {split}", unit="row")
    ]
    _write_jsonl(output_dir / f"{split}.jsonl", records)
    return _finish(output_dir, "holisafe", mapping, {split: records}, unmapped_ids)


# ----------------------------------------------------------------------------------------------------------------
# Shared steps and the CLI
# ----------------------------------------------------------------------------------------------------------------


def _check_input_dir(input_dir) -> Path:
    path = Path(input_dir)
    if not path.is_dir():
        raise ValueError(f"--input {str(input_dir)!r} is not a folder.")
    return path


def _resolve_splits(splits, present: list[str], input_dir: Path) -> list[str]:
    if not present:
        raise ValueError(f"{str(input_dir)!r} holds none of {[f'{s}.json' for s in VLGUARD_SPLITS]}.")
    if not splits:
        return present
    missing = [split for split in splits if split not in present]
    if missing:
        raise ValueError(f"Split(s) {missing} not found in {str(input_dir)!r}; available: {present}.")
    return list(splits)


def _check_unmapped_policy(unmapped: str):
    if unmapped not in UNMAPPED_CHOICES:
        raise ValueError(f"unmapped must be one of {list(UNMAPPED_CHOICES)}, got {unmapped!r}.")


def _merge_unmapped(parts) -> dict:
    merged: dict[str, list[str]] = {}
    for part in parts:
        for label, ids in part.items():
            merged.setdefault(label, []).extend(ids)
    return merged


def _finish(output_dir: Path, source: str, mapping: TaxonomyMapping, written: dict, unmapped: dict) -> dict:
    """Writes the unmapped report (if any) and the marker; returns the marker's content."""
    if unmapped:
        report = {label: {"rows": len(ids), "ids": ids} for label, ids in sorted(unmapped.items())}
        (output_dir / UNMAPPED_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        logger.warning("Skipped rows of unmapped labels %s (see %s)", sorted(unmapped), output_dir / UNMAPPED_REPORT)
    summary = {
        "source": source,
        "mapping": mapping.origin,
        "rows": {split: len(records) for split, records in written.items()},
        "per_type_level": {split: _type_level_counts(records) for split, records in written.items()},
        "skipped_unmapped": {label: len(ids) for label, ids in sorted(unmapped.items())},
    }
    (output_dir / MARKER_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _type_level_counts(records: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for record in records:
        key = f"{SAFETY_TYPE_LABELS[record['safe_type']]} / level {record['safe_level']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


CONVERTERS = {"vlguard": convert_vlguard, "holisafe": convert_holisafe}


def convert(source: str, input_dir, output_dir, splits=None, mapping=None, unmapped="error", overwrite=False) -> dict:
    """Runs the converter of `source` (one of `CONVERTERS`); see [`convert_vlguard`] and [`convert_holisafe`]."""
    if source not in CONVERTERS:
        raise ValueError(f"Unknown --source {source!r}; accepted: {sorted(CONVERTERS)}.")
    if source == "holisafe":
        if splits and len(splits) != 1:
            raise ValueError(f"HoliSafe-Bench converts one split at a time, got --split {list(splits)}.")
        split = splits[0] if splits else "test"
        return convert_holisafe(input_dir, output_dir, split, mapping, unmapped, overwrite)
    return convert_vlguard(input_dir, output_dir, splits, mapping, unmapped, overwrite)


def add_cli_arguments(parser):
    """Options of `safe-llava data`: its own subcommands (today `convert`)."""
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    sub = actions.add_parser("convert", help="convert a public safety dataset to the paper's schema")
    sub.add_argument("--source", required=True, choices=sorted(CONVERTERS), help="the dataset's layout")
    sub.add_argument(
        "--input", required=True,
        help=f"downloaded dataset folder (holisafe: or a Hub id such as {HOLISAFE_HUB_NAME}, read online)",
    )
    sub.add_argument("--output", required=True, help="missing or empty folder for the converted dataset")
    sub.add_argument("--split", action="append", default=None, help="split to convert (repeatable; default: all)")
    sub.add_argument(
        "--mapping", default=None,
        help="taxonomy mapping: a JSON file or a preset of configuration/ (default: mapping_<source>.json)",
    )
    sub.add_argument(
        "--unmapped", choices=UNMAPPED_CHOICES, default="error",
        help=f"labels without a mapping: stop (error, default) or leave their rows out (skip, see {UNMAPPED_REPORT})",
    )
    sub.add_argument("--overwrite", action="store_true", help="replace a previous conversion in --output")
    return parser


def run_from_args(args) -> int:
    """Runs `safe-llava data convert` from parsed arguments; returns the process exit code."""
    summary = convert(args.source, args.input, args.output, args.split, args.mapping, args.unmapped, args.overwrite)
    rows = ", ".join(f"{split}: {count} rows" for split, count in summary["rows"].items())
    skipped = sum(summary["skipped_unmapped"].values())
    print(f"Converted {args.source} to {args.output} ({rows}; {skipped} source rows skipped as unmapped).")
    return 0


__all__ = [
    "CONVERTERS",
    "TaxonomyMapping",
    "convert",
    "convert_vlguard",
    "convert_holisafe",
    "load_holisafe_hub",
    "load_mapping",
    "normalize_label",
    "add_cli_arguments",
    "run_from_args",
]
