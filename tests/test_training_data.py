"""Training data: the paper's record schema from JSON/JSONL/lists/datasets, row validation, bad-row reports, clean
subsampling."""

import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_safe_llava.training import (
    find_bad_rows,
    load_image,
    load_safety_dataset,
    prepare_safety_dataset,
    subsample_clean_rows,
    to_chat_messages,
    train_stage1,
)
from modeling_safe_llava.training.data import BAD_ROWS_FILE, SKIPPED_ROWS_FILE

NUM_LEVELS, NUM_TYPES = 4, 7


def solid_image(colour, size=12) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), colour, dtype="uint8"))


def record(image, marker="ok", level=3, type_index=0, question="<image>\nWhat is shown?", answer="I can't help."):
    return {
        "image": image,
        "conversations": [{"from": "human", "value": f"{question} {marker}"}, {"from": "gpt", "value": answer}],
        "safe_level": level,
        "safe_type": type_index,
    }


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    solid_image((255, 0, 0)).save(folder / "red.png")
    solid_image((0, 0, 255)).save(folder / "blue.png")
    (folder / "broken.png").write_bytes(b"this is not an image")
    return folder


def test_json_and_jsonl_files_resolve_relative_image_paths(tmp_path, image_folder):
    records = [record("images/red.png", "a"), record("images/blue.png", "b", level=0, type_index=6)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("data.json", "data.jsonl"):
        dataset = load_safety_dataset(tmp_path / name)
        assert len(dataset) == 2
        assert dataset[0]["image"] == str(tmp_path / "images" / "red.png")
        assert dataset[1]["safe_type"] == 6
        assert find_bad_rows(dataset, NUM_LEVELS, NUM_TYPES) == []
        assert load_image(dataset[1]["image"]).getpixel((0, 0)) == (0, 0, 255)


def test_in_memory_images_pil_bytes_and_datasets(image_folder):
    buffer = io.BytesIO()
    solid_image((0, 255, 0)).save(buffer, format="PNG")
    sources = {
        "pil": [record(solid_image((0, 255, 0)))],
        "bytes": [record(buffer.getvalue())],
        "dataset": datasets.Dataset.from_list([record(solid_image((0, 255, 0)))]),
    }
    for kind, source in sources.items():
        dataset = load_safety_dataset(source)
        assert find_bad_rows(dataset, NUM_LEVELS, NUM_TYPES) == [], kind
        assert load_image(dataset[0]["image"]).getpixel((3, 3)) == (0, 255, 0), kind


def test_unsupported_sources_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="accepted sources"):
        load_safety_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="accepted sources"):
        load_safety_dataset(42)
    with pytest.raises(ValueError, match="accepted: a PIL image, a file path"):
        load_image(3.5)


def bad_row_records(image_folder):
    """Good rows at even indices, one bad row of each kind at odd ones (index -> expected words in the reason)."""
    red = str(image_folder / "red.png")
    rows, expected = [], {}

    def add_bad(row, words):
        rows.append(record(red, f"good{len(rows)}"))
        expected[len(rows)] = words
        rows.append(row)

    add_bad(record(None), "image is missing")
    add_bad(record(str(image_folder / "nowhere.png")), "unreadable image")
    add_bad(record(str(image_folder / "broken.png")), "unreadable image")
    add_bad(record(red, level=4), "safe_level=4 is out of range")
    add_bad(record(red, level=-1), "safe_level=-1 is out of range")
    add_bad(record(red, type_index=7), "safe_type=7 is out of range")
    add_bad(record(red, question="What is shown?"), "no <image>")
    add_bad(record(red, question="<image>\n<image>\nTwo?"), "2 <image> placeholders")
    no_answer = record(red)
    no_answer["conversations"] = no_answer["conversations"][:1]
    add_bad(no_answer, "no (non-empty) assistant turn")
    empty_answer = record(red, answer="   ")
    add_bad(empty_answer, "no (non-empty) assistant turn")
    bot = record(red)
    bot["conversations"][1]["from"] = "bot"
    add_bad(bot, "unknown role 'bot'")
    rows.append(record(red, "good_last"))
    return rows, expected


