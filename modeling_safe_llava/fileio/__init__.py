"""Input and output shared by training, data, tools and serving: decoding images as the processor sees them, reading
JSON-list record files, reading chosen tensors of a safetensors checkpoint (a verdict model's weights), and output
folders that a command may replace (marker files). It sits below its users: nothing here
imports from `training/`, `data/` or `tools/`."""

from .checkpoints import SafetensorsCheckpoint
from .folders import MARKER_FILE, FolderNotEmptyError, check_replaceable, has_marker, write_marker
from .images import IMAGE_EXTENSIONS, load_image
from .records import read_json_list


__all__ = [
    "IMAGE_EXTENSIONS",
    "load_image",
    "read_json_list",
    "SafetensorsCheckpoint",
    "MARKER_FILE",
    "FolderNotEmptyError",
    "check_replaceable",
    "has_marker",
    "write_marker",
]
