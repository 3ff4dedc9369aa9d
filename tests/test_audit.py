"""The image audit: every image recorded exactly once, unreadable files as error rows, resumable after a crash or
a kill without rescanning finished batches."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_safe_llava.tools.cli import main
from modeling_safe_llava.tools.audit import audit_images, read_results
from modeling_safe_llava.tools.loading import DEFAULT_QUESTION, image_prompt
from modeling_safe_llava.tiny import build_tiny_safe_llava


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny SafeLlava marked trained by the test (its random head stands in for a trained one)."""
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    return model, processor


class CountingModel:
    """Wraps a model: counts `assess_safety` calls and images, and raises after `fail_after_calls` calls."""

    def __init__(self, model, fail_after_calls=None, sleep_s=0.0):
        self.model = model
        self.fail_after_calls = fail_after_calls
        self.sleep_s = sleep_s
        self.calls = 0
        self.images = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def assess_safety(self, **inputs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.images += inputs["pixel_values"].shape[0]
        time.sleep(self.sleep_s)
        return self.model.assess_safety(**inputs)


def noise_image(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def make_image_folder(folder, count: int, corrupt: tuple = ()) -> list[str]:
    """`count` readable images in several formats and subfolders, plus `corrupt` names holding garbage bytes."""
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"), ("gif", "GIF")]
    names = []
    for index in range(count):
        extension, pil_format = formats[index % len(formats)]
        name = f"{'sub/' if index % 3 == 0 else ''}img_{index:02d}.{extension}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(index).save(folder / name, format=pil_format)
        names.append(name)
    for name in corrupt:
        (folder / name).write_bytes(b"this is not an image")
        names.append(name)
    return sorted(names)


def result_ids(output_dir) -> list[str]:
    return [record["id"] for record in read_results(output_dir / "results.jsonl")]


def test_folder_audit_records_each_image_once_and_corrupt_files_as_errors(tiny_model, tmp_path):
    model, processor = tiny_model
    names = make_image_folder(tmp_path / "images", count=7, corrupt=("sub/broken.jpg",))
    (tmp_path / "images" / "notes.txt").write_text("not an image extension: ignored")
    summary = audit_images(model, processor, tmp_path / "images", tmp_path / "out", batch_size=3)
    assert sorted(result_ids(tmp_path / "out")) == names
    records = {record["id"]: record for record in read_results(tmp_path / "out" / "results.jsonl")}
    broken = records["sub/broken.jpg"]
    assert broken["status"] == "error" and "UnidentifiedImageError" in broken["error"]
    readable = [records[name] for name in names if name != "sub/broken.jpg"]
    assert all(record["status"] == "ok" and 0.0 <= record["risk"] <= 1.0 for record in readable)
    assert summary["num_images"] == 8 and summary["num_errors"] == 1 and summary["num_ignored_files"] == 1
    assert summary["errors"] == [{"id": "sub/broken.jpg", "error": records["sub/broken.jpg"]["error"]}]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "sub/broken.jpg" in (tmp_path / "out" / "summary.md").read_text()
    with open(tmp_path / "out" / "risky.csv", newline="") as handle:
        risky = list(csv.DictReader(handle))
    flagged = sorted(name for name, record in records.items() if record["status"] == "ok" and record["flagged"])
    assert sorted(row["id"] for row in risky) == flagged
    assert (tmp_path / "out" / "risky.csv").read_text().splitlines()[0] == "id,type,level,risk,action"
    assert sum(summary["flagged_by_category"].values()) == len(flagged)


def test_audit_verdicts_equal_direct_assessment(tiny_model, tmp_path):
    model, processor = tiny_model
    make_image_folder(tmp_path / "images", count=4)
    audit_images(model, processor, tmp_path / "images", tmp_path / "out", batch_size=3)
    prompt = image_prompt(processor, DEFAULT_QUESTION)
    for record in read_results(tmp_path / "out" / "results.jsonl"):
        with Image.open(tmp_path / "images" / record["id"]) as image:
            inputs = processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt")
        assert record["risk"] == pytest.approx(float(model.assess_safety(**inputs).risk[0]), abs=1e-5)


def test_resume_after_a_crash_skips_finished_batches_and_loses_nothing(tiny_model, tmp_path):
    model, processor = tiny_model
    # 10 items in id order: 6 top-level images, 3 in sub/, then the unreadable zz_bad.png; batches of 3.
    names = make_image_folder(tmp_path / "images", count=9, corrupt=("zz_bad.png",))
    crashing = CountingModel(model, fail_after_calls=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        audit_images(crashing, processor, tmp_path / "images", tmp_path / "out", batch_size=3)
    done_before = result_ids(tmp_path / "out")
    assert len(done_before) == 6 and not (tmp_path / "out" / "summary.json").exists()

    resumed = CountingModel(model)
    summary = audit_images(resumed, processor, tmp_path / "images", tmp_path / "out", batch_size=3)
    ids = result_ids(tmp_path / "out")
    assert sorted(ids) == names and len(ids) == len(set(ids)) == 10
    assert ids[:6] == done_before  # earlier records kept as they were
    # Left: one batch of 3 images, then a batch holding only the unreadable file (no model call needed).
    assert resumed.images == 3 and resumed.calls == 1
    assert summary["num_images"] == 10 and summary["num_errors"] == 1

    # The interrupted-then-resumed verdicts equal an uninterrupted scan's.
    audit_images(model, processor, tmp_path / "images", tmp_path / "fresh", batch_size=3)
    fresh = {r["id"]: r for r in read_results(tmp_path / "fresh" / "results.jsonl")}
    for record in read_results(tmp_path / "out" / "results.jsonl"):
        assert record.get("risk") == pytest.approx(fresh[record["id"]].get("risk"), abs=1e-5)


def test_a_finished_audit_rescans_nothing_and_resume_false_rescans_all(tiny_model, tmp_path):
    model, processor = tiny_model
    make_image_folder(tmp_path / "images", count=5)
    audit_images(model, processor, tmp_path / "images", tmp_path / "out", batch_size=2)
    again = CountingModel(model)
    audit_images(again, processor, tmp_path / "images", tmp_path / "out", batch_size=2)
    assert again.calls == 0 and len(result_ids(tmp_path / "out")) == 5
    everything = CountingModel(model)
    audit_images(everything, processor, tmp_path / "images", tmp_path / "out", batch_size=2, resume=False)
    assert everything.images == 5 and len(result_ids(tmp_path / "out")) == 5


def test_a_torn_last_line_is_dropped_and_its_image_rescanned(tiny_model, tmp_path):
    model, processor = tiny_model
    names = make_image_folder(tmp_path / "images", count=4)
    audit_images(model, processor, tmp_path / "images", tmp_path / "out", batch_size=4)
    results = tmp_path / "out" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed halfway through a write
    resumed = CountingModel(model)
    audit_images(resumed, processor, tmp_path / "images", tmp_path / "out", batch_size=4)
    ids = result_ids(tmp_path / "out")
    assert resumed.images == 1 and sorted(ids) == names and len(ids) == len(set(ids))


def test_resuming_with_another_threshold_is_refused(tiny_model, tmp_path):
    model, processor = tiny_model
    make_image_folder(tmp_path / "images", count=2)
    audit_images(model, processor, tmp_path / "images", tmp_path / "out", safety_threshold=0.2)
    with pytest.raises(ValueError, match="safety_thresholds"):
        audit_images(model, processor, tmp_path / "images", tmp_path / "out", safety_threshold=0.9)


KILLED_SCAN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from modeling_safe_llava.tools.audit import audit_images
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    class Slow:
        def __init__(self, model):
            self.model = model
        def __getattr__(self, name):
            return getattr(self.model, name)
        def assess_safety(self, **inputs):
            time.sleep(0.4)
            return self.model.assess_safety(**inputs)

    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    audit_images(Slow(model), processor, sys.argv[1], sys.argv[2], batch_size=2)
    """
)


def test_resume_after_the_process_is_killed(tiny_model, tmp_path):
    model, processor = tiny_model
    names = make_image_folder(tmp_path / "images", count=16)
    results = tmp_path / "out" / "results.jsonl"
    command = [sys.executable, "-c", KILLED_SCAN_SCRIPT, str(tmp_path / "images"), str(tmp_path / "out")]
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_bytes().count(b"\n") >= 2):
            assert process.poll() is None, "the scan ended before it could be killed"
            assert time.monotonic() < deadline, "the scan wrote nothing in time"
            time.sleep(0.05)
        process.kill()  # SIGKILL: no cleanup, no flush beyond what was fsynced
    finally:
        process.kill()
        process.wait()
    done_before = len(read_results(results))
    assert 2 <= done_before < 16
    resumed = CountingModel(model)
    audit_images(resumed, processor, tmp_path / "images", tmp_path / "out", batch_size=2)
    ids = result_ids(tmp_path / "out")
    assert resumed.images == 16 - done_before
    assert sorted(ids) == names and len(ids) == len(set(ids))


def test_dataset_source_uses_ids_and_records_corrupt_bytes(tiny_model, tmp_path):
    model, processor = tiny_model
    good = io.BytesIO()
    noise_image(1).save(good, format="PNG")
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}, noise_image(2)],
            "id": ["a", "b", "c"],
        },
        features=datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")}),
    )
    summary = audit_images(model, processor, dataset, tmp_path / "out", batch_size=2)
    records = {record["id"]: record for record in read_results(tmp_path / "out" / "results.jsonl")}
    assert sorted(records) == ["a", "b", "c"]
    assert records["b"]["status"] == "error" and records["a"]["status"] == records["c"]["status"] == "ok"
    assert summary["num_errors"] == 1 and summary["errors"][0]["id"] == "b"


def test_untrained_model_and_bad_sources_are_refused(tmp_path):
    model, processor = build_tiny_safe_llava(seed=0)
    make_image_folder(tmp_path / "images", count=1)
    with pytest.raises(ValueError, match="untrained"):
        audit_images(model, processor, tmp_path / "images", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = audit_images(model, processor, tmp_path / "images", tmp_path / "out", allow_untrained_safety=True)
    assert model.config.safety_modules_trained is False and summary["num_images"] == 1
    with pytest.raises(ValueError, match="(?i)image folder"):
        audit_images(model, processor, tmp_path / "missing", tmp_path / "out2", allow_untrained_safety=True)
    duplicated = datasets.Dataset.from_dict({"image": [noise_image(0), noise_image(1)], "id": ["x", "x"]})
    with pytest.raises(ValueError, match="unique"):
        audit_images(model, processor, duplicated, tmp_path / "out3", allow_untrained_safety=True)


def test_console_script_audits_a_saved_model(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    names = make_image_folder(tmp_path / "images", count=3)
    argv = ["audit", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "images")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--batch-size", "2", "--device", "cpu"]) == 0
    assert sorted(result_ids(tmp_path / "out")) == names
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_images"] == 3


def test_a_file_name_that_is_not_utf8_is_recorded_under_an_escaped_id(tiny_model, tmp_path, capsys):
    model, processor = tiny_model
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "images").mkdir()
    noise_image(0).save(tmp_path / "images" / "good.png")
    noise_image(1).save(tmp_path / "images" / os.fsdecode(b"bad\xff\xfe.png"), format="PNG")
    (tmp_path / "images" / os.fsdecode(b"broken\xe9.png")).write_bytes(b"not an image")
    argv = ["audit", "--model", str(model_dir), "--images", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--device", "cpu"]) == 0  # one odd name does not stop the scan (it used to exit 2)
    records = {record["id"]: record for record in read_results(tmp_path / "out" / "results.jsonl")}
    assert sorted(records) == ["bad\\xff\\xfe.png", "broken\\xe9.png", "good.png"]
    assert records["bad\\xff\\xfe.png"]["status"] == "ok" and records["broken\\xe9.png"]["status"] == "error"
    assert "broken\\xe9.png" in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "Audited 3 images" in capsys.readouterr().out


def test_risky_csv_cells_cannot_become_formulas(tiny_model, tmp_path):
    model, processor = tiny_model
    (tmp_path / "images").mkdir()
    for name in ("=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png", "plain.png"):
        noise_image(len(name)).save(tmp_path / "images" / name)
    audit_images(model, processor, tmp_path / "images", tmp_path / "out", safety_threshold=0.0)
    with open(tmp_path / "out" / "risky.csv", newline="", encoding="utf-8") as handle:
        cells = sorted(row["id"] for row in csv.DictReader(handle))
    assert cells == ["'+1.png", "'-1.png", "'=HYPERLINK(1).png", "'@SUM(1).png", "plain.png"]
    assert "=HYPERLINK(1).png" in result_ids(tmp_path / "out")  # the record keeps the real name


def test_starting_over_never_deletes_results_an_audit_did_not_write(tiny_model, tmp_path):
    """resume=False deletes earlier records only in a folder an audit marked as its own (issue 12: no lost data)."""
    model, processor = tiny_model
    make_image_folder(tmp_path / "images", count=2)
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "results.jsonl").write_text('{"id": "my own notes"}\n')
    with pytest.raises(ValueError, match="was not written by safe-llava audit"):
        audit_images(model, processor, tmp_path / "images", users, batch_size=2, resume=False)
    assert (users / "results.jsonl").read_text() == '{"id": "my own notes"}\n'
