"""The bases SafeLlava supports, as the tests see them: for each, a tiny random stock model and its processor, the
SafeLlava holding the same weights (built with `from_base`), and a batch of prompts with images.

The stock-contract tests (`stock_contract.py`, `test_stock_contract_*.py`) run once per entry of `BASES`. Adding a
base: write its `TestBase` below (how to build the tiny stock model, which SafeLlava classes wrap it, which image
fields the processor returns) and the contract tests cover it. Nothing here branches on a base's name.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

import modeling_safe_llava
from modeling_safe_llava.presets import load_safety_policy
from modeling_safe_llava import tiny, tiny_gemma3, tiny_qwen2_5_vl


@dataclass(frozen=True)
class TestBase:
    """
    One base under test.

    Args:
        name: the id used in test names (`pytest -k llava_next`).
        build_stock: `seed -> (stock model, stock processor)`, a tiny random stock model of the base.
        model_class, processor_class: names of the SafeLlava classes in `modeling_safe_llava`.
        preset: the tiny configuration preset whose safety fields the SafeLlava gets.
        image_fields: the processor outputs that belong to images (one entry per image, in image order).
        image_shapes: `(width, height)` of the random images of rows 0, 1, 2, ... (cycled).
        units_per_image: `(inputs) -> list[int]`, how many vision units (crops) the safety head judges per image.
        compiles_fullgraph: whether stock's forward with images compiles under `torch.compile(fullgraph=True)`.
        prompt_fields: processor outputs besides `input_ids` / `attention_mask` that follow the prompt's tokens
            (Gemma 3: `token_type_ids`); they go wherever `input_ids` is replaced by `inputs_embeds`.
        generates_from_inputs_embeds: whether stock's `generate` takes `inputs_embeds` (stock Gemma 3 raises).
        embeds_match_ids: whether stock's logits from `inputs_embeds` equal those from `input_ids` (Qwen2.5-VL: its
            multimodal RoPE positions need the token ids; from embeddings alone stock uses text positions).
        takes_4d_attention_mask: whether stock's forward runs with a custom 4D attention mask (Qwen2.5-VL's
            `get_rope_index` reads a 2D mask).
        image_selector: `(inputs, images) -> dict`, the image fields of the images numbered `images`, where they are
            not indexed by image (Qwen2.5-VL: flat patches); default: index every image field by image.
    """

    name: str
    build_stock: Callable
    model_class: str
    processor_class: str
    preset: str
    image_fields: tuple = ("pixel_values",)
    image_shapes: tuple = ((20, 20),)
    units_per_image: Callable | None = None
    compiles_fullgraph: bool = True
    prompt_fields: tuple = ()
    generates_from_inputs_embeds: bool = True
    embeds_match_ids: bool = True
    takes_4d_attention_mask: bool = True
    image_selector: Callable | None = None

    __test__ = False  # not a pytest test class

    @property
    def safe_model_class(self):
        return getattr(modeling_safe_llava, self.model_class)

    @property
    def safe_processor_class(self):
        return getattr(modeling_safe_llava, self.processor_class)

    def build_pair(self, num_llm_safety_tokens: int = 0, seed: int = 0, **config_overrides):
        """
        `(stock, safe, processor)`: the tiny stock model (seed `seed`) and a SafeLlava built by `from_base` from a
        deep copy of it (paper policy texts tokenized; safety modules from seed 1), both float32 and in eval mode.
        """
        stock, stock_processor = self.build_stock(seed)
        processor = self.safe_processor_class.from_base(stock_processor, num_llm_safety_tokens=num_llm_safety_tokens)
        fields = {**tiny.safety_fields(self.preset), **load_safety_policy(), **config_overrides}
        fields["num_llm_safety_tokens"] = num_llm_safety_tokens
        torch.manual_seed(1)  # the fresh safety modules
        safe = self.safe_model_class.from_base(copy.deepcopy(stock), processor=processor, **fields)
        return stock.to(torch.float32).eval(), safe.to(torch.float32).eval(), processor

    def random_image(self, index: int) -> Image.Image:
        """A deterministic RGB noise image; its size cycles through `image_shapes` (anyres bases tile them)."""
        width, height = self.image_shapes[index % len(self.image_shapes)]
        pixels = (np.random.RandomState(index).rand(height, width, 3) * 255).astype("uint8")
        return Image.fromarray(pixels)

    def select_images(self, inputs, images: list[int]) -> dict:
        """The image fields of `inputs` for the images numbered `images` (in image order)."""
        if self.image_selector is not None:
            return self.image_selector(inputs, images)
        index = torch.tensor(images, dtype=torch.long)
        return {name: inputs[name][index] for name in self.image_fields if name in inputs}

    def judged_units(self, inputs) -> list[int]:
        """Vision units the safety head judges for each image of `inputs` (1 each unless the base judges crops)."""
        if self.units_per_image is None:
            return [1] * len(inputs["pixel_values"])
        return self.units_per_image(inputs)


def _llava_next_crops(inputs) -> list[int]:
    """LLaVA-NeXT: the base image plus the anyres crops of each image, as stock's `get_image_features` counts them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints = tiny.load_model_preset("llava-next-tiny.json")["image_grid_pinpoints"]
    crop = inputs["pixel_values"].shape[-1]
    return [image_size_to_num_patches(size, pinpoints, crop) for size in inputs["image_sizes"]]


