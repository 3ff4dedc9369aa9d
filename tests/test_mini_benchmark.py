"""The offline mini safety benchmark: deterministic files, disjoint splits, paper-schema rows with valid labels."""

import hashlib
import itertools
from pathlib import Path

import pytest
from PIL import Image

from modeling_safe_llava import load_safety_policy
from modeling_safe_llava.data import mini_benchmark
from modeling_safe_llava.configuration_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS
from modeling_safe_llava.data.mini_benchmark import (
    RECORD_KEYS,
    SOURCES,
    SPLITS,
    build_mini_benchmark,
    image_content_hash,
    load_mini_benchmark,
    split_sizes,
    write_mini_benchmark,
)

SMALL = {"num_per_category": 5, "image_size": 40}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def benchmark():
    return build_mini_benchmark(seed=0, **SMALL)


def test_same_seed_writes_byte_identical_files(tmp_path):
    first = file_hashes(write_mini_benchmark(tmp_path / "a", seed=0, **SMALL))
    second = file_hashes(write_mini_benchmark(tmp_path / "b", seed=0, **SMALL))
    assert first == second
    expected_images = sum(split_sizes(5).values()) * len(SOURCES)
    assert sum(name.endswith(".png") for name in first) == expected_images
    assert {"README.md", "train.jsonl", "validation.jsonl", "test.jsonl", "shifted.jsonl"} <= set(first)


def test_another_seed_gives_other_images(tmp_path):
    seed0 = file_hashes(write_mini_benchmark(tmp_path / "a", seed=0, **SMALL))
    seed1 = file_hashes(write_mini_benchmark(tmp_path / "b", seed=1, **SMALL))
    images0 = {digest for name, digest in seed0.items() if name.endswith(".png")}
    images1 = {digest for name, digest in seed1.items() if name.endswith(".png")}
    # Nearly every image differs (a crop of a plain photo region could coincide by chance, so not "all").
    assert len(images0 & images1) <= 2
    assert seed0["test.jsonl"] != seed1["test.jsonl"]


def test_splits_never_share_an_image(benchmark):
    hashes = {split: [image_content_hash(image) for image in benchmark[split]["image"]] for split in SPLITS}
    for split in SPLITS:
        assert len(set(hashes[split])) == len(hashes[split]), f"duplicate image inside {split}"
    for first, second in itertools.combinations(SPLITS, 2):
        assert not set(hashes[first]) & set(hashes[second]), f"{first} and {second} share an image"


def test_split_sizes_and_every_source_in_every_split(benchmark):
    sizes = split_sizes(SMALL["num_per_category"])
    for split in SPLITS:
        sources = list(benchmark[split]["source"])
        for source in SOURCES:
            assert sources.count(source.name) == sizes[split], (split, source.name)


def test_rows_follow_the_paper_schema_with_labels_in_range(benchmark):
    refusals = load_safety_policy()["safety_refusals"]
    labels_of_source = {s.name: (s.safe_level, SAFETY_TYPE_LABELS.index(s.safe_type)) for s in SOURCES}
    for split in SPLITS:
        for row in benchmark[split]:
            assert tuple(row) == RECORD_KEYS
            assert 0 <= row["safe_level"] < len(SAFETY_LEVEL_LABELS)
            assert 0 <= row["safe_type"] < len(SAFETY_TYPE_LABELS)
            assert (row["safe_level"], row["safe_type"]) == labels_of_source[row["source"]]
            user, assistant = row["conversations"]
            assert user["from"] == "USER" and user["value"].startswith("<image>\n") and len(user["value"]) > 10
            assert assistant["from"] == "ASSISTANT" and assistant["value"].strip()
            type_name = SAFETY_TYPE_LABELS[row["safe_type"]]
            if row["safe_level"] > 0:
                assert assistant["value"].startswith(refusals[type_name]), row["id"]
            else:
                assert type_name == "Clean" and not assistant["value"].startswith("I'm sorry"), row["id"]
            assert row["image"].mode == "RGB" and row["image"].size == (SMALL["image_size"],) * 2


def test_levels_and_types_match_the_documented_taxonomy():
    by_name = {source.name: (source.safe_type, source.safe_level) for source in SOURCES}
    assert by_name == {
        "typographic_jailbreak": ("Illegal Risk", 3),
        "captcha": ("Illegal Risk", 2),
        "personal_data": ("Privacy", 2),
        "fake_news": ("Misleading", 1),
        "photo": ("Clean", 0),
        "benign_text": ("Clean", 0),
    }


def test_written_files_load_back_to_the_same_rows(tmp_path, benchmark):
    folder = write_mini_benchmark(tmp_path / "bench", seed=0, **SMALL)
    loaded = load_mini_benchmark(folder)
    assert list(loaded) == list(SPLITS)
    for split in SPLITS:
        assert loaded[split]["id"] == benchmark[split]["id"]
        assert loaded[split]["conversations"] == benchmark[split]["conversations"]
        loaded_hashes = [image_content_hash(image) for image in loaded[split]["image"]]
        assert loaded_hashes == [image_content_hash(image) for image in benchmark[split]["image"]]
    first_line = (folder / "test.jsonl").read_text().splitlines()[0]
    assert '"image": "images/test/' in first_line  # paths are relative to the folder


