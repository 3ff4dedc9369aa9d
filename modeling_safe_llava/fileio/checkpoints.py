"""Reading chosen tensors of a safetensors checkpoint (a folder or a Hub id), and nothing else.

[`SafetensorsCheckpoint`] is the file side of a verdict model's loading
(`SafetyPreTrainedMixin.from_verdict_checkpoint`, remote code, which reads no file itself): it names the checkpoint's
keys and reads the tensors asked for, of the embedding table only the rows asked for. A Hub id downloads only the
shard index and the shards that hold those tensors.
"""

from __future__ import annotations

import json
import os

import torch


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint:
    """
    The safetensors weights of a SafeLlava folder or Hub id, read tensor by tensor.

    Args:
        path (`str`): a folder or a Hub id.
        revision (`str`, *optional*): the Hub revision.
    """

    def __init__(self, path: str, revision: str | None = None):
        self.path, self.revision = str(path), revision
        self._shards = None

    def keys(self) -> list[str]:
        """The checkpoint's tensor names, as saved (before any renaming)."""
        return list(self._shard_of_key())

    def read(self, wanted: dict[str, list[int] | None]) -> dict[str, torch.Tensor]:
        """`{checkpoint key: rows or None}` -> `{checkpoint key: tensor}`: each tensor whole, or only its `rows`
        (sorted, without repeats). Opens each shard that holds one of them once; reads no other tensor."""
        shard_of_key = self._shard_of_key()
        unknown = sorted(set(wanted) - set(shard_of_key))
        if unknown:
            raise ValueError(f"The checkpoint at {self.path!r} has no tensor(s) {unknown[:5]}.")
        by_shard: dict[str, list[str]] = {}
        for key in wanted:
            by_shard.setdefault(shard_of_key[key], []).append(key)
        from safetensors import safe_open

        state = {}
        for shard, keys in by_shard.items():
            with safe_open(self._file(shard), framework="pt") as handle:
                for key in keys:
                    state[key] = _read_tensor(handle, key, wanted[key])
        return state

    def _shard_of_key(self) -> dict[str, str]:
        """`{checkpoint key: safetensors file name}`, from the shard index or the single `model.safetensors`."""
        if self._shards is None:
            self._shards = self._read_shard_map()
        return self._shards

    def _read_shard_map(self) -> dict[str, str]:
        from safetensors import safe_open

        try:
            index_file = self._file(INDEX_FILE)
        except OSError:
            index_file = None
        if index_file is not None:
            with open(index_file, encoding="utf-8") as handle:
                return dict(json.load(handle)["weight_map"])
        with safe_open(self._file(SINGLE_FILE), framework="pt") as handle:
            return {key: SINGLE_FILE for key in handle.keys()}

    def _file(self, name: str) -> str:
        """The local path of the checkpoint's file `name` (downloaded for a Hub id); `OSError` when there is none."""
        if os.path.isdir(self.path):
            local = os.path.join(self.path, name)
            if not os.path.isfile(local):
                raise OSError(f"{self.path!r} has no {name}.")
            return local
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.path, name, revision=self.revision)
        except Exception as error:  # the hub client raises many types; a missing file is an OSError to callers
            raise OSError(f"Cannot fetch {name} of {self.path!r}: {error}") from error


def _read_tensor(handle, key: str, rows: list[int] | None) -> torch.Tensor:
    """A tensor of an open safetensors file, or only its `rows` (read row by row: the rest never leaves the file)."""
    if rows is None:
        return handle.get_tensor(key)
    tensor = handle.get_slice(key)
    return torch.cat([tensor[row : row + 1] for row in sorted(set(rows))])


__all__ = ["SafetensorsCheckpoint"]
