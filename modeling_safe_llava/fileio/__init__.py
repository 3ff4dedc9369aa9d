"""Input and output shared by training, data and tools: decoding images as the processor sees them, reading JSON-list
record files, and output folders that a command may replace (marker files). It sits below its users: nothing here
imports from `training/`, `data/` or `tools/`."""

from .folders import MARKER_FILE, FolderNotEmptyError, check_replaceable, has_marker, write_marker
from .images import IMAGE_EXTENSIONS, load_image
from .records import read_json_list


__all__ = [
    "IMAGE_EXTENSIONS",
    "load_image",
    "read_json_list",
    "MARKER_FILE",
    "FolderNotEmptyError",
    "check_replaceable",
    "has_marker",
    "write_marker",
]