def _qwen_images(inputs, images: list[int]) -> dict:
    """Qwen2.5-VL: the flat patches of the images numbered `images` (each image `image_grid_thw.prod()` patches)."""
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    starts = [sum(patches[:i]) for i in range(len(patches))]
    rows = [row for i in images for row in range(starts[i], starts[i] + patches[i])]
    return {"pixel_values": inputs["pixel_values"][rows], "image_grid_thw": inputs["image_grid_thw"][images]}


BASES = {
    "llava": TestBase(
        name="llava",
        build_stock=lambda seed: tiny.build_tiny_llava(seed=seed),
        model_class="SafeLlavaForConditionalGeneration",
        processor_class="SafeLlavaProcessor",
        preset="tiny.json",
    ),
    "llava_next": TestBase(
        name="llava_next",
        build_stock=lambda seed: tiny.build_tiny_llava_next(seed=seed),
        model_class="SafeLlavaNextForConditionalGeneration",
        processor_class="SafeLlavaNextProcessor",
        preset="llava-next-tiny.json",
        image_fields=("pixel_values", "image_sizes"),
        # 40x12 and 12x40 pick the 32x16 / 16x32 grids (base + 2 crops), 20x20 the 32x32 grid (base + 4 crops), so
        # a batch holds images with different crop and token counts.
        image_shapes=((40, 12), (20, 20), (12, 40)),
        units_per_image=_llava_next_crops,
        compiles_fullgraph=False,  # anyres: each image's crop grid is chosen from its size (data-dependent)
    ),
    "gemma3": TestBase(
        name="gemma3",
        build_stock=lambda seed: tiny_gemma3.build_tiny_gemma3(seed=seed),
        model_class="SafeGemma3ForConditionalGeneration",
        processor_class="SafeGemma3Processor",
        preset="tiny-gemma3.json",
        prompt_fields=("token_type_ids",),  # bidirectional attention within each image
        generates_from_inputs_embeds=False,  # Gemma3ForConditionalGeneration: "doesn't have its forwarding implemented"
    ),
    "qwen2_5_vl": TestBase(
        name="qwen2_5_vl",
        build_stock=lambda seed: tiny_qwen2_5_vl.build_tiny_qwen2_5_vl(seed=seed),
        model_class="SafeQwen2_5_VLForConditionalGeneration",
        processor_class="SafeQwen2_5_VLProcessor",
        preset="tiny-qwen2_5_vl.json",
        image_fields=("pixel_values", "image_grid_thw"),
        # 20x20 -> a 16x24 image (2x3 merged tokens), 44x30 -> 32x48 (4x6), 17x40 -> 16x40 (2x5): every image its own
        # token count.
        image_shapes=((20, 20), (44, 30), (17, 40)),
        units_per_image=lambda inputs: [1] * len(inputs["image_grid_thw"]),
        compiles_fullgraph=False,  # each image's grid (window attention, rope index) is data-dependent
        prompt_fields=("mm_token_type_ids",),  # get_rope_index reads it
        embeds_match_ids=False,
        takes_4d_attention_mask=False,
        image_selector=_qwen_images,
    ),
}
BASE_NAMES = tuple(BASES)
