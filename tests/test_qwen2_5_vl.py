"""Safe Qwen2.5-VL against stock Qwen2.5-VL on the same weights (issue 26): images of any size, a varying number of
tokens per image, several images per row, rows with different image counts, rows without images; the LLM safety
tokens' multimodal RoPE positions; the images-only processor without torchvision."""

import pytest
import torch
from bases import BASES
from conftest import chat_prompt
from stock_contract import force_safety_verdicts, text_only_prompt

from modeling_safe_llava import SafeQwen2_5_VLForConditionalGeneration, SafeQwen2_5_VLProcessor

BASE = BASES["qwen2_5_vl"]


def allow_everything(safe) -> dict:
    """`generate` kwargs that judge every image row and flag nothing: every action "allow"."""
    safe.config.safety_modules_trained = True
    return {"safety_threshold": 0.0, "safety_actions": {name: "allow" for name in safe.config.risky_type_labels}}


def batch(processor, images_per_row, sizes=((20, 20), (44, 30), (17, 40), (30, 12))):
    """One prompt per row with `images_per_row[row]` images; image `i` has size `sizes[i % len(sizes)]`."""
    texts, images = [], []
    for row, count in enumerate(images_per_row):
        question = ("What is shown in this image?", "Describe the picture.", "Read the text.")[row % 3]
        texts.append(chat_prompt(processor, question, images=count) if count else text_only_prompt(processor, question))
        images += [_image(len(images) + i, sizes) for i in range(count)]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)


def _image(index, sizes):
    from PIL import Image
    import numpy as np

    width, height = sizes[index % len(sizes)]
    return Image.fromarray((np.random.RandomState(index).rand(height, width, 3) * 255).astype("uint8"))


