"""Hostile and broken inputs, one table row each: every row either works correctly (and the row checks the result) or
raises an error of the expected type whose message names the problem. Nothing may crash deep inside torch with an
opaque message, and nothing may come back silently wrong.

A row may be marked `xfail(strict=True)` while the guard it needs is missing (the `patch` argument names it);
strict xfail turns the row red as soon as the guard lands, and the mark is then removed. No row is marked today.
"""

import io
import logging
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import chat_prompt, random_image
from PIL import Image
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_safe_llava import SafeLlavaForConditionalGeneration, decide_safety_actions
from modeling_safe_llava.configuration_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS
from modeling_safe_llava.tiny import build_tiny_llava, build_tiny_safe_llava, safety_fields

DROP = object()  # an override value meaning "leave this processor output out"
GREEDY = {"max_new_tokens": 2, "do_sample": False}

PATCHES = {
    "P1": "P1 (check_safety_ready accepts only booleans)",
    "P2": "P2 (non-finite safety logits/probabilities raise)",
    "P3": "P3 (generate honours generation_config.safety_threshold)",
    "P4": "P4 (no image reaches the LLM unjudged / placeholders need pixel_values)",
    "P5": "P5 (check_model_inputs: dtypes, shapes, devices, vocabulary, length)",
    "P6": "P6 (safetensors-only loading)",
    "P7": "P7 (processor decodes images eagerly and scales 16/32-bit modes)",
    "D1": "D1 (fileio/images.py load_image (training data) must composite alpha like the processor; owner: data loading)",
    "D2": "D2 (fileio/images.py load_image (audit/evaluate) must composite alpha like the processor; owner: audit/evaluate)",
    "C1": "C1 (cli.build_parser imports no subcommand module for an unknown command)",
}


