"""Label-preserving image augmentation for training (stage-1 recipes enable it with `image_augmentation`).

A safety head trained on a narrow image distribution learns its surface (background colour, font, position)
instead of its content. These changes keep every label true (an inverted or slightly moved jailbreak is still a
jailbreak, an inverted photo still clean) and take those shortcuts away:

- `invert`: with probability 1/2, the colours are inverted (light-on-dark text becomes dark-on-light).
- `affine`: a small random rotation (up to 10 degrees), scale (85-100%) and shift (up to 8% of the side); the
  uncovered border takes the colour of the image's top-left pixel.

Only the training split is augmented (`with_augmentation` wraps it with `datasets.Dataset.with_transform`); the
evaluation split and the row check before training see the images as they are. Draws come from one seeded NumPy
generator per process (`dataloader_num_workers > 0` gives each worker a copy of the same stream).
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageOps

from ..fileio import load_image


logger = logging.getLogger(__name__)

AUGMENTATIONS = ("invert", "affine")
MAX_ROTATION_DEGREES = 10.0
MIN_SCALE = 0.85
MAX_SHIFT_FRACTION = 0.08


def parse_augmentations(spec) -> tuple[str, ...]:
    """`"invert,affine"` (or a list of names, or `None` / `""` for none) -> the validated names, in given order."""
    if spec is None:
        return ()
    names = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [name for name in names if name]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"Unknown image augmentation(s) {unknown}; accepted: a comma-separated subset of {list(AUGMENTATIONS)}."
        )
    return tuple(dict.fromkeys(names))


class ImageAugmenter:
    """
    Applies the named augmentations to one PIL image at a time.

    Args:
        names (`Sequence[str]`): A subset of `AUGMENTATIONS`.
        seed (`int`): Seed of the random draws.
    """

    def __init__(self, names, seed: int = 0):
        self.names = parse_augmentations(names)
        self.rng = np.random.default_rng([seed, 2405])

    def __call__(self, image: Image.Image) -> Image.Image:
        """The augmented RGB image, of the same size."""
        image = image.convert("RGB")
        if "invert" in self.names and self.rng.random() < 0.5:
            image = ImageOps.invert(image)
        if "affine" in self.names:
            image = self._affine(image)
        return image

    def _affine(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        angle = float(self.rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
        scale = float(self.rng.uniform(MIN_SCALE, 1.0))
        shift = self.rng.uniform(-MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION, size=2) * (width, height)
        ground = image.getpixel((0, 0))
        scaled = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (width, height), ground)
        left = (width - scaled.width) // 2 + int(shift[0])
        top = (height - scaled.height) // 2 + int(shift[1])
        canvas.paste(scaled, (left, top))
        return canvas.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=ground)


def with_augmentation(dataset, spec, seed: int = 0):
    """
    `dataset` whose `image` column is loaded and augmented on access (unchanged when `spec` names none).

    Args:
        dataset (`datasets.Dataset`): Training rows in the paper's schema (`image`: path, bytes or PIL image).
        spec (`str`, `Sequence[str]` or `None`): The augmentations, as in [`parse_augmentations`].
        seed (`int`, *optional*, defaults to 0): Seed of the random draws.
    """
    names = parse_augmentations(spec)
    if not names:
        return dataset
    augmenter = ImageAugmenter(names, seed)

    def transform(batch: dict) -> dict:
        return {**batch, "image": [augmenter(load_image(image)) for image in batch["image"]]}

    logger.info("Training images are augmented with %s", ", ".join(names))
    return dataset.with_transform(transform)


__all__ = ["AUGMENTATIONS", "ImageAugmenter", "parse_augmentations", "with_augmentation"]
