"""Reading record files: the one reader of JSON-list files (training data, the converters' inputs)."""

import json
from pathlib import Path


def read_json_list(path: Path, what: str) -> list:
    """The JSON list in `path`, parsed by `json` (so that `1` and `1.0` stay distinct); a clear error naming `what` the
    file is, and the problem, otherwise."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({error}).") from error
    if not isinstance(rows, list):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON list of rows, got a {type(rows).__name__}.")
    return rows


__all__ = ["read_json_list"]