@pytest.mark.parametrize("num_proc", [None, 2])
def test_each_kind_of_bad_row_is_reported_with_its_index(image_folder, num_proc):
    rows, expected = bad_row_records(image_folder)
    bad = find_bad_rows(load_safety_dataset(rows), NUM_LEVELS, NUM_TYPES, num_proc=num_proc)
    assert [row.index for row in bad] == sorted(expected)
    for row in bad:
        assert expected[row.index] in row.reason, (row.index, row.reason)


def test_broken_image_bytes_inside_a_dataset_are_a_bad_row_not_a_crash():
    good = io.BytesIO()
    solid_image((9, 9, 9)).save(good, format="PNG")
    dataset = datasets.Dataset.from_list([record(good.getvalue()), record(b"garbage"), record(good.getvalue())])
    bad = find_bad_rows(dataset, NUM_LEVELS, NUM_TYPES)
    assert [(row.index, row.reason.split(" (")[0]) for row in bad] == [(1, "unreadable image")]


def test_bad_rows_stop_the_run_unless_skipped_and_skips_are_listed(tmp_path, image_folder):
    rows, expected = bad_row_records(image_folder)
    with pytest.raises(ValueError) as stopped:
        prepare_safety_dataset(rows, NUM_LEVELS, NUM_TYPES, output_dir=tmp_path / "run1")
    message = str(stopped.value)
    for index in expected:
        assert f"row {index}:" in message
    assert "skip_bad_rows" in message
    report = json.loads((tmp_path / "run1" / BAD_ROWS_FILE).read_text())
    assert [row["index"] for row in report["rows"]] == sorted(expected) and report["skipped"] is False

    kept = prepare_safety_dataset(rows, NUM_LEVELS, NUM_TYPES, skip_bad_rows=True, output_dir=tmp_path / "run2")
    markers = [row["conversations"][0]["value"].rsplit(" ", 1)[-1] for row in kept]
    assert markers == [f"good{i}" for i in range(0, 2 * len(expected), 2)] + ["good_last"]
    report = json.loads((tmp_path / "run2" / SKIPPED_ROWS_FILE).read_text())
    assert report["skipped"] is True and report["num_rows"] == len(rows)
    assert {row["index"]: row["reason"] for row in report["rows"]}.keys() == expected.keys()


def test_training_run_stops_before_training_on_bad_rows_and_lists_skips_in_its_output_folder(
    tmp_path, image_folder, tiny_safe_llava
):
    model, processor = tiny_safe_llava
    rows, expected = bad_row_records(image_folder)
    with pytest.raises(ValueError, match="cannot be trained on"):
        train_stage1(model, processor, rows, tmp_path / "stopped", max_steps=1, disable_tqdm=True)
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    assert model.config.safety_modules_trained is False

    train_stage1(model, processor, rows, tmp_path / "skipped", max_steps=1, skip_bad_rows=True, disable_tqdm=True)
    report = json.loads((tmp_path / "skipped" / SKIPPED_ROWS_FILE).read_text())
    assert sorted(row["index"] for row in report["rows"]) == sorted(expected)
    assert (tmp_path / "skipped" / "model.safetensors").is_file()


def test_clean_rows_are_subsampled_to_the_target_with_a_fixed_seed(image_folder):
    red = str(image_folder / "red.png")
    rows = [record(red, f"r{i}", level=0, type_index=6) if i % 4 else record(red, f"r{i}") for i in range(40)]
    dataset = load_safety_dataset(rows)
    clean_before = sum(1 for t in dataset["safe_type"] if t == 6)

    def markers(subset):
        return [row["conversations"][0]["value"].rsplit(" ", 1)[-1] for row in subset]

    first = subsample_clean_rows(dataset, target=7, clean_type=6, seed=42)
    again = subsample_clean_rows(dataset, target=7, clean_type=6, seed=42)
    other = subsample_clean_rows(dataset, target=7, clean_type=6, seed=0)
    assert sum(1 for t in first["safe_type"] if t == 6) == 7 and clean_before == 30
    assert sum(1 for t in first["safe_type"] if t != 6) == 10  # every risky row kept
    assert markers(first) == markers(again)
    assert markers(first) != markers(other)
    positions = [int(m[1:]) for m in markers(first)]
    assert positions == sorted(positions)  # source order kept
    assert len(subsample_clean_rows(dataset, target=100, clean_type=6)) == 40
    with pytest.raises(ValueError, match="integer >= 0"):
        subsample_clean_rows(dataset, target=-1, clean_type=6)