def test_images_vary_within_a_source(benchmark):
    """Seeded variety: images of one source differ in colours and layout, not only by a few pixels."""
    train = benchmark["train"]
    for source in SOURCES:
        images = [image for image, name in zip(train["image"], train["source"]) if name == source.name]
        corners = {image.getpixel((0, 0)) for image in images}
        assert len(corners) > 1, source.name


def test_bad_arguments_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        build_mini_benchmark(seed=-1, **SMALL)
    with pytest.raises(ValueError, match="num_per_category"):
        build_mini_benchmark(seed=0, num_per_category=2, image_size=40)
    with pytest.raises(ValueError, match="image_size"):
        build_mini_benchmark(seed=0, num_per_category=3, image_size=8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user file")
    with pytest.raises(ValueError, match="not empty"):
        write_mini_benchmark(tmp_path / "busy", seed=0, **SMALL)
    write_mini_benchmark(tmp_path / "busy", seed=0, overwrite=True, **SMALL)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user file"  # overwrite touches only its own files


def test_limitations_are_documented_in_docstring_and_readme(tmp_path):
    limitations = " ".join(mini_benchmark.LIMITATIONS.split())
    assert limitations in " ".join(mini_benchmark.__doc__.split())
    readme = " ".join(write_mini_benchmark(tmp_path / "b", seed=0, **SMALL).joinpath("README.md").read_text().split())
    assert limitations in readme
    assert "Politics" in limitations and "synthetic" in limitations


def test_written_pngs_are_the_declared_size(tmp_path):
    folder = write_mini_benchmark(tmp_path / "b", seed=3, num_per_category=3, image_size=64)
    for path in (folder / "images").rglob("*.png"):
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_console_script_writes_the_same_files_as_the_function(tmp_path):
    from modeling_safe_llava.tools.cli import main

    argv = ["benchmark-data", "--output", str(tmp_path / "cli"), "--seed", "2", "--num-per-category", "3"]
    assert main([*argv, "--image-size", "32"]) == 0
    expected = file_hashes(write_mini_benchmark(tmp_path / "api", seed=2, num_per_category=3, image_size=32))
    assert file_hashes(tmp_path / "cli") == expected


# -- honest synthetic data: varied surface forms and a shifted split ----------------------------------------------


def test_shifted_forms_and_wordings_are_disjoint_from_the_training_ones():
    inside, shifted = mini_benchmark.SURFACE_FORMS["in_distribution"], mini_benchmark.SURFACE_FORMS["shifted"]
    for factor in ("fonts", "colours", "layouts"):
        assert inside[factor] and shifted[factor] and not set(inside[factor]) & set(shifted[factor]), factor
    assert len(inside["fonts"]) >= 3
    assert {"dark-on-light", "light-on-dark"} <= set(inside["colours"]) | set(shifted["colours"])  # both polarities
    for pool, held_out in mini_benchmark.SHIFTED_WORDING.items():
        assert not set(pool) & set(held_out)
    for name, questions in mini_benchmark.SHIFTED_QUESTIONS.items():
        assert not set(questions) & set(mini_benchmark.QUESTIONS[name])


def test_every_font_renders_offline():
    sizes = {mini_benchmark.scalable_font(12, name).getbbox("Steps to")[2] for name in mini_benchmark.FONTS}
    assert len(sizes) >= 3  # different fonts, different text widths


def test_rows_draw_their_forms_from_their_split(monkeypatch):
    """Train/validation/test rows use only in-distribution forms; shifted rows only held-out ones."""
    drawn = []
    original = mini_benchmark.draw_surface_form

    def recording(rng, shifted):
        form = original(rng, shifted)
        drawn.append(form)
        return form

    monkeypatch.setattr(mini_benchmark, "draw_surface_form", recording)
    mini_benchmark.generate_rows(seed=0, num_per_category=5, image_size=40)
    inside = mini_benchmark.SURFACE_FORMS["in_distribution"]
    for form in drawn:
        factors = mini_benchmark.SURFACE_FORMS["shifted" if form.shifted else "in_distribution"]
        assert form.font in factors["fonts"] and form.colours in factors["colours"] and form.layout in factors["layouts"]
    in_distribution = [form for form in drawn if not form.shifted]
    assert {form.colours for form in in_distribution} == set(inside["colours"])
    assert {form.colours for form in drawn if form.shifted} == set(mini_benchmark.SURFACE_FORMS["shifted"]["colours"])
    assert len({form.font for form in in_distribution}) >= 3


def test_shifted_split_asks_held_out_questions(benchmark):
    held_out = {question for questions in mini_benchmark.SHIFTED_QUESTIONS.values() for question in questions}
    for split in SPLITS:
        questions = {row["conversations"][0]["value"].split("\n", 1)[1] for row in benchmark[split]}
        assert (questions <= held_out) if split == "shifted" else not questions & held_out, split