class Env:
    """One tiny SafeLlava (safety modules marked trained) and its processor, shared by every row of this module."""

    def __init__(self, tmp_dir):
        self.model, self.processor = build_tiny_safe_llava(seed=0)
        self.model.config.safety_modules_trained = True
        self.prompt = chat_prompt(self.processor)
        self.tmp = tmp_dir

    def inputs(self, images, texts=None, **kwargs):
        texts = texts if texts is not None else [self.prompt] * len(images)
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True, **kwargs)

    @cached_property
    def one(self):
        return self.inputs([random_image(0)])

    @cached_property
    def two(self):
        return self.inputs([random_image(0), random_image(1)], [self.prompt, chat_prompt(self.processor, "Hi?")])

    @cached_property
    def long(self):
        """One image and a prompt longer than the language model's max_position_embeddings."""
        return self.inputs([random_image(0)], [chat_prompt(self.processor, "coffee " * 300)])

    def pixels(self, image):
        return self.inputs([image])["pixel_values"]

    def merged(self, base, overrides):
        merged = {**(base if base is not None else self.one), **overrides}
        return {name: value for name, value in merged.items() if value is not DROP}

    def assess(self, base=None, **overrides):
        return self.model.assess_safety(**self.merged(base, overrides))

    def generate(self, base=None, **overrides):
        return self.model.generate(**self.merged(base, {**GREEDY, **overrides}))

    def forward(self, base=None, **overrides):
        with torch.no_grad():
            return self.model(**self.merged(base, overrides))

    def file(self, name, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    @cached_property
    def saved_dir(self):
        """The env model saved with `save_pretrained` (safetensors)."""
        folder = self.tmp / "saved"
        self.model.save_pretrained(folder)
        return folder

    @cached_property
    def pickle_only_dir(self):
        """A checkpoint folder whose weights exist only as a pickle (`pytorch_model.bin`)."""
        folder = self.tmp / "pickle_only"
        self.model.config.save_pretrained(folder)
        torch.save(self.model.state_dict(), folder / "pytorch_model.bin")
        return folder

    @cached_property
    def no_safety_weights_dir(self):
        """A config that claims trained safety modules next to stock LLaVA weights (no safety parameters)."""
        llava, _ = build_tiny_llava(seed=0)
        model = SafeLlavaForConditionalGeneration.from_llava(llava, **safety_fields())
        model.config.safety_modules_trained = True
        folder = self.tmp / "no_safety_weights"
        model.config.save_pretrained(folder)
        llava.save_pretrained(self.tmp / "stock_llava")
        (folder / "model.safetensors").write_bytes((self.tmp / "stock_llava" / "model.safetensors").read_bytes())
        return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_inputs"))


@dataclass
class Row:
    """One input: `call(env)` feeds it in; either it raises `error` with `fragment` in the message, or `check(env,
    result)` asserts that the result is right."""

    call: Callable[[Env], Any]
    error: type[BaseException] | tuple | None = None
    fragment: str = ""
    check: Callable[[Env, Any], None] | None = None


def fails(row_id, call, error, fragment, patch=None):
    return _param(row_id, Row(call, error=error, fragment=fragment), patch)


def works(row_id, call, check, patch=None):
    return _param(row_id, Row(call, check=check), patch)


def _param(row_id, row, patch):
    marks = [pytest.mark.xfail(reason=f"needs patch {PATCHES[patch]}", strict=True)] if patch else []
    return pytest.param(row, id=row_id, marks=marks)


# -- images ------------------------------------------------------------------------------------------------------


def halves(mode, left, right, size=16):
    """A `size`x`size` image of `mode`: the left half `left`, the right half `right`."""
    image = Image.new(mode, (size, size), right)
    image.paste(left, (0, 0, size // 2, size))
    return image


def gray16(left, right, size=16):
    """A 16-bit grayscale (`I;16`) image, as Pillow opens a 16-bit PNG."""
    samples = np.full((size, size), right, dtype=np.uint16)
    samples[:, : size // 2] = left
    return Image.fromarray(samples)


def palette(transparent_right=False):
    image = halves("RGB", (10, 200, 30), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    if transparent_right:
        image.info["transparency"] = int(np.array(image)[0, -1])
    return image


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png(env):
    data = png_bytes(random_image(3, size=64))
    return Image.open(env.file("truncated.png", data[: len(data) // 2]))


def corrupt_png(env):
    data = bytearray(png_bytes(random_image(4, size=64)))
    start = data.find(b"IDAT") + 20
    data[start : start + 40] = bytes(byte ^ 0xFF for byte in data[start : start + 40])
    return Image.open(env.file("corrupt.png", bytes(data)))


def same_pixels_as(expected_image):
    """Check: the processor gives exactly the pixels of `expected_image` (the correct RGB rendering)."""

    def check(env, pixel_values):
        expected = env.pixels(expected_image)
        assert pixel_values.shape == expected.shape
        assert torch.allclose(pixel_values, expected, atol=1e-5), (pixel_values - expected).abs().max()

    return check


IMAGE_ROWS = [
    works("mode-L", lambda env: env.pixels(halves("L", 77, 180)), same_pixels_as(halves("RGB", (77,) * 3, (180,) * 3))),
    works(
        "mode-LA-transparent-half-is-white",
        lambda env: env.pixels(halves("LA", (40, 255), (200, 0))),
        same_pixels_as(halves("RGB", (40,) * 3, (255,) * 3)),
    ),
    works("mode-P", lambda env: env.pixels(palette()), same_pixels_as(halves("RGB", (10, 200, 30), (200, 30, 60)))),
    works(
        "mode-P-with-transparency",
        lambda env: env.pixels(palette(transparent_right=True)),
        same_pixels_as(halves("RGB", (10, 200, 30), (255,) * 3)),
    ),
    works(
        "mode-RGBA-transparent-half-is-white",
        lambda env: env.pixels(halves("RGBA", (220, 20, 20, 255), (20, 220, 20, 0))),
        same_pixels_as(halves("RGB", (220, 20, 20), (255,) * 3)),
    ),
    works(
        "mode-CMYK",
        lambda env: env.pixels(halves("CMYK", (0, 255, 255, 0), (255, 0, 255, 0))),
        same_pixels_as(halves("RGB", (255, 0, 0), (0, 255, 0))),
    ),
    works("mode-1", lambda env: env.pixels(halves("1", 1, 0)), same_pixels_as(halves("RGB", (255,) * 3, (0,) * 3))),
    works(
        "mode-I;16-is-scaled-not-clipped",
        lambda env: env.pixels(gray16(257 * 20, 257 * 100)),
        same_pixels_as(halves("RGB", (20,) * 3, (100,) * 3)),
    ),
    fails(
        "mode-I-beyond-8-bit",
        lambda env: env.pixels(Image.fromarray(np.full((16, 16), 1000, dtype=np.int32))),
        ValueError,
        "has mode 'I' with samples in [1000, 1000]",
    ),
    fails(
        "mode-F-float-samples",
        lambda env: env.pixels(Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32))),
        ValueError,
        "has mode 'F'",
    ),
    works(
        "size-1x1",
        lambda env: env.pixels(Image.new("RGB", (1, 1), (9, 99, 199))),
        same_pixels_as(Image.new("RGB", (16, 16), (9, 99, 199))),
    ),
    works(
        "size-10000x10",
        lambda env: env.pixels(Image.new("RGB", (10000, 10), (9, 99, 199))),
        same_pixels_as(Image.new("RGB", (16, 16), (9, 99, 199))),
    ),
    fails("size-0x0", lambda env: env.pixels(Image.new("RGB", (0, 0))), ValueError, "Image 0 is empty (0x0"),
    fails(
        "truncated-png-second-image",
        lambda env: env.inputs([random_image(0), truncated_png(env)]),
        ValueError,
        "Image 1 could not be decoded (OSError: image file is truncated",
    ),
    fails(
        "corrupt-png-data",
        lambda env: env.inputs([corrupt_png(env)]),
        ValueError,
        "Image 0 could not be decoded (OSError: broken data stream",
    ),
    fails("non-image-bytes", lambda env: env.inputs([b"hello, not an image"]), TypeError, "got type=<class 'bytes'>"),
    # Paths and URLs are loaded as stock LlavaProcessor loads them (see tests/test_processor.py).
    fails(
        "non-image-file-path",
        lambda env: env.inputs([env.file("notes.txt", b"hello, not an image")]),
        OSError,  # PIL.UnidentifiedImageError, as stock LlavaProcessor raises
        "cannot identify image file",
    ),
]

# -- processor: placeholders and prompts --------------------------------------------------------------------------

def bos_only_and_generates(env, inputs):
    assert inputs["input_ids"].tolist() == [[env.processor.tokenizer.bos_token_id]]
    sequences = env.model.generate(**inputs, **GREEDY)  # text only: stock generation, nothing to judge
    assert sequences.shape == (1, 1 + GREEDY["max_new_tokens"])


PROCESSOR_ROWS = [
    fails(
        "placeholder-without-image",
        lambda env: env.processor(text=[env.prompt], return_tensors="pt"),
        ValueError,
        "Found 1 <image> tokens in the text but no images were passed",
    ),
    fails(
        "image-without-placeholder",
        lambda env: env.inputs([random_image(0)], ["USER: Hi ASSISTANT:"]),
        ValueError,
        "Found total 0 <image> tokens and 1 images",
    ),
    fails(
        "more-images-than-placeholders",
        lambda env: env.inputs([random_image(0), random_image(1)], [env.prompt]),
        ValueError,
        "Found total 1 <image> tokens and 2 images",
    ),
    works("empty-prompt-is-bos-only-and-generates", lambda env: env.processor(text=[""], return_tensors="pt"), bos_only_and_generates),
]

# -- model: images and placeholders -------------------------------------------------------------------------------


def nan_pixels(env):
    pixel_values = env.one["pixel_values"].clone()
    pixel_values[0, 0, 0, 0] = float("nan")
    return pixel_values


def same_verdict_as_the_python_float(env, result):
    numpy_verdict, float_verdict = result
    assert numpy_verdict.flagged.tolist() == float_verdict.flagged.tolist()
    assert torch.equal(numpy_verdict.threshold, float_verdict.threshold)


def equal_tensors(env, result):
    ours, stock = result
    assert torch.equal(ours, stock)


def stock_generate(env, base=None, **overrides):
    return LlavaForConditionalGeneration.generate(env.model, **env.merged(base, {**GREEDY, **overrides}))


def stock_forward(env, base=None, **overrides):
    with torch.no_grad():
        return LlavaForConditionalGeneration.forward(env.model, **env.merged(base, overrides))


def same_verdict_as_short_prompt(env, assessment):
    short = env.assess()
    assert assessment.actions == short.actions
    assert torch.allclose(assessment.risk, short.risk, atol=1e-6)


def close_to_float32_verdict(env, assessment):
    reference = env.assess()
    assert assessment.actions == reference.actions
    assert torch.allclose(assessment.risk, reference.risk, atol=1e-3)


MODEL_ROWS = [
    # Placeholders without pixel_values: as in stock LLaVA, the language model sees no image, so nothing is judged.
    works(
        "generate-placeholders-without-pixel-values-as-stock",
        lambda env: (env.generate(pixel_values=DROP), stock_generate(env, pixel_values=DROP)),
        equal_tensors,
    ),
    works(
        "forward-placeholders-without-pixel-values-as-stock",
        lambda env: (env.forward(pixel_values=DROP).logits, stock_forward(env, pixel_values=DROP).logits),
        equal_tensors,
    ),
    works(
        "generate-pre-encoded-images-are-judged",
        lambda env: env.generate(
            pixel_values=DROP,
            mm_encoder_outputs={"image": env.model.model.get_image_features(env.one["pixel_values"])},
            safety_threshold=0.0,
            return_dict_in_generate=True,
        ),
        lambda env, out: out.safety_assessment.flagged.tolist() == [True] or pytest.fail("not judged"),
    ),
    fails(
        "generate-pre-encoded-images-without-vision-states-fail-closed",
        lambda env: env.generate(
            pixel_values=DROP,
            mm_encoder_outputs={
                "image": BaseModelOutputWithPooling(
                    pooler_output=env.model.model.get_image_features(env.one["pixel_values"]).pooler_output
                )
            },
        ),
        ValueError,
        "carry no vision hidden states",
    ),
    fails("assess-without-pixel-values", lambda env: env.assess(pixel_values=DROP), TypeError, "'pixel_values'"),
    fails(
        "pixel-values-without-placeholders",
        lambda env: env.forward(base=env.processor(text=["USER: Hi ASSISTANT:"], return_tensors="pt"), pixel_values=env.one["pixel_values"]),
        ValueError,
        "Image features and image tokens do not match",
    ),
    fails(
        "more-images-than-placeholder-rows",
        lambda env: env.assess(pixel_values=env.two["pixel_values"]),
        ValueError,
        "2 image(s) need 40 <image> placeholders",
    ),
    fails(
        "batch-size-mismatch-ids-2-images-1",
        lambda env: env.assess(base=env.two, pixel_values=env.one["pixel_values"]),
        ValueError,
        "the rows hold [20, 20]",
    ),
    fails(
        "attention-mask-batch-mismatch",
        lambda env: env.assess(base=env.two, attention_mask=env.one["attention_mask"]),
        ValueError,
        "attention_mask has shape (1,",
    ),
    fails(
        "attention-mask-row-attends-nothing",
        lambda env: env.assess(attention_mask=torch.zeros_like(env.one["attention_mask"])),
        ValueError,
        "attention_mask rows [0] attend to no token",
    ),
    fails(
        "empty-input-ids",
        lambda env: env.model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), **GREEDY),
        ValueError,
        "input_ids is empty",
    ),
    works("prompt-over-max-length-assess-reads-first-token-only", lambda env: env.assess(base=env.long), same_verdict_as_short_prompt),
    # dtypes and devices
    fails(
        "float-input-ids",
        lambda env: env.assess(input_ids=env.one["input_ids"].float()),
        ValueError,
        "input_ids must be an int64 or int32 tensor",
    ),
    fails(
        "input-ids-outside-vocabulary",
        lambda env: env.forward(input_ids=env.one["input_ids"].masked_fill(env.one["input_ids"] == 1, 10**6)),
        ValueError,
        "outside [0, 599]",
    ),
    fails(
        "int-pixel-values-raw-pixels",
        lambda env: env.assess(pixel_values=(env.one["pixel_values"] * 127 + 128).to(torch.uint8)),
        ValueError,
        "pixel_values must be a floating-point tensor",
    ),
    works("float16-pixel-values", lambda env: env.assess(pixel_values=env.one["pixel_values"].half()), close_to_float32_verdict),
    fails(
        "pixel-values-one-channel",
        lambda env: env.assess(pixel_values=env.one["pixel_values"][:, :1]),
        ValueError,
        "pixel_values must have shape (num_images, 3, height, width)",
    ),
    fails(
        "pixel-values-without-batch-dim",
        lambda env: env.assess(pixel_values=env.one["pixel_values"][0]),
        ValueError,
        "pixel_values must have shape (num_images, 3, height, width)",
    ),
    fails(
        "pixel-values-wrong-size",
        lambda env: env.assess(pixel_values=torch.zeros(1, 3, 32, 32)),
        ValueError,
        "Input image size (32*32) doesn't match model (16*16)",
    ),
    fails(
        "meta-pixel-values",
        lambda env: env.assess(pixel_values=env.one["pixel_values"].to("meta")),
        ValueError,
        "pixel_values is on the 'meta' device",
    ),
    fails(
        "meta-input-ids-generate",
        lambda env: env.generate(input_ids=env.one["input_ids"].to("meta")),
        ValueError,
        "input_ids is on the 'meta' device",
    ),
    # non-finite values must never become an "allow"
    fails("nan-pixel-values-assess", lambda env: env.assess(pixel_values=nan_pixels(env)), ValueError, "are not finite"),
    fails(
        "nan-pixel-values-generate-threshold-0",
        lambda env: env.generate(pixel_values=nan_pixels(env), safety_threshold=0.0),
        ValueError,
        "are not finite",
    ),
    fails(
        "decision-rule-nan-probabilities",
        lambda env: decide_safety_actions(
            torch.tensor([[float("nan"), 0.2, 0.3, 0.5]]),
            torch.full((1, 7), 1 / 7),
            torch.full((6,), 0.5),
            env.model.config.safety_actions,
            SAFETY_LEVEL_LABELS,
            SAFETY_TYPE_LABELS,
        ),
        ValueError,
        "level_probs of rows [0] are not finite",
    ),
]

# -- thresholds, policies, labels ----------------------------------------------------------------------------------

def threshold_zero_was_applied(env, out):
    assert out.safety_assessment.threshold.tolist() == [0.0]
    assert out.safety_assessment.flagged.tolist() == [True]


THRESHOLD_ROWS = [
    fails(f"threshold-{name}", lambda env, value=value: env.assess(safety_threshold=value), ValueError, fragment)
    for name, value, fragment in [
        ("nan", float("nan"), "nan cannot be applied"),
        ("negative", -0.1, "-0.1 cannot be applied"),
        ("above-one", 1.5, "1.5 cannot be applied"),
        ("infinite", float("inf"), "inf cannot be applied"),
        ("string", "0.5", "'0.5' cannot be applied"),
        ("dict-nan", {"Privacy": float("nan")}, "nan cannot be applied"),
        ("dict-unknown-category", {"Weather": 0.5}, "unknown risk type(s) ['Weather']"),
    ]
] + [
    works(
        f"threshold-numpy-{dtype.__name__}-accepted-like-a-float",
        lambda env, dtype=dtype: (env.assess(safety_threshold=dtype(0.25)), env.assess(safety_threshold=0.25)),
        same_verdict_as_the_python_float,
    )
    for dtype in (np.float16, np.float32, np.float64)
] + [
    works(
        "threshold-from-generation-config-is-applied",
        lambda env: env.generate(
            generation_config=GenerationConfig(safety_threshold=0.0, max_new_tokens=2, return_dict_in_generate=True),
            max_new_tokens=DROP,
            do_sample=DROP,
        ),
        threshold_zero_was_applied,
    ),
    fails(
        "action-unknown-category",
        lambda env: env.assess(safety_actions={"Weather": "allow"}),
        ValueError,
        "safety_actions has unknown risk type(s) ['Weather']",
    ),
    fails(
        "action-unknown-name",
        lambda env: env.assess(safety_actions={"Privacy": "block"}),
        ValueError,
        "Unknown safety action 'block' for 'Privacy'",
    ),
    fails(
        "action-list-of-three",
        lambda env: env.assess(safety_actions={"Privacy": ["allow", "hint", "refuse"]}),
        ValueError,
        "must be one action or a list of 4",
    ),
    fails(
        "action-level-0-refuse",
        lambda env: env.assess(safety_actions={"Privacy": ["refuse"] * 4}),
        ValueError,
        "Level 0 ('safe to answer') of 'Privacy' must be 'allow'",
    ),
    fails("actions-not-a-dict", lambda env: env.assess(safety_actions=["allow"]), ValueError, "safety_actions must be a dict"),
    fails(
        "safety-label-negative",
        lambda env: env.forward(base=env.two, safety_labels=torch.tensor([[-1, 0], [0, 6]])),
        ValueError,
        "safety level labels must be in [0, 3] or -100, got [-1]",
    ),
    fails(
        "safety-label-type-out-of-range",
        lambda env: env.forward(base=env.two, safety_labels=torch.tensor([[0, 7], [0, 6]])),
        ValueError,
        "safety type labels must be in [0, 6] or -100, got [7]",
    ),
    fails(
        "safety-labels-float",
        lambda env: env.forward(base=env.two, safety_labels=torch.tensor([[1.0, 2.0], [0.0, 6.0]])),
        ValueError,
        "safety_labels must be an integer tensor of shape (batch_size, 2)",
    ),
]

# -- fail closed and safe loading -----------------------------------------------------------------------------------


@contextmanager
def trained_flag(env, value):
    previous = env.model.config.safety_modules_trained
    env.model.config.safety_modules_trained = value
    try:
        yield
    finally:
        env.model.config.safety_modules_trained = previous


def with_flag(value, call):
    def run(env):
        with trained_flag(env, value):
            return call(env)

    return run


def load_and_generate(folder_attribute):
    def run(env):
        loaded = SafeLlavaForConditionalGeneration.from_pretrained(getattr(env, folder_attribute)).eval()
        return loaded.generate(**{**env.one, **GREEDY})

    return run


def one_finite_verdict(env, assessment):
    assert assessment.risk.shape == (1,) and bool(torch.isfinite(assessment.risk).all())
    assert assessment.actions[0] in ("allow", "hint", "refuse")


FAIL_CLOSED_ROWS = [
    fails("untrained-generate", with_flag(False, lambda env: env.generate()), ValueError, "safety modules of this model are untrained"),
    fails("untrained-assess", with_flag(False, lambda env: env.assess()), ValueError, "safety modules of this model are untrained"),
    works(
        "untrained-explicitly-allowed",
        with_flag(False, lambda env: env.assess(allow_untrained_safety=True)),
        one_finite_verdict,
    ),
    fails(
        "allow-untrained-safety-string-False",
        with_flag(False, lambda env: env.assess(allow_untrained_safety="False")),
        ValueError,
        "allow_untrained_safety must be True or False, got 'False'",
    ),
    fails(
        "trained-flag-string-no",
        with_flag("no", lambda env: env.assess()),
        ValueError,
        "config.safety_modules_trained is 'no'",
    ),
    fails(
        "checkpoint-without-safety-weights-refuses-to-judge",
        load_and_generate("no_safety_weights_dir"),
        ValueError,
        "safety modules of this model are untrained",
    ),
    fails(
        "pickle-only-checkpoint-is-not-loaded",
        lambda env: SafeLlavaForConditionalGeneration.from_pretrained(env.pickle_only_dir),
        OSError,
        "model.safetensors",
    ),
    fails(
        "use-safetensors-false-is-refused",
        lambda env: SafeLlavaForConditionalGeneration.from_pretrained(env.saved_dir, use_safetensors=False),
        ValueError,
        "loads weights from safetensors files only",
    ),
    fails(
        "weights-only-false-is-refused",
        lambda env: SafeLlavaForConditionalGeneration.from_pretrained(env.saved_dir, weights_only=False),
        ValueError,
        "loads weights from safetensors files only",
    ),
]

# -- helpers around the model: training data, audit image decoding, CLI -------------------------------------------


def record(image, **changes):
    base = {
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."}],
        "safe_level": 0,
        "safe_type": 6,
    }
    return {**base, **changes}


def check_record(env, **changes):
    from modeling_safe_llava.training.data import check_record as check

    image = changes.pop("image", None) or env.file("ok.png", png_bytes(random_image(5)))
    return check(record(image, **changes), num_levels=4, num_types=7)


def reason_starts_with(prefix):
    def check(env, reason):
        assert isinstance(reason, str) and reason.startswith(prefix), reason

    return check


def transparent_rgba():
    return halves("RGBA", (220, 20, 20, 255), (20, 220, 20, 0))


def decoded_like_the_processor(env, decoded):
    """Check: a helper's decoded image gives the pixels the processor gives the original (white behind alpha)."""
    assert torch.equal(env.pixels(decoded), env.pixels(transparent_rgba()))


def load_training_data(source):
    from modeling_safe_llava.training.data import load_safety_dataset

    return load_safety_dataset(source)


def data_load_image(env):
    from modeling_safe_llava.fileio import load_image

    return load_image(env.file("data_transparent.png", png_bytes(transparent_rgba())))


def audit_load_image(env, path=None):
    from modeling_safe_llava.fileio import load_image

    return load_image(path or env.file("audit_transparent.png", png_bytes(transparent_rgba())))


def run_cli(argv):
    """`safe-llava ARGV` in-process: (exit code, stderr)."""
    from modeling_safe_llava.tools.cli import main

    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


def cli_with_a_subcommand_missing_its_dependencies(env):
    """`safe-llava typo` must print argparse's usage error even when one subcommand's module cannot be imported
    (e.g. `demo` without the `[train]` extra installed)."""
    from modeling_safe_llava.tools import cli

    broken = {
        "broken": ("modeling_safe_llava.no_such_module", "add_cli_arguments", "run_from_args", "a subcommand whose deps are missing")
    }
    with mock.patch.dict(cli.SUBCOMMANDS, broken):
        return run_cli(["no-such-command"])


def exits_with_one_clear_line(fragment):
    def check(env, result):
        code, stderr = result
        assert code == 2 and fragment in stderr and "Traceback" not in stderr, (code, stderr)

    return check


def image_folder(env, name, files: dict) -> Path:
    folder = env.tmp / name
    folder.mkdir(exist_ok=True)
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    return folder


def audit(env, folder, output, **kwargs):
    from modeling_safe_llava.tools.audit import audit_images

    return audit_images(env.model, env.processor, folder, env.tmp / output, **{"batch_size": 2, **kwargs})


def audit_broken_files(env):
    good = png_bytes(random_image(6))
    folder = image_folder(
        env, "audit_broken", {"good.png": good, "truncated.png": good[: len(good) // 2], "notes.png": b"not an image"}
    )
    return audit(env, folder, "audit_broken_out")


def broken_files_are_error_rows(env, summary):
    assert (summary["num_images"], summary["num_assessed"], summary["num_errors"]) == (3, 1, 2)
    errors = {error["id"]: error["error"] for error in summary["errors"]}
    assert "truncated" in errors["truncated.png"] and "cannot identify image file" in errors["notes.png"]


def audit_resumed_with_another_threshold(env):
    folder = image_folder(env, "audit_resume", {"good.png": png_bytes(random_image(7))})
    audit(env, folder, "audit_resume_out", safety_threshold=0.5)
    return audit(env, folder, "audit_resume_out", safety_threshold=0.3)


def audit_results_with_a_corrupt_line(env):
    from modeling_safe_llava.tools.audit import read_results

    path = env.tmp / "corrupt_results.jsonl"
    path.write_text('{"id": "a.png", "status": "ok"}\nnot json\n{"id": "b.png", "status": "ok"}\n')
    return read_results(path)


HELPER_ROWS = [
    works(
        "data-truncated-image",
        lambda env: check_record(env, image=env.file("data_truncated.png", png_bytes(random_image(3, 64))[:200])),
        reason_starts_with("unreadable image"),
    ),
    works(
        "data-non-image-file",
        lambda env: check_record(env, image=env.file("data_notes.txt", b"hello, not an image")),
        reason_starts_with("unreadable image"),
    ),
    works("data-level-out-of-range", lambda env: check_record(env, safe_level=4), reason_starts_with("safe_level=4 is out of range [0, 3]")),
    works("data-type-not-an-integer", lambda env: check_record(env, safe_type="2"), reason_starts_with("safe_type='2' is not an integer")),
    works(
        "data-no-placeholder",
        lambda env: check_record(env, conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]),
        reason_starts_with("the conversation has no <image> placeholder"),
    ),
    fails(
        "data-unsupported-source",
        lambda env: load_training_data(env.file("rows.csv", b"a,b\n")),
        ValueError,
        "is not an existing .json or .jsonl file",
    ),
    works("data-transparent-png-decoded-like-processor", data_load_image, decoded_like_the_processor),
    works("audit-transparent-png-decoded-like-processor", lambda env: audit_load_image(env), decoded_like_the_processor),
    fails(
        "audit-non-image-file",
        lambda env: audit_load_image(env, env.file("audit_notes.txt", b"not an image")),
        ValueError,
        "cannot identify image file",
    ),
    works("audit-truncated-and-non-image-files-become-error-rows", audit_broken_files, broken_files_are_error_rows),
    fails(
        "audit-untrained-model",
        with_flag(False, lambda env: audit(env, image_folder(env, "audit_untrained", {}), "audit_untrained_out")),
        ValueError,
        "safety modules of this model are untrained",
    ),
    fails(
        "audit-batch-size-zero",
        lambda env: audit(env, env.tmp, "audit_batch_out", batch_size=0),
        ValueError,
        "batch_size must be an integer >= 1, got 0",
    ),
    fails(
        "audit-missing-folder",
        lambda env: audit(env, env.tmp / "no_such_folder", "audit_missing_out"),
        ValueError,
        "does not exist or is not a folder",
    ),
    fails("audit-resume-with-other-threshold", audit_resumed_with_another_threshold, ValueError, "Cannot resume the audit"),
    fails("audit-corrupt-results-line", audit_results_with_a_corrupt_line, ValueError, "corrupt_results.jsonl:2 is not a JSON record"),
    works(
        "cli-audit-missing-model-folder",
        lambda env: run_cli(["audit", "--model", str(env.tmp / "no_model"), "--output", str(env.tmp / "cli_out"), "--images", str(env.tmp)]),
        exits_with_one_clear_line("safe-llava audit: error: --model must be a folder"),
    ),
    fails("cli-audit-missing-required-option", lambda env: run_cli(["audit", "--model", "x"]), SystemExit, "2"),
    fails("cli-unknown-command", lambda env: run_cli(["no-such-command"]), SystemExit, "2"),
    fails(
        "cli-unknown-command-while-a-subcommand-lacks-its-dependencies",
        cli_with_a_subcommand_missing_its_dependencies,
        SystemExit,
        "2",
    ),
]

# -- issue 12: trust boundaries of exports, user files, CLI exit codes, images and data as users send them ---------


def checkpoint_dir(env) -> Path:
    """The env model and its processor saved (what `--model` of every tool takes), written once."""
    folder = env.tmp / "checkpoint"
    if not folder.exists():
        env.model.save_pretrained(folder)
        env.processor.save_pretrained(folder)
    return folder


def export(env, output, **kwargs):
    from modeling_safe_llava.tools.hub import export_for_hub

    return export_for_hub(env.model, env.processor, output, **kwargs)


def export_with_attacker_auto_map(env):
    previous = dict(env.model.config.auto_map or {})
    env.model.config.auto_map = {**previous, "AutoModel": "attacker/repo--evil.Evil"}
    try:
        return export(env, env.tmp / "export_auto_map")
    finally:
        env.model.config.auto_map = previous


def own_auto_map_only(env, folder):
    import json

    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map.values()) == {"configuration_safe_llava.SafeLlavaConfig", "modeling_safe_llava.SafeLlavaForConditionalGeneration"}, auto_map


def verify_folder_with_auto_map(env, auto_map):
    import json
    import shutil

    from modeling_safe_llava.tools.hub import verify_export_folder

    folder = env.tmp / "export_crafted"
    if not folder.exists():
        shutil.copytree(export(env, env.tmp / "export_for_crafting"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    return verify_export_folder(folder)


def training_run(env, name) -> Path:
    """A user's training run folder: a SafeLlava config.json, a checkpoint and notes."""
    folder = env.tmp / name
    (folder / "checkpoint-500").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "safe_llava"}')
    (folder / "notes.txt").write_text("my notes")
    return folder


def benchmark_into(env, folder, **kwargs):
    from modeling_safe_llava.data.mini_benchmark import write_mini_benchmark

    return write_mini_benchmark(folder, seed=0, num_per_category=3, image_size=32, **kwargs)


def user_image_folder(env):
    folder = env.tmp / "user_photos"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "holiday.png").write_bytes(png_bytes(random_image(8)))
    return folder


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(env) -> str:
    """A 200-byte PNG whose header claims 100000 x 100000 pixels (10 gigapixels): Pillow refuses to open it."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return env.file("bomb.png", data + png_chunk(b"IEND", b""))


def scan_rows(env, rows, **kwargs):
    """`find_bad_rows` over in-memory `rows` (a bomb in the middle must not stop the scan)."""
    from modeling_safe_llava.training.data import find_bad_rows, load_safety_dataset

    return find_bad_rows(load_safety_dataset(rows), 4, 7, **kwargs)


def bomb_among_good_rows(env):
    good = env.file("good_row.png", png_bytes(random_image(5)))
    return scan_rows(env, [record(good), record(decompression_bomb_png(env)), record(good)])


def only_row_1_is_bad(words):
    def check(env, bad_rows):
        assert [row.index for row in bad_rows] == [1] and words in bad_rows[0].reason, bad_rows

    return check


def data_file(env, name, lines: list[str], folder=None) -> Path:
    folder = folder or env.tmp / f"data_{name}"
    folder.mkdir(exist_ok=True)
    (folder / "ok.png").write_bytes(png_bytes(random_image(5)))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def row_line(image="ok.png", level="0", type_index="6") -> str:
    conversations = '[{"from": "human", "value": "<image>\\nHi?"}, {"from": "gpt", "value": "A cat."}]'
    return f'{{"image": "{image}", "conversations": {conversations}, "safe_level": {level}, "safe_type": {type_index}}}'


def prepared_bad_rows(env, path, **kwargs):
    """The bad rows `prepare_safety_dataset` reports for a data file (as the training scripts read it)."""
    from modeling_safe_llava.training.data import PROBLEM_COLUMN, prepare_safety_dataset

    try:
        dataset = prepare_safety_dataset(path, 4, 7, skip_bad_rows=True, output_dir=env.tmp / f"{path.stem}_out", **kwargs)
    except ValueError as error:  # pragma: no cover - a failure here is reported by the row's check
        return error
    import json

    report = env.tmp / f"{path.stem}_out" / "skipped_rows.json"
    bad = json.loads(report.read_text())["rows"] if report.exists() else []
    assert PROBLEM_COLUMN not in dataset.column_names
    return [(row["index"], row["reason"]) for row in bad], len(dataset)


def bad_rows_are(expected: dict, kept: int):
    """Check: exactly the rows of `expected` (index -> words in the reason) are bad, and `kept` rows remain."""

    def check(env, result):
        bad, num_kept = result
        assert [index for index, _ in bad] == sorted(expected) and num_kept == kept, result
        for index, reason in bad:
            assert expected[index] in reason, (index, reason)

    return check


def oversized_conversation_batch(env):
    """A 2-million-character answer through the training collator with max_length=64: the text the processor
    tokenises is cut first, and the cut is logged."""
    from modeling_safe_llava.training.collator import SafeLlavaTrainingCollator, character_budget

    huge = record(random_image(2), conversations=[
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 400_000},
    ])  # fmt: skip
    seen = []
    original = env.processor.apply_chat_template

    def spy(conversations, **kwargs):
        if isinstance(conversations[0], list):  # the batch (not the processor's own probe of its template)
            texts = [item["text"] for turn in conversations[0] for item in turn["content"] if item["type"] == "text"]
            seen.append(sum(map(len, texts)))
        return original(conversations, **kwargs)

    collator = SafeLlavaTrainingCollator(env.processor, max_length=64)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("modeling_safe_llava.training.collator").addHandler(handler)
    try:
        with mock.patch.object(env.processor, "apply_chat_template", side_effect=spy):
            batch = collator([huge, record(random_image(3))])
    finally:
        logging.getLogger("modeling_safe_llava.training.collator").removeHandler(handler)
    return batch, seen, character_budget(env.processor.tokenizer, 64), stream.getvalue()


def cut_before_tokenising(env, result):
    batch, seen, budget, log = result
    assert batch["input_ids"].shape[1] == 64 and seen and seen[0] <= budget + len("Describe.") + len("A cat."), seen
    assert "Cut 1 of 2 conversations" in log, log


def two_color_image(size=(32, 16)):
    """Left half red, right half blue (as stored in the file)."""
    return halves("RGB", (255, 0, 0), (0, 0, 255), size=size[0]).resize(size)


def oriented_file(env, format_name, orientation=6) -> str:
    """An image stored sideways with an EXIF orientation tag saying how to turn it (6: rotate 90 degrees clockwise)."""
    image = two_color_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, exif=exif.tobytes(), **({"quality": 95} if format_name == "JPEG" else {}))
    return env.file(f"oriented.{format_name.lower()}", buffer.getvalue())


def upright(env, image):
    """Check: orientation 6 was applied: 16 wide, 32 high, red on top and blue below (what a viewer shows)."""
    pixels = np.asarray(image).astype(int)
    assert image.size == (16, 32), image.size
    top, bottom = pixels[4, 8], pixels[27, 8]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def predictions_csv_with_formulas(env):
    import csv

    from modeling_safe_llava.tools.evaluation import write_predictions_csv

    row = {
        "id": "=HYPERLINK(\"http://x\")", "source": "+cmd", "true_level": 0, "true_type": 6, "pred_level": 0,
        "pred_type": 6, "risk": -0.0, "flagged": False, "threshold": 0.5, "action": "-allow", "decision_level": 0,
        "decision_category": "@SUM(A1)", "level_probs": [1.0, 0, 0, 0], "type_probs": [0] * 6 + [1.0],
    }  # fmt: skip
    path = env.tmp / "predictions.csv"
    write_predictions_csv(path, [row], list(SAFETY_LEVEL_LABELS), list(SAFETY_TYPE_LABELS))
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.DictReader(handle))


def no_cell_is_a_formula(env, cells):
    assert cells["id"] == "'=HYPERLINK(\"http://x\")" and cells["source"] == "'+cmd", cells
    assert cells["action"] == "'-allow" and cells["decision_category"] == "'@SUM(A1)", cells
    assert cells["risk"] == "-0.0" and cells["p_level_0"] == "1.0"  # numbers stay numbers


def cli_evaluate(env, *extra):
    benchmark = env.tmp / "cli_benchmark"
    if not benchmark.exists():
        benchmark_into(env, benchmark)
    return run_cli(["evaluate", "--model", str(checkpoint_dir(env)), "--data", str(benchmark), "--output", str(env.tmp / "cli_eval"), *extra])


def corrupt_weights_dir(env):
    folder = env.tmp / "corrupt_weights"
    folder.mkdir(exist_ok=True)
    for path in checkpoint_dir(env).iterdir():
        (folder / path.name).write_bytes(b"\0garbage" if path.suffix == ".safetensors" else path.read_bytes())
    return folder


def unreadable_config_dir(env):
    folder = env.tmp / "unreadable_config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{ not json")
    return folder


def exits_with(code, fragment=""):
    def check(env, result):
        got, stderr = result
        assert got == code and fragment in stderr and "Traceback" not in stderr, (got, stderr)
        if code == 2:
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert lines[-1].startswith("safe-llava ") and ": error: " in lines[-1], stderr

    return check


ISSUE12_ROWS = [
    # exports and trust
    works("export-auto-map-of-loaded-config-is-replaced", export_with_attacker_auto_map, own_auto_map_only),
    fails(
        "verify-export-auto-map-names-another-repository",
        lambda env: verify_folder_with_auto_map(env, {"AutoModel": "attacker/repo--evil.Evil"}),
        ValueError,
        "never 'org/repo--module.Class'",
    ),
    fails(
        "verify-export-auto-map-names-a-missing-file",
        lambda env: verify_folder_with_auto_map(env, {"AutoModel": "modeling_safe_llava.M", "AutoConfig": "absent.C"}),
        ValueError,
        "auto_map['AutoConfig'] = 'absent.C' does not name a class in a file of this folder",
    ),
    # never lose user data
    fails(
        "export-overwrite-refuses-a-training-run",
        lambda env: export(env, training_run(env, "run_export"), overwrite=True),
        ValueError,
        "it was not written by `safe-llava export` (no .safe-llava-output.json marker",
    ),
    fails(
        "export-output-under-a-regular-file",
        lambda env: export(env, Path(env.file("plain.txt", b"x")) / "export"),
        ValueError,
        "which is a file, not a folder",
    ),
    fails(
        "benchmark-data-overwrite-refuses-a-user-folder",
        lambda env: benchmark_into(env, user_image_folder(env), overwrite=True),
        ValueError,
        "it was not written by `safe-llava benchmark-data`",
    ),
    works(
        "benchmark-data-overwrite-replaces-its-own-output",
        lambda env: benchmark_into(env, benchmark_into(env, env.tmp / "own_benchmark"), overwrite=True),
        lambda env, folder: folder.joinpath("test.jsonl").is_file(),
    ),
    fails("decompression-bomb-image", lambda env: audit_load_image(env, decompression_bomb_png(env)), ValueError, "DecompressionBombError"),
    works("data-decompression-bomb-is-one-bad-row", bomb_among_good_rows, only_row_1_is_bad("DecompressionBombError")),
    works("evaluation-csv-formula-cells-escaped", predictions_csv_with_formulas, no_cell_is_a_formula),
    # images and data as users send them
    works("exif-orientation-jpeg", lambda env: audit_load_image(env, oriented_file(env, "JPEG")), upright),
    works("exif-orientation-png", lambda env: audit_load_image(env, oriented_file(env, "PNG")), upright),
    works(
        "exif-orientation-in-memory-pil-image",
        lambda env: audit_load_image(env, Image.open(oriented_file(env, "PNG"))),
        upright,
    ),
    works(
        "data-image-paths-outside-the-data-root",
        lambda env: prepared_bad_rows(env, data_file(env, "outside.jsonl", [
            row_line(), row_line("/etc/passwd"), row_line("../../../../etc/hostname"), row_line("sub/../ok.png"),
        ])),  # fmt: skip
        bad_rows_are({1: "lies outside the data root", 2: "lies outside the data root"}, kept=2),
    ),
    works(
        "data-image-paths-outside-the-root-explicitly-allowed",
        lambda env: prepared_bad_rows(
            env,
            data_file(env, "allowed.jsonl", [row_line(), row_line(str(Path(env.file("elsewhere.png", png_bytes(random_image(9))))))]),
            allow_images_outside_root=True,
        ),
        bad_rows_are({}, kept=2),
    ),
    works(
        "data-float-label-spoils-only-its-row",
        lambda env: prepared_bad_rows(env, data_file(env, "float.jsonl", [
            row_line(), row_line(level="1.5"), row_line(level="2", type_index="1"), row_line(type_index="6.0"),
            row_line(level='"3"'), "{not json", row_line(),
        ])),  # fmt: skip
        bad_rows_are(
            {1: "safe_level=1.5 is not an integer", 3: "safe_type=6.0 is not an integer",
             4: "safe_level='3' is not an integer", 5: "line 6 is not valid JSON"},
            kept=3,
        ),  # fmt: skip
    ),
    works("data-oversized-conversation-cut-before-tokenising", oversized_conversation_batch, cut_before_tokenising),
    # the command line: exit 0 on success, one stderr line and exit 2 on an expected failure
    works(
        "cli-export-succeeds-exits-0",
        lambda env: run_cli(["export", "--model", str(checkpoint_dir(env)), "--output", str(env.tmp / "cli_export")]),
        exits_with(0),
    ),
    works(
        "cli-export-existing-folder",
        lambda env: run_cli(["export", "--model", str(checkpoint_dir(env)), "--output", str(training_run(env, "cli_run"))]),
        exits_with(2, "already exists and is not empty"),
    ),
    works(
        "cli-export-unreadable-model",
        lambda env: run_cli(["export", "--model", str(unreadable_config_dir(env)), "--output", str(env.tmp / "cli_x1")]),
        exits_with(2, "safe-llava export: error:"),
    ),
    works("cli-evaluate-missing-split", lambda env: cli_evaluate(env, "--split", "nope"), exits_with(2, "Split 'nope' is not in")),
    works(
        "cli-evaluate-corrupt-weights",
        lambda env: run_cli(["evaluate", "--model", str(corrupt_weights_dir(env)), "--data", str(env.tmp), "--output", str(env.tmp / "cli_x2")]),
        exits_with(2, "safe-llava evaluate: error:"),
    ),
    works(
        "cli-audit-missing-images-folder",
        lambda env: run_cli(["audit", "--model", str(checkpoint_dir(env)), "--images", str(env.tmp / "none"), "--output", str(env.tmp / "cli_x3")]),
        exits_with(2, "does not exist or is not a folder"),
    ),
    works(
        "cli-benchmark-data-existing-folder",
        lambda env: run_cli(["benchmark-data", "--output", str(training_run(env, "cli_run2"))]),
        exits_with(2, "already exists and is not empty"),
    ),
    works(
        "cli-benchmark-data-output-under-a-file",
        lambda env: run_cli(["benchmark-data", "--output", str(Path(env.file("plain2.txt", b"x")) / "b")]),
        exits_with(2, "which is a file, not a folder"),
    ),
]

ROWS = IMAGE_ROWS + PROCESSOR_ROWS + MODEL_ROWS + THRESHOLD_ROWS + FAIL_CLOSED_ROWS + HELPER_ROWS + ISSUE12_ROWS


@pytest.mark.parametrize("row", ROWS)
def test_bad_input(env, row):
    if row.error is not None:
        with pytest.raises(row.error) as error:
            row.call(env)
        assert row.fragment in str(error.value), f"message {str(error.value)!r} lacks {row.fragment!r}"
    else:
        row.check(env, row.call(env))


def test_the_table_is_large_and_every_row_is_unique():
    ids = [param.id for param in ROWS]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)


def test_loading_a_checkpoint_without_safety_weights_names_them(env, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = SafeLlavaForConditionalGeneration.from_pretrained(env.no_safety_weights_dir)
    assert "model.safety_module.head" in caplog.text and "model.safety_module.llm_tokens" in caplog.text
    assert loaded.config.safety_modules_trained is False
