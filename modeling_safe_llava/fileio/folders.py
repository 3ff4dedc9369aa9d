"""Output folders that a command may replace: only those it wrote itself, recognised by a marker file.

`--overwrite` must never delete a user's data: pointing `safe-llava export --output` at a training run folder (with
its `checkpoint-500/` and notes) must not replace it. Every command that deletes or replaces a folder therefore
writes a marker file into what it creates (`write_marker`) and checks it before deleting (`check_replaceable`).

```python
>>> check_replaceable(folder, "export", overwrite=True)  # raises unless absent, empty, or an earlier export
>>> write_marker(staging_folder, "export")
```
"""

import json
from pathlib import Path


MARKER_FILE = ".safe-llava-output.json"


class FolderNotEmptyError(FileExistsError, ValueError):
    """The output folder exists and is not empty, and `overwrite` was not asked for (both a `FileExistsError` and a
    `ValueError`: a bad input that the command line reports in one line)."""


def marker_content(command: str) -> str:
    """The marker's text for `command` (deterministic: the same command writes the same bytes)."""
    return json.dumps(
        {
            "written_by": f"safe-llava {command}",
            "note": f"`safe-llava {command} --overwrite` may replace this folder; delete this file to protect it.",
        },
        indent=2,
    ) + "\n"


def write_marker(folder, command: str) -> Path:
    """Marks `folder` as written by `safe-llava <command>`; returns the marker's path."""
    path = Path(folder) / MARKER_FILE
    path.write_text(marker_content(command), encoding="utf-8")
    return path


def has_marker(folder, command: str) -> bool:
    """Whether `folder` holds the marker of `safe-llava <command>` (a regular file, not a link)."""
    path = Path(folder) / MARKER_FILE
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("written_by") == f"safe-llava {command}"
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(folder, command: str, overwrite: bool, owned: tuple | None = None) -> bool:
    """
    Checks that `safe-llava <command>` may write `folder`; returns whether it holds files already.

    Args:
        folder (`str` or `os.PathLike`): the output folder.
        command (`str`): the command's name (`"export"`, `"benchmark-data"`), as in its marker.
        overwrite (`bool`): whether the user asked to replace an existing output.
        owned (`tuple[str]`, *optional*): the paths (relative to `folder`) the command deletes before writing. None:
            the whole folder is replaced.

    A missing or empty folder is always fine. A non-empty one needs `overwrite`, and then the command's marker,
    except when `owned` is given and none of those paths exists (then nothing would be deleted).

    Raises:
        ValueError: `folder` or one of its parents is a file, or `folder` is not the command's output.
        FolderNotEmptyError: `folder` holds files and `overwrite` is False.
    """
    folder = Path(folder)
    check_parents_are_folders(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose a folder path for the output.")
    if not any(folder.iterdir()):
        return False
    if not overwrite:
        raise FolderNotEmptyError(
            f"{folder} already exists and is not empty; choose another folder, or pass --overwrite "
            f"(overwrite=True) to replace an earlier `safe-llava {command}` output there."
        )
    deletes_something = owned is None or any((folder / name).exists() for name in owned)
    if deletes_something and not has_marker(folder, command):
        raise ValueError(
            f"Refusing to replace {folder}: it was not written by `safe-llava {command}` (no {MARKER_FILE} marker "
            "there), so it may hold your own files. Choose another folder, or move it away yourself."
        )
    return True


def check_parents_are_folders(path) -> None:
    """Raises a ValueError naming the first parent of `path` that exists and is not a folder."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{path} lies under {parent}, which is a file, not a folder.")
        if not parent.exists():
            return


__all__ = [
    "MARKER_FILE",
    "FolderNotEmptyError",
    "write_marker",
    "has_marker",
    "check_replaceable",
    "check_parents_are_folders",
]