CASES = {
    "one_image": [1],
    "images_of_different_sizes_in_one_row": [3],
    "rows_with_different_image_counts": [2, 0, 1],
    "no_image": [0, 0],
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_head_only_generates_as_stock_with_nothing_flagged(case, sampling):
    stock, safe, processor = BASE.build_pair(num_llm_safety_tokens=0)
    inputs = batch(processor, CASES[case])
    kwargs = {"max_new_tokens": 6, "do_sample": sampling, "return_dict_in_generate": True}
    torch.manual_seed(7)
    expected = stock.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    actual = safe.generate(**inputs, **kwargs, **allow_everything(safe))
    assert torch.equal(actual.sequences, expected.sequences)
    assert actual.safety_assessment.actions == ["allow"] * len(CASES[case])
    if any(CASES[case]):
        assert actual.safety_assessment.images_per_row.tolist() == CASES[case]


@pytest.mark.parametrize("case", ["one_image", "rows_with_different_image_counts"])
def test_head_only_forward_logits_equal_stock(case):
    stock, safe, processor = BASE.build_pair(num_llm_safety_tokens=0)
    inputs = batch(processor, CASES[case])
    expected, actual = stock(**inputs), safe(**inputs)
    assert torch.equal(actual.logits, expected.logits)
    assert actual.safety_level_logits.shape == (len(CASES[case]), 4)


def test_the_verdict_of_a_batch_equals_its_rows_alone():
    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    images_per_row = [2, 0, 1, 3]
    inputs = batch(processor, images_per_row)
    together = safe.assess_safety(**inputs)
    first = 0
    for row, count in enumerate(images_per_row):
        row_inputs = {
            "input_ids": inputs["input_ids"][row : row + 1],
            "attention_mask": inputs["attention_mask"][row : row + 1],
            **BASE.select_images(inputs, list(range(first, first + count))),
        }
        if count == 0:  # nothing to judge: a certain "allow", alone or not
            assert together.actions[row] == "allow" and int(together.images_per_row[row]) == 0
            continue
        alone = safe.assess_safety(**row_inputs)
        torch.testing.assert_close(alone.level_probs[0], together.level_probs[row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.type_probs[0], together.type_probs[row], rtol=1e-5, atol=1e-6)
        assert alone.actions[0] == together.actions[row]
        first += count


def test_a_mixed_batch_gives_each_allowed_row_what_it_gets_alone():
    """Rows refused, hinted and allowed in one batch, each with its own images: the allowed row's answer equals
    stock's for that row alone (the plan hands stock `generate` the allowed rows' `image_grid_thw` only)."""
    stock, safe, processor = BASE.build_pair(num_llm_safety_tokens=0)
    images_per_row = [2, 1, 3]
    inputs = batch(processor, images_per_row)
    safe.config.safety_modules_trained = True
    # image verdicts in image order: row 0 refuse (level 3), row 1 hint (level 1), row 2 allow (level 0, clean)
    handles = force_safety_verdicts(safe, [(3, 4), (3, 4), (1, 5), (0, 6), (0, 6), (0, 6)])
    try:
        output = safe.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    assert output.safety_assessment.actions == ["refuse", "hint", "allow"]
    alone = {
        "input_ids": inputs["input_ids"][2:3],
        "attention_mask": inputs["attention_mask"][2:3],
        "mm_token_type_ids": inputs["mm_token_type_ids"][2:3],
        **BASE.select_images(inputs, [3, 4, 5]),
    }
    width = int(alone["attention_mask"].sum())
    alone = {name: value[:, -width:] if name != "pixel_values" and name != "image_grid_thw" else value for name, value in alone.items()}
    expected = stock.generate(**alone, max_new_tokens=5, do_sample=False)[0, width:]
    answer = output.sequences[2, inputs["input_ids"].shape[1] :][: len(expected)]
    assert answer.tolist() == expected.tolist()


def test_llm_safety_tokens_get_text_positions_from_get_rope_index():
    """One 16x16 image (a 4x4 patch grid, 2x2 merged tokens) with 4 LLM safety tokens: `<|vision_start|>` at text
    position p, the safety tokens at p+1 .. p+4 on all three axes, the image's 2x2 grid at (p+5, p+5 + row, p+5 + col),
    `<|vision_end|>` at p+7, as stock places a text token after a 2x2 image."""
    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    inputs = batch(processor, [1], sizes=((16, 16),))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    ids = inputs["input_ids"][0]
    start = int((ids == safe.config.vision_start_token_id).nonzero())
    assert inputs["mm_token_type_ids"][0, start : start + 10].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    positions, _ = safe.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    p = start  # no padding in a batch of one: position = index up to the image
    window = positions[:, 0, start : start + 10].T.tolist()
    assert window == [
        [p, p, p],
        [p + 1] * 3, [p + 2] * 3, [p + 3] * 3, [p + 4] * 3,  # the LLM safety tokens: text positions
        [p + 5, p + 5, p + 5], [p + 5, p + 5, p + 6], [p + 5, p + 6, p + 5], [p + 5, p + 6, p + 6],  # the 2x2 image
        [p + 7] * 3,  # <|vision_end|>
    ]  # fmt: skip


def test_generate_rebuilds_mm_token_type_ids_for_hinted_prompts():
    """A hinted prompt is rebuilt; its `mm_token_type_ids` (LLM safety tokens of the text kind) come from the ids."""
    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    inputs = batch(processor, [1, 2])
    rebuilt = safe.model.prompt_inputs(inputs["input_ids"], inputs["attention_mask"])["mm_token_type_ids"]
    assert rebuilt.tolist() == inputs["mm_token_type_ids"].tolist()


def test_head_only_processor_is_stock_token_for_token():
    """With 0 LLM safety tokens each image takes stock's `image_grid_thw.prod() / 4` placeholders, all of the image
    kind; with 4, four more per image, the first four of each image of the text kind."""
    _, _, processor = BASE.build_pair(num_llm_safety_tokens=0)
    safe_processor = SafeQwen2_5_VLProcessor.from_base(processor, num_llm_safety_tokens=4)
    stock_inputs, safe_inputs = batch(processor, [3]), batch(safe_processor, [3])
    tokens = stock_inputs["image_grid_thw"].prod(-1) // 4
    assert int((stock_inputs["input_ids"] == processor.image_token_id).sum()) == int(tokens.sum())
    assert int(stock_inputs["mm_token_type_ids"].sum()) == int(tokens.sum())
    assert int((safe_inputs["input_ids"] == processor.image_token_id).sum()) == int(tokens.sum()) + 3 * 4
    assert int(safe_inputs["mm_token_type_ids"].sum()) == int(tokens.sum())
    assert torch.equal(safe_inputs["pixel_values"], stock_inputs["pixel_values"])


def test_the_processor_takes_images_without_torchvision_and_names_it_for_videos():
    _, _, processor = BASE.build_pair(num_llm_safety_tokens=4)
    assert processor.video_processor is None
    with pytest.raises(ValueError, match="torchvision"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>Describe."], videos=[[_image(0, ((16, 16),))] * 2])


def test_from_base_keeps_every_stock_weight():
    stock, safe, _ = BASE.build_pair(num_llm_safety_tokens=4)
    safe_state = safe.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(safe_state[name], tensor), name
    assert isinstance(safe, SafeQwen2_5_VLForConditionalGeneration)


def test_safety_vision_states_are_each_images_own_grid():
    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    inputs = batch(processor, [3])
    image_outputs = safe.model.encode_images(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    grids = safe.model.safety_vision_states(image_outputs)
    expected = [(h // 2, w // 2, 64) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert [tuple(grid.shape) for grid in grids] == expected
    assert len({grid.shape for grid in grids}) == 3  # three sizes
    assert [len(f) for f in image_outputs.pooler_output] == [4 + h * w for h, w, _ in expected]


def test_bad_image_inputs_get_qwen_shaped_errors():
    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    inputs = batch(processor, [1])
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(total_patches, 96\)"):
        safe.assess_safety(**{**inputs, "pixel_values": inputs["pixel_values"][None]})
    with pytest.raises(ValueError, match="image_grid_thw must be a"):
        safe.assess_safety(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match="patches"):
        safe.assess_safety(**{**inputs, "pixel_values": inputs["pixel_values"][:-1]})


def test_the_pipeline_gives_each_row_its_own_verdict():
    from transformers import pipeline

    from modeling_safe_llava.pipeline_safe_llava import SafeLlavaImageTextToTextPipeline

    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    pipe = pipeline("image-text-to-text", model=safe, processor=processor, pipeline_class=SafeLlavaImageTextToTextPipeline)
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": _image(i, ((20, 20), (44, 30)))}, {"type": "text", "text": "What?"}]}]
        for i in range(2)
    ]
    illegal = safe.config.safety_type_labels.index("Illegal Risk")
    handles = force_safety_verdicts(safe, [(3, illegal), (0, 6)])  # row 0 refused, row 1 clean
    try:
        (refused,), (clean,) = pipe(chats, batch_size=2, max_new_tokens=3, return_full_text=False)
    finally:
        for handle in handles:
            handle.remove()
    assert refused["safety"]["action"] == "refuse" and refused["generated_text"].startswith("I'm sor")
    assert clean["safety"]["judged"] and clean["safety"]["action"] == "allow"


def test_a_refused_row_streams_the_refusal():
    from transformers import TextStreamer

    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    inputs = batch(processor, [2])
    streamed = []

    class Recording(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            streamed.append(text)

    illegal = safe.config.safety_type_labels.index("Illegal Risk")
    handles = force_safety_verdicts(safe, [(3, illegal), (0, 6)])
    try:
        out = safe.generate(**inputs, max_new_tokens=200, streamer=Recording(processor.tokenizer, skip_prompt=True,
                            skip_special_tokens=True), return_dict_in_generate=True)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    refusal = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.safety_assessment.actions == ["refuse"] and refusal.startswith("I'm sorry, but I can't help")
    assert "".join(streamed).strip() == refusal.strip()


def test_calibrate_evaluate_and_audit_take_a_saved_checkpoint(tmp_path):
    """The tools pick the base from the checkpoint's `model_type`: calibrate, evaluate and audit a saved Safe
    Qwen2.5-VL (random head marked trained), images of several sizes."""
    from modeling_safe_llava.data.mini_benchmark import write_mini_benchmark
    from modeling_safe_llava.tools.cli import main

    _, safe, processor = BASE.build_pair(num_llm_safety_tokens=4)
    safe.config.safety_modules_trained = True
    safe.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_mini_benchmark(tmp_path / "bench", seed=0, num_per_category=12, image_size=32)
    assert main(["calibrate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "bench"), "--output",
                 str(tmp_path / "calibrated"), "--target-false-flag-rate", "0.2", "--confidence", "0.5",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["evaluate", "--model", str(tmp_path / "calibrated" / "model"), "--data", str(tmp_path / "bench"),
                 "--split", "test", "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(((20, 20), (44, 30), (17, 40))):
        _image(i, (size,)).save(images / f"img{i}.png")
    assert main(["audit", "--model", str(tmp_path / "calibrated" / "model"), "--images", str(images), "--output",
                 str(tmp_path / "audit"), "--device", "cpu", "--batch-size", "2"]) == 0  # fmt: skip
    assert len((tmp_path / "audit" / "results.jsonl").read_text().splitlines()) == 3