def test_conversations_become_chat_messages_with_the_image_where_the_placeholder_was():
    image = solid_image((1, 2, 3))
    conversations = [
        {"from": "system", "value": "Be careful."},
        {"from": "USER", "value": "<image>\nWhat is this?"},
        {"from": "ASSISTANT", "value": "A square."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]
    messages = to_chat_messages(conversations, image)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    assert messages[3]["content"] == [{"type": "text", "text": "Sure?"}]
    assert [m["role"] for m in to_chat_messages(conversations, image, include_answers=False)] == ["system", "user"]
    with pytest.raises(ValueError, match="Unknown conversation role 'bot'"):
        to_chat_messages([{"from": "bot", "value": "x"}])


# -- data as users send it (issue 12) --------------------------------------------------------------------------------


def write_jsonl(path, rows: list) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def test_a_float_or_string_label_spoils_only_its_own_row(tmp_path, image_folder):
    rows = [
        record("images/red.png", "a"),
        record("images/red.png", "b", level=1.5),
        record("images/blue.png", "c", level=0, type_index=6),
        record("images/red.png", "d", level=2.0),
        record("images/red.png", "e", type_index="2"),
        '{"image": "images/red.png", "conversations": [',
        record("images/red.png", "f", level=True),
        record("images/blue.png", "g", level=1, type_index=5),
    ]
    dataset = load_safety_dataset(write_jsonl(tmp_path / "data.jsonl", rows))
    assert dataset.features["safe_level"].dtype == "int64" and dataset.features["safe_type"].dtype == "int64"
    bad = {row.index: row.reason for row in find_bad_rows(dataset, NUM_LEVELS, NUM_TYPES)}
    assert bad.pop(5).startswith("line 6 is not valid JSON")
    assert bad == {
        1: "safe_level=1.5 is not an integer",
        3: "safe_level=2.0 is not an integer",
        4: "safe_type='2' is not an integer",
        6: "safe_level=True is not an integer",
    }
    kept = prepare_safety_dataset(tmp_path / "data.jsonl", NUM_LEVELS, NUM_TYPES, skip_bad_rows=True)
    assert [row["conversations"][0]["value"][-1] for row in kept] == ["a", "c", "g"]
    assert [row["safe_level"] for row in kept] == [3, 0, 1] and "_row_problem" not in kept.column_names
    # The same from a .json list and from in-memory records.
    (tmp_path / "data.json").write_text(json.dumps([row for row in rows if not isinstance(row, str)]))
    assert len(find_bad_rows(load_safety_dataset(tmp_path / "data.json"), NUM_LEVELS, NUM_TYPES)) == 4
    in_memory = [record(str(image_folder / "red.png")), record(str(image_folder / "red.png"), level=0.5)]
    assert [row.index for row in find_bad_rows(load_safety_dataset(in_memory), NUM_LEVELS, NUM_TYPES)] == [1]


def test_a_conversation_of_the_wrong_shape_spoils_only_its_own_row(tmp_path, image_folder):
    rows = [record("images/red.png"), {**record("images/red.png"), "conversations": "<image> hi"}, record("images/red.png")]
    bad = find_bad_rows(load_safety_dataset(write_jsonl(tmp_path / "data.jsonl", rows)), NUM_LEVELS, NUM_TYPES)
    assert [(row.index, row.reason) for row in bad] == [(1, "conversations is missing or empty")]


def bomb_png() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels: Pillow's decompression-bomb check refuses to open it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_decompression_bomb_is_a_bad_row_and_validation_goes_on(tmp_path, image_folder, num_proc):
    (image_folder / "bomb.png").write_bytes(bomb_png())
    rows = [record("images/red.png"), record("images/bomb.png"), record("images/nowhere.png"), record("images/blue.png")]
    dataset = load_safety_dataset(write_jsonl(tmp_path / "data.jsonl", rows))
    bad = find_bad_rows(dataset, NUM_LEVELS, NUM_TYPES, num_proc=num_proc)
    assert [row.index for row in bad] == [1, 2]
    assert "DecompressionBombError" in bad[0].reason and bad[0].reason.startswith("unreadable image")


def test_image_paths_must_stay_inside_the_data_root_unless_allowed(tmp_path, image_folder):
    outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
    solid_image((0, 255, 0)).save(outside)
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(image_folder)  # a link inside the root is the user's own layout: allowed
    rows = [
        record("images/red.png", "a"),
        record(str(outside), "b"),  # absolute, elsewhere
        record(f"../../{tmp_path.name}_outside.png", "c"),  # climbs out
        record(str(data / "images" / "blue.png"), "d"),  # absolute, but inside the root
        {**record(None, "e"), "image": {"path": "/etc/hostname"}},
    ]
    path = write_jsonl(data / "data.jsonl", rows)
    with pytest.raises(ValueError, match="lies outside the data root"):
        prepare_safety_dataset(path, NUM_LEVELS, NUM_TYPES, output_dir=tmp_path / "run")
    bad = json.loads((tmp_path / "run" / BAD_ROWS_FILE).read_text())["rows"]
    assert [row["index"] for row in bad] == [1, 2, 4]
    assert all("--allow-images-outside-root" in row["reason"] for row in bad)
    with pytest.raises(ValueError, match="lies outside the data root"):  # an explicit image_root is the root then
        prepare_safety_dataset(path, NUM_LEVELS, NUM_TYPES, image_root=data / "images")
    rows.pop()
    path = write_jsonl(data / "data.jsonl", rows)
    kept = prepare_safety_dataset(path, NUM_LEVELS, NUM_TYPES, allow_images_outside_root=True)
    assert len(kept) == 4 and load_image(kept[2]["image"]).getpixel((0, 0)) == (0, 255, 0)


def test_allow_images_outside_root_is_a_training_option_threaded_to_the_check(tmp_path, image_folder, tiny_safe_llava):
    from modeling_safe_llava.training.arguments import DataArguments, parse_command_line

    assert DataArguments().allow_images_outside_root is False
    _, _, overrides = parse_command_line(1, ["--output_dir", str(tmp_path), "--allow-images-outside-root"])
    assert overrides["allow_images_outside_root"] is True
    model, processor = tiny_safe_llava
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "train.jsonl", [record(str(image_folder / "red.png"), str(i)) for i in range(2)])
    with pytest.raises(ValueError, match="lies outside the data root"):
        train_stage1(model, processor, path, tmp_path / "refused", max_steps=1, disable_tqdm=True)
    train_stage1(model, processor, path, tmp_path / "allowed", max_steps=1, disable_tqdm=True, allow_images_outside_root=True)
    assert (tmp_path / "allowed" / "model.safetensors").is_file()


def test_load_image_turns_a_photo_as_its_exif_orientation_says(tmp_path):
    stored = Image.new("RGB", (30, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (15, 0, 30, 10))  # left red, right blue, as stored
    for orientation, size, top_left in ((6, (10, 30), (255, 0, 0)), (8, (10, 30), (0, 0, 255)), (3, (30, 10), (0, 0, 255))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / "photo.png", exif=exif.tobytes())
        upright = load_image(tmp_path / "photo.png")
        assert upright.size == size and upright.getpixel((0, 0)) == top_left, orientation
    assert load_image(stored).getpixel((0, 0)) == (255, 0, 0)  # no tag: unchanged
