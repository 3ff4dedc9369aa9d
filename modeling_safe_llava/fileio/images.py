"""Decoding images as the processor sees them: the one image loader of training, evaluation, audits and serving."""

import io
import struct
from pathlib import Path

from PIL import Image, ImageOps

from ..processing_safe_llava import rgb_array


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# What Pillow raises for a file that is not a readable image (UnidentifiedImageError and truncation are OSErrors;
# some broken PNG chunks raise SyntaxError).
_PILLOW_DECODE_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
# What reading a malformed EXIF block can raise.
_EXIF_ERRORS = (*_PILLOW_DECODE_ERRORS, ValueError, TypeError, KeyError, IndexError, struct.error)


def load_image(value) -> Image.Image:
    """
    Opens and decodes one image as RGB (first frame of an animation), exactly as `SafeLlavaProcessor` renders it
    (16-bit samples scaled, transparency composited onto white), so that training, evaluation and audits see what
    inference sees. The EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so a phone photo stored
    sideways is judged upright, as the person saw it. The one image loader of the project's tools.

    Args:
        value: a `PIL.Image.Image`, a path (`str` / `os.PathLike`), encoded `bytes`, or a `datasets.Image(decode=False)`
            value `{"bytes": ..., "path": ...}`.

    Raises:
        ValueError: the value is of another kind, or the image is missing, cannot be decoded (also a decompression
            bomb, Pillow's `DecompressionBombError`) or carries a malformed EXIF block.
    """
    if isinstance(value, Image.Image):
        return _upright_rgb(value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source = io.BytesIO(value)
    elif isinstance(value, (str, Path)) and str(value):
        source = value
    else:
        raise ValueError(
            f"Cannot read an image from a {type(value).__name__}; accepted: a PIL image, a file path, encoded bytes, "
            "or {'bytes': ..., 'path': ...}."
        )
    try:
        image = Image.open(source)
    except _PILLOW_DECODE_ERRORS as error:
        raise _unreadable(error) from error
    with image:
        return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    """`image` decoded, turned as its EXIF orientation says (a copy without the tag), and rendered as the processor
    renders it."""
    try:
        image.load()
    except _PILLOW_DECODE_ERRORS as error:
        raise _unreadable(error) from error
    try:
        upright = ImageOps.exif_transpose(image)
    except _EXIF_ERRORS as error:
        raise ValueError(f"unreadable image (malformed EXIF data, {type(error).__name__}: {error})") from error
    return Image.fromarray(rgb_array(upright))


def _unreadable(error: BaseException) -> ValueError:
    return ValueError(f"unreadable image ({type(error).__name__}: {error})")


__all__ = ["IMAGE_EXTENSIONS", "load_image"]
