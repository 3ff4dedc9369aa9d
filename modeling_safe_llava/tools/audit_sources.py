"""What an audit scans: an image folder, a `datasets.Dataset`, or a streaming `datasets.IterableDataset`, each split
into disjoint, deterministic per-rank shards.

Every source yields batches `(ids, values)` of the images one rank still has to scan:

- a folder or a `datasets.Dataset` (ids known up front): the ids sorted, then strided by rank
  (`sorted_ids[rank::world_size]`), so any world size covers every id exactly once;
- a streaming dataset with an id column: `datasets.distributed.split_dataset_by_node` (whole files per rank when
  their number divides evenly, else every `world_size`-th row), nothing loaded up front;
- a streaming dataset without an id column: ids are row numbers; every rank reads the stream and keeps the rows
  `number % world_size == rank` (only those are decoded), so the ids stay the same at any world size.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..fileio import IMAGE_EXTENSIONS


DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def escaped_id(relative: Path) -> str:
    """
    The id of a file: its POSIX path relative to the folder. A name that is not valid UTF-8 (Python holds it with
    surrogate escapes) gets its undecodable bytes written as `\\xNN`, so that it can be stored in JSON and CSV.
    """
    name = relative.as_posix()
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _strided(ids: list[str], rank: int, world_size: int) -> list[int]:
    """Positions of this rank's ids: the ids sorted, then every `world_size`-th from `rank`."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return order[rank::world_size]


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _IndexedSource:
    """A source whose ids are all known up front (subclasses set `ids` and define `image_values`)."""

    ids: list[str]

    def pending_count(self, done: set, rank: int, world_size: int) -> int:
        return sum(self.ids[position] not in done for position in _strided(self.ids, rank, world_size))

    def batches(self, done: set, rank: int, world_size: int, batch_size: int):
        """Yields `(ids, values)` for this rank's ids not in `done`, `batch_size` at a time, in id order."""
        pending = [p for p in _strided(self.ids, rank, world_size) if self.ids[p] not in done]
        for positions in _batched(pending, batch_size):
            yield [self.ids[position] for position in positions], self.image_values(positions)


class FolderSource(_IndexedSource):
    """The images under a folder (recursive, by extension); ids are POSIX paths relative to the folder."""

    def __init__(self, folder):
        self.root = Path(folder)
        if not self.root.is_dir():
            raise ValueError(f"Image folder {str(folder)!r} does not exist or is not a folder.")
        files = sorted(path for path in self.root.rglob("*") if path.is_file())
        images = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
        self.paths = images
        self.ids = [escaped_id(path.relative_to(self.root)) for path in images]
        self.num_ignored = len(files) - len(images)
        self.description = f"folder {self.root.resolve()}"

    def image_values(self, positions: list[int]) -> list:
        return [self.paths[position] for position in positions]


def _undecoded(dataset, image_column: str):
    """`dataset` with its image column left encoded, so that one corrupt image becomes an error row, not a crash."""
    import datasets

    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


class DatasetSource(_IndexedSource):
    """The rows of a `datasets.Dataset`: images from `image_column`, ids from `id_column` (else the row index)."""

    def __init__(self, dataset, image_column: str = "image", id_column: str | None = "id"):
        if image_column not in dataset.column_names:
            raise ValueError(f"The dataset has no image column {image_column!r}; columns: {dataset.column_names}.")
        self.dataset = _undecoded(dataset, image_column)
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


class StreamingSource:
    """
    The rows of a streaming `datasets.IterableDataset`, read once, never loaded whole. `ids` is `None`: the
    set of ids is only known once every rank has read its part.
    """

    ids = None

    def __init__(self, dataset, image_column: str = "image", id_column: str | None = "id"):
        columns = dataset.column_names
        if columns is not None and image_column not in columns:
            raise ValueError(f"The dataset has no image column {image_column!r}; columns: {columns}.")
        self.dataset = _undecoded(dataset, image_column)
        self.image_column = image_column
        self.id_column = id_column if columns is not None and id_column in columns else None
        self.num_ignored = 0
        self.description = f"streaming datasets.IterableDataset with columns {columns}"

    def pending_count(self, done: set, rank: int, world_size: int):
        return None  # unknown before the stream is read

    def _rows(self, rank: int, world_size: int):
        """`(id, image value)` of this rank's rows."""
        if self.id_column is not None:
            from datasets.distributed import split_dataset_by_node

            dataset = self.dataset
            if world_size > 1:
                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            for row in dataset:
                yield str(row[self.id_column]), row[self.image_column]
        else:
            for number, row in enumerate(self.dataset):
                if number % world_size == rank:
                    yield str(number), row[self.image_column]

    def batches(self, done: set, rank: int, world_size: int, batch_size: int):
        """Yields `(ids, values)` of this rank's rows not in `done`; raises on an id seen twice in this rank's part."""
        seen, ids, values = set(), [], []
        for item_id, value in self._rows(rank, world_size):
            if item_id in seen:
                raise ValueError(f"Ids must be unique to resume safely; {item_id!r} appears twice in the stream.")
            seen.add(item_id)
            if item_id in done:
                continue
            ids.append(item_id)
            values.append(value)
            if len(ids) == batch_size:
                yield ids, values
                ids, values = [], []
        if ids:
            yield ids, values


def make_source(source, image_column: str = "image", id_column: str | None = "id"):
    """
    A [`FolderSource`] for a path, a [`DatasetSource`] for a `datasets.Dataset`, a [`StreamingSource`] for a
    `datasets.IterableDataset`; refuses duplicate ids where they are known up front.
    """
    import datasets

    if isinstance(source, (str, os.PathLike)):
        made = FolderSource(source)
    elif isinstance(source, datasets.Dataset):
        made = DatasetSource(source, image_column, id_column)
    elif isinstance(source, datasets.IterableDataset):
        return StreamingSource(source, image_column, id_column)
    else:
        raise ValueError(
            "source must be an image folder (str or Path), a datasets.Dataset or a datasets.IterableDataset, "
            f"got {type(source).__name__}."
        )
    duplicates = sorted(name for name, count in Counter(made.ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"Ids must be unique to resume safely; duplicated: {duplicates[:10]}.")
    return made


def load_dataset_source(name_or_path: str, split: str = "train", streaming: bool = False):
    """
    A split of a Hugging Face dataset, for `--dataset`: a local `.parquet`, `.arrow`, `.json(l)` or `.csv` file (the
    file is the split), a folder written by `save_to_disk`, a local folder of data files, or a Hub dataset id
    (needs network). `streaming=True` returns a `datasets.IterableDataset` that reads rows as they are scanned.
    """
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"--dataset file {name_or_path!r} has an unknown format; accepted: {sorted(DATA_FILE_BUILDERS)} "
                    "files, a save_to_disk folder, a folder of data files or a Hub dataset id."
                )
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming)
        if path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            return _from_disk(path, split, streaming)
        return datasets.load_dataset(name_or_path, split=split, streaming=streaming)
    except (OSError, KeyError) as error:  # not found, offline (ConnectionError), unreadable files
        raise ValueError(f"Cannot load split {split!r} of dataset {name_or_path!r}: {error}") from error


def _from_disk(path: Path, split: str, streaming: bool):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"Dataset {str(path)!r} has no split {split!r}; splits: {sorted(loaded)}.")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


__all__ = [
    "FolderSource",
    "DatasetSource",
    "StreamingSource",
    "make_source",
    "load_dataset_source",
    "escaped_id",
]
