"""Label-preserving training augmentation: what each change does, that only the training split sees it, and that a
recipe / override switches it on for a real stage-1 run."""

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw

from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.training import train_stage1
from modeling_safe_llava.training import augment
from modeling_safe_llava.training.augment import ImageAugmenter, parse_augmentations, with_augmentation


def _text_image():
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((8, 12, 24, 18), fill=(10, 10, 10))
    return image


def test_parse_augmentations_accepts_known_names_only():
    assert parse_augmentations("invert, affine") == ("invert", "affine")
    assert parse_augmentations(None) == () and parse_augmentations("") == ()
    with pytest.raises(ValueError, match=r"Unknown image augmentation\(s\) \['blur'\]; accepted"):
        parse_augmentations("invert,blur")


def test_invert_flips_colours_about_half_the_time_and_keeps_the_size():
    augmenter = ImageAugmenter("invert", seed=0)
    image = _text_image()
    outputs = [augmenter(image) for _ in range(40)]
    inverted = [out.getpixel((0, 0)) == (15, 15, 15) for out in outputs]
    assert 8 <= sum(inverted) <= 32 and all(out.getpixel((0, 0)) in {(15, 15, 15), (240, 240, 240)} for out in outputs)
    assert all(out.size == image.size and out.mode == "RGB" for out in outputs)


def test_affine_moves_the_drawing_a_little_and_fills_with_the_ground():
    augmenter = ImageAugmenter("affine", seed=1)
    image = _text_image()
    out = augmenter(image)
    assert out.size == image.size and out != image
    dark = np.asarray(out.convert("L")) < 100
    assert dark.sum() > 0.5 * (np.asarray(image.convert("L")) < 100).sum()  # the content is still there
    assert out.getpixel((0, 0)) == (240, 240, 240) or out.getpixel((31, 31)) == (240, 240, 240)


def test_only_the_wrapped_split_is_augmented_and_none_leaves_it_alone():
    rows = datasets.Dataset.from_list([{"image": _text_image(), "safe_level": 0}]).cast_column("image", datasets.Image())
    assert with_augmentation(rows, None) is rows
    wrapped = with_augmentation(rows, "invert,affine", seed=3)
    images = [wrapped[0]["image"] for _ in range(6)]
    assert len({image.tobytes() for image in images}) > 1  # drawn anew on every access
    assert rows[0]["image"].tobytes() == _text_image().tobytes()  # the source split is unchanged
    assert wrapped[0]["safe_level"] == 0


def test_a_misspelt_augmentation_fails_before_training(tmp_path):
    model, processor = build_tiny_safe_llava()
    with pytest.raises(ValueError, match=r"Unknown image augmentation\(s\) \['flip'\]"):
        train_stage1(model, processor, [], tmp_path / "s1", image_augmentation="invert,flip")


def test_stage1_override_turns_augmentation_on_for_training_only(tmp_path, monkeypatch):
    seen = []
    original = augment.ImageAugmenter.__call__

    def recording(self, image):
        seen.append(image.size)
        return original(self, image)

    monkeypatch.setattr(augment.ImageAugmenter, "__call__", recording)
    model, processor = build_tiny_safe_llava()
    rows = [
        {"image": _text_image(), "conversations": [{"from": "USER", "value": "<image>\nq"},
                                                   {"from": "ASSISTANT", "value": "a"}],
         "safe_level": level, "safe_type": 6 if level == 0 else 1}
        for level in (0, 3)
    ]
    train_stage1(
        model, processor, rows, tmp_path / "s1", max_steps=1, per_device_train_batch_size=2,
        image_augmentation="invert,affine", disable_tqdm=True, eval_strategy="no",
    )
    assert len(seen) == 2  # one batch of two training rows; nothing else was augmented
