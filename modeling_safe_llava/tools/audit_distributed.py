"""The audit over several processes (`torchrun`, `accelerate launch`, or any launcher that sets torch.distributed's
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`), and the JSONL files it keeps.

Layout of an audit's output folder:

- `results.jsonl`: every record, one per id, sorted by id once a scan finishes. A single process appends to it as it
  scans.
- `shards/rank-R-of-W.jsonl`: what rank `R` of a `W`-process run scanned, appended and fsynced batch by batch. Rank 0
  merges every shard into `results.jsonl` after the last rank finished, then deletes the shards.

A rerun, with any world size (1 included), first reads `results.jsonl` and every shard as done, so a changed world
size is handled, not refused: nothing is lost or scanned twice. Each process repairs (drops a torn last line of)
only the file it appends to. Several machines need the output folder on a shared filesystem.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SHARDS_DIR = "shards"
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed
# ----------------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} must be an integer (set by torchrun).") from None


def launch_env() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` from the launcher's environment; `(0, 1, 0)` without one."""
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Invalid torch.distributed environment: RANK={rank}, WORLD_SIZE={world_size}.")
    return rank, world_size, local_rank


def default_device() -> str:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is available (one GPU per process), else `cpu`."""
    import torch

    return f"cuda:{launch_env()[2]}" if torch.cuda.is_available() else "cpu"


@dataclass
class DistributedContext:
    """This process's place in the audit: rank, world size, and whether it opened the process group itself."""

    rank: int = 0
    world_size: int = 1
    opened_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """`value` of every rank, in rank order (every rank gets the list)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self):
        if self.opened_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.opened_group = False


def distributed_context(device, timeout_minutes: float = 120.0) -> DistributedContext:
    """
    Joins the launcher's process group: an existing one (e.g. opened by `accelerate`) is reused, else one is opened
    with NCCL for a CUDA `device` and gloo otherwise. Without a launcher (`WORLD_SIZE` unset or 1): one process.

    Args:
        device (`torch.device`): Where this process's model is.
        timeout_minutes (`float`): How long a rank waits at a barrier for the others (the slowest rank's scan).
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), opened_group=False)
    rank, world_size, _ = launch_env()
    if world_size == 1:
        return DistributedContext()
    device = torch.device(device)
    options = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options.update(backend="nccl", device_id=device)
    else:
        options.update(backend="gloo")
    dist.init_process_group(**options)
    logger.info("Audit rank %d of %d (%s).", rank, world_size, options["backend"])
    return DistributedContext(dist.get_rank(), dist.get_world_size(), opened_group=True)


# ----------------------------------------------------------------------------------------------------------------
# JSONL files
# ----------------------------------------------------------------------------------------------------------------


def shard_path(output_dir: Path, rank: int, world_size: int) -> Path:
    return output_dir / SHARDS_DIR / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def own_records_path(output_dir: Path, context: DistributedContext) -> Path:
    """The file this process appends to: `results.jsonl` for one process, its shard otherwise."""
    if context.world_size == 1:
        return output_dir / RESULTS_FILE
    return shard_path(output_dir, context.rank, context.world_size)


def record_files(output_dir: Path) -> list[Path]:
    """`results.jsonl` (when present) and every shard, in a fixed order."""
    files = [output_dir / RESULTS_FILE] if (output_dir / RESULTS_FILE).exists() else []
    return files + sorted((output_dir / SHARDS_DIR).glob("rank-*-of-*.jsonl"))


def parse_records(data: bytes, path: Path) -> list[dict]:
    """Records of complete JSON lines; a line that is not a JSON object with an `id` raises `ValueError`."""
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


def read_results(path: Path, repair: bool = True) -> list[dict]:
    """
    The records of a JSONL file. A last line without its newline (a write cut by a kill) is left out; with
    `repair=True` (the file this process appends to) it is also cut from the file, so that its image is scanned
    again. Any other unreadable line raises `ValueError`.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            logger.warning("Dropping an incomplete last record of %s (the scan was interrupted while writing).", path)
            with open(path, "r+b") as handle:
                handle.truncate(len(data))
                handle.flush()
                os.fsync(handle.fileno())
    return parse_records(data, path)


def append_records(handle, records: list[dict]):
    """Appends one JSON line per record, then flushes and fsyncs (a batch is on disk before the next starts)."""
    handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    handle.flush()
    os.fsync(handle.fileno())


def iter_records(output_dir: Path):
    """Every record of `results.jsonl` and the shards, file by file (read only; an id may come twice)."""
    for path in record_files(output_dir):
        yield from read_results(path, repair=False)


def all_records(output_dir: Path) -> list[dict]:
    """Every record of `results.jsonl` and the shards, one per id (the first one read), sorted by id."""
    by_id: dict[str, dict] = {}
    for record in iter_records(output_dir):
        by_id.setdefault(record["id"], record)
    return [by_id[item_id] for item_id in sorted(by_id)]


def _write_atomically(path: Path, lines):
    """Writes `lines` (strings) to `path` through a temporary file, fsynced and renamed over it (a kill leaves the old
    or the new file)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def merge_records(output_dir: Path) -> list[dict]:
    """
    Rewrites `results.jsonl` as every record of `results.jsonl` and the shards, one per id, sorted by id; then
    deletes the shards (a kill in between leaves records that the next merge reads twice and keeps once).
    Returns the records.
    """
    records = all_records(output_dir)
    shards = [path for path in record_files(output_dir) if path.parent.name == SHARDS_DIR]
    _warn_about_ids_in_several_shards(shards)
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    _write_atomically(output_dir / RESULTS_FILE, lines)
    for shard in shards:
        shard.unlink()
    if (output_dir / SHARDS_DIR).is_dir() and not any((output_dir / SHARDS_DIR).iterdir()):
        (output_dir / SHARDS_DIR).rmdir()
    return records


def _warn_about_ids_in_several_shards(shards: list[Path]):
    """Ranks never scan an id already recorded, so an id in two shards is an id that two rows of a streamed dataset
    share (ids known up front are checked before scanning): warn, naming some; the merge keeps the first record."""
    owners: dict[str, int] = {}
    for shard in shards:
        for item_id in {record["id"] for record in read_results(shard, repair=False)}:
            owners[item_id] = owners.get(item_id, 0) + 1
    shared = sorted(item_id for item_id, count in owners.items() if count > 1)
    if shared:
        logger.warning(
            "%d ids were scanned by more than one rank (duplicate ids in the dataset?), e.g. %s; results.jsonl keeps "
            "one record per id.",
            len(shared),
            shared[:10],
        )


def clear_records(output_dir: Path):
    """Deletes `results.jsonl` and every shard (a scan started over)."""
    for path in record_files(output_dir):
        path.unlink()


__all__ = [
    "DistributedContext",
    "distributed_context",
    "launch_env",
    "default_device",
    "read_results",
    "append_records",
    "all_records",
    "iter_records",
    "merge_records",
    "clear_records",
    "own_records_path",
    "shard_path",
]
