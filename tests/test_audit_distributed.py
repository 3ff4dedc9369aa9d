"""The audit over several processes (torchrun and accelerate launch, CPU with gloo) and over Hugging Face datasets:

- every image exactly once in the merged `results.jsonl`, both ranks scanned, verdicts equal to a single-process audit;
- a rank killed mid-scan, then a rerun at the same or another world size: nothing lost, nothing scanned twice;
- the same over parquet files with `--dataset`, streaming included.

The report's numbers: tests/test_audit_report.py; single-process behaviour: tests/test_audit.py.

Deterministic kills: `KILLING_WORKER` wraps `audit.append_records` so that one rank (env `AUDIT_TEST_KILL_RANK`)
writes half a record and sends itself SIGKILL after `AUDIT_TEST_KILL_AFTER` batches; the audit code has no test hook.
"""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest

from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.audit import audit_images, read_results
from modeling_safe_llava.tools.audit_distributed import shard_path
from modeling_safe_llava.tools.loading import load_model_and_processor

# helpers of the single-process audit tests (tests/ is on sys.path under pytest's default import mode)
from test_audit import CountingModel, make_image_folder, noise_image


REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip
KILLING_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from modeling_safe_llava.tools import audit
    from modeling_safe_llava.tools.cli import main

    original, batches = audit.append_records, [0]

    def append_then_die(handle, records):
        if int(os.environ["RANK"]) == int(os.environ["AUDIT_TEST_KILL_RANK"]):
            batches[0] += 1
            if batches[0] > int(os.environ["AUDIT_TEST_KILL_AFTER"]):
                handle.write('{"id": "torn write'); handle.flush()  # killed in the middle of a record
                os.kill(os.getpid(), signal.SIGKILL)
        original(handle, records)

    audit.append_records = append_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny SafeLlava (marked trained) saved to a folder, and that folder loaded in this process (so that the
    reports name the same model)."""
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return (folder, *load_model_and_processor(folder, "cpu"))


@pytest.fixture(scope="module")
def tiny_model_trained():
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    return model, processor


def launch(launcher: list, arguments: list, env: dict | None = None, expect_success: bool = True):
    """Runs `launcher` + `arguments` from the repository root, offline, one thread per process."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    command = launcher + [str(argument) for argument in arguments]
    finished = subprocess.run(
        command, cwd=REPO, env={**environment, **(env or {})}, capture_output=True, text=True, timeout=240
    )
    output = finished.stdout[-3000:] + finished.stderr[-3000:]
    assert (finished.returncode == 0) == expect_success, output
    return finished


def audit_command(model_dir, output, *source, batch_size=2):
    return ["audit", "--model", model_dir, *source, "--output", output, "--batch-size", batch_size, "--device", "cpu"]


def records_by_id(output_dir) -> dict:
    records = read_results(Path(output_dir) / "results.jsonl")
    ids = [record["id"] for record in records]
    assert ids == sorted(set(ids)), "merged results must hold each id once, sorted by id"
    return {record["id"]: record for record in records}


def assert_same_verdicts(distributed: dict, single: dict):
    assert sorted(distributed) == sorted(single)
    for item_id, record in distributed.items():
        expected = single[item_id]
        assert record["status"] == expected["status"], item_id
        if record["status"] == "ok":
            for key in ("flagged", "level", "category_name", "action"):
                assert record[key] == expected[key], (item_id, key)
            assert record["risk"] == pytest.approx(expected["risk"], abs=1e-5), item_id


def summary_without_run_details(output_dir) -> dict:
    summary = json.loads((Path(output_dir) / "summary.json").read_text())
    summary.pop("last_run")
    summary["contact_sheet"] = {category: sorted(ids) for category, ids in summary["contact_sheet"].items()}
    return summary


def risky_rows(output_dir) -> dict:
    with open(Path(output_dir) / "risky.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {row["id"]: (row["type"], row["level"], row["action"], round(float(row["risk"]), 4)) for row in rows}


def ranks_work(output_dir) -> list[int]:
    return [rank["images"] for rank in json.loads((Path(output_dir) / "summary.json").read_text())["last_run"]["ranks"]]


# ----------------------------------------------------------------------------------------------------------------
# An image folder under torchrun
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_under_torchrun_equal_a_single_process_audit(saved_model, tmp_path):
    model_dir, model, processor = saved_model
    names = make_image_folder(tmp_path / "images", count=9, corrupt=("sub/broken.png",))
    (tmp_path / "images" / os.fsdecode(b"caf\xe9.png")).write_bytes((tmp_path / "images" / names[0]).read_bytes())
    launch(TORCHRUN, ["-m", "modeling_safe_llava", *audit_command(model_dir, tmp_path / "dist", "--images", tmp_path / "images")])

    merged = records_by_id(tmp_path / "dist")
    assert sorted(merged) == sorted([*names, "caf\\xe9.png"])  # every image exactly once, the Latin-1 name escaped
    assert ranks_work(tmp_path / "dist") == [6, 5] and not (tmp_path / "dist" / "shards").exists()
    audit_images(model, processor, tmp_path / "images", tmp_path / "single", batch_size=3)
    assert_same_verdicts(merged, records_by_id(tmp_path / "single"))
    # The reports are the same files (risks compared to 1e-5 above: batches differ, and so may the last float bits,
    # hence the order of near-equal risks in risky.csv and the contact sheet).
    assert summary_without_run_details(tmp_path / "dist") == summary_without_run_details(tmp_path / "single")
    for name in ("shares.csv", "summary.md"):
        assert (tmp_path / "dist" / name).read_text() == (tmp_path / "single" / name).read_text(), name
    assert risky_rows(tmp_path / "dist") == risky_rows(tmp_path / "single")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_killed_mid_scan_then_a_rerun_with_one_process_loses_and_repeats_nothing(saved_model, tmp_path):
    model_dir, model, processor = saved_model
    names = make_image_folder(tmp_path / "images", count=16)
    worker = tmp_path / "worker.py"
    worker.write_text(KILLING_WORKER)
    kill = {"AUDIT_TEST_KILL_RANK": "1", "AUDIT_TEST_KILL_AFTER": "2"}
    command = audit_command(model_dir, tmp_path / "out", "--images", tmp_path / "images")
    launch(TORCHRUN, [worker, *command], env=kill, expect_success=False)

    rank1 = shard_path(tmp_path / "out", 1, 2)
    assert rank1.read_bytes().endswith(b'{"id": "torn write')  # killed mid-record
    assert len(read_results(rank1, repair=False)) == 4  # 2 batches of 2 reached the disk
    recorded = sum(len(read_results(path, repair=False)) for path in (tmp_path / "out" / "shards").iterdir())
    assert not (tmp_path / "out" / "results.jsonl").exists() and 4 <= recorded < 16

    # Rerun with another world size (one process): it reads every shard as done and scans only the rest.
    resumed = CountingModel(model)
    summary = audit_images(resumed, processor, tmp_path / "images", tmp_path / "out", batch_size=2)
    assert resumed.images == 16 - recorded and summary["last_run"] == {
        "world_size": 1, "ranks": [{"rank": 0, "images": 16 - recorded, "seconds": summary["last_run"]["ranks"][0]["seconds"]}],
    }  # fmt: skip
    merged = records_by_id(tmp_path / "out")
    assert sorted(merged) == names and not (tmp_path / "out" / "shards").exists()
    audit_images(model, processor, tmp_path / "images", tmp_path / "single", batch_size=4)
    assert_same_verdicts(merged, records_by_id(tmp_path / "single"))


def test_a_rerun_reads_shards_of_another_world_size_and_its_own_torn_file(tiny_model_trained, tmp_path):
    """World size 3 left shards (one torn); world size 1 resumes: scans only the missing ids, merges, no duplicates."""
    model, processor = tiny_model_trained
    names = make_image_folder(tmp_path / "images", count=9)
    audit_images(model, processor, tmp_path / "images", tmp_path / "full", batch_size=9)
    full = read_results(tmp_path / "full" / "results.jsonl")
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "audit_config.json").write_text((tmp_path / "full" / "audit_config.json").read_text())
    for rank in range(3):  # ranks 0 and 2 finished 2 of their 3 images; rank 1 was killed after 1 and a half
        kept = full[rank::3][: 2 if rank != 1 else 1]
        text = "".join(json.dumps(record) + "\n" for record in kept) + ('{"id": "img' if rank == 1 else "")
        shard_path(tmp_path / "out", rank, 3).write_text(text)
    resumed = CountingModel(model)
    audit_images(resumed, processor, tmp_path / "images", tmp_path / "out", batch_size=2)
    assert resumed.images == 9 - 5
    assert_same_verdicts(records_by_id(tmp_path / "out"), {record["id"]: record for record in full})
    assert sorted(records_by_id(tmp_path / "out")) == names


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (parquet) under accelerate launch and torchrun, streaming included
# ----------------------------------------------------------------------------------------------------------------


def image_dataset(count: int, first: int = 0, corrupt_every: int = 0) -> datasets.Dataset:
    """`count` rows {"image", "name"} (ids "row-NN"); every `corrupt_every`-th image is garbage bytes."""
    images = []
    for index in range(first, first + count):
        buffer = io.BytesIO()
        noise_image(index).save(buffer, format="PNG")
        broken = corrupt_every and index % corrupt_every == corrupt_every - 1
        images.append({"bytes": b"garbage" if broken else buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    rows = {"image": images, "name": [f"row-{index:02d}" for index in range(first, first + count)]}
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_parquet_dataset_under_accelerate_launch_equals_a_single_process_audit(saved_model, tmp_path):
    model_dir, model, processor = saved_model
    dataset = image_dataset(11, corrupt_every=5)
    dataset.to_parquet(tmp_path / "data.parquet")
    source = ["--dataset", tmp_path / "data.parquet", "--split", "train", "--image-column", "image", "--id-column", "name"]
    launch(ACCELERATE, ["-m", "modeling_safe_llava", *audit_command(model_dir, tmp_path / "dist", *source)])

    merged = records_by_id(tmp_path / "dist")
    assert sorted(merged) == [f"row-{index:02d}" for index in range(11)]
    assert ranks_work(tmp_path / "dist") == [6, 5]
    assert [merged[name]["status"] for name in ("row-04", "row-09")] == ["error", "error"]
    audit_images(model, processor, dataset, tmp_path / "single", batch_size=3, id_column="name")
    assert_same_verdicts(merged, records_by_id(tmp_path / "single"))
    assert summary_without_run_details(tmp_path / "dist")["flagged_shares"] == summary_without_run_details(
        tmp_path / "single"
    )["flagged_shares"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_streamed_parquet_dataset_killed_mid_scan_resumes_each_rank_shard(saved_model, tmp_path):
    model_dir, model, processor = saved_model
    parts = [image_dataset(8, first=0), image_dataset(8, first=8)]
    (tmp_path / "data").mkdir()
    for index, part in enumerate(parts):  # two files: split_dataset_by_node gives each rank one file
        part.to_parquet(tmp_path / "data" / f"part-{index}.parquet")
    worker = tmp_path / "worker.py"
    worker.write_text(KILLING_WORKER)
    source = ["--dataset", tmp_path / "data", "--streaming", "--id-column", "name"]
    command = audit_command(model_dir, tmp_path / "out", *source)
    launch(TORCHRUN, [worker, *command], env={"AUDIT_TEST_KILL_RANK": "0", "AUDIT_TEST_KILL_AFTER": "1"}, expect_success=False)
    rank0 = read_results(shard_path(tmp_path / "out", 0, 2), repair=False)
    assert [record["id"] for record in rank0] == ["row-00", "row-01"]  # rank 0 reads part-0 only
    rank1 = [record["id"] for record in read_results(shard_path(tmp_path / "out", 1, 2), repair=False)]
    assert set(rank1) <= {f"row-{index:02d}" for index in range(8, 16)}

    launch(TORCHRUN, ["-m", "modeling_safe_llava", *command])  # same world size: each rank resumes its shard
    merged = records_by_id(tmp_path / "out")
    assert sorted(merged) == [f"row-{index:02d}" for index in range(16)]
    assert ranks_work(tmp_path / "out") == [6, 8 - len(rank1)]  # each rank scanned only what it had left
    audit_images(model, processor, datasets.concatenate_datasets(parts), tmp_path / "single", id_column="name")
    assert_same_verdicts(merged, records_by_id(tmp_path / "single"))


def test_streaming_and_indexed_sources_split_every_row_exactly_once_across_ranks(tmp_path):
    from modeling_safe_llava.tools.audit_sources import make_source

    dataset = image_dataset(7)
    streamed_by_file = datasets.concatenate_datasets([image_dataset(4), image_dataset(3, first=4)])
    cases = {
        "indexed, ids from a column": (make_source(dataset, id_column="name"), [f"row-{i:02d}" for i in range(7)]),
        "streaming, ids from a column": (
            make_source(streamed_by_file.to_iterable_dataset(num_shards=2), id_column="name"),
            [f"row-{i:02d}" for i in range(7)],
        ),
        "streaming, row numbers": (make_source(dataset.to_iterable_dataset(), id_column="id"), [str(i) for i in range(7)]),
    }
    for case, (source, expected) in cases.items():
        for world_size in (1, 2, 3):
            per_rank = [
                [item_id for ids, _ in source.batches({"row-03", "3"}, rank, world_size, 2) for item_id in ids]
                for rank in range(world_size)
            ]
            flat = [item_id for ids in per_rank for item_id in ids]
            assert sorted(flat) == sorted(set(expected) - {"row-03", "3"}), (case, world_size)
            assert all(per_rank) or world_size == 1, (case, world_size)  # every rank gets work


def test_cli_dataset_options_are_checked(saved_model, tmp_path, capsys):
    from modeling_safe_llava.tools.cli import main

    model_dir, _, _ = saved_model
    image_dataset(3).to_parquet(tmp_path / "data.parquet")
    (tmp_path / "notes.txt").write_text("x")
    bad = {
        "--id-column 'nope' is not a column": ["--dataset", tmp_path / "data.parquet", "--id-column", "nope"],
        "no image column 'picture'": ["--dataset", tmp_path / "data.parquet", "--image-column", "picture"],
        "unknown format": ["--dataset", tmp_path / "notes.txt"],
        "--streaming applies to --dataset": ["--images", tmp_path, "--streaming"],
        "Cannot load split 'train' of dataset 'nobody/nothing'": ["--dataset", "nobody/nothing"],  # offline Hub id
    }
    for message, source in bad.items():
        assert main([str(a) for a in audit_command(model_dir, tmp_path / "out", *source)]) == 2
        assert message in capsys.readouterr().err
    assert main([str(a) for a in audit_command(model_dir, tmp_path / "ok", "--dataset", tmp_path / "data.parquet")]) == 0
    assert sorted(records_by_id(tmp_path / "ok")) == ["0", "1", "2"]  # no "id" column: row numbers



def test_merge_keeps_one_record_per_id_and_warns_about_an_id_two_ranks_scanned(tmp_path, caplog):
    from modeling_safe_llava.tools.audit_distributed import merge_records

    (tmp_path / "shards").mkdir()
    shard_path(tmp_path, 0, 2).write_text('{"id": "b", "rank": 0}\n{"id": "dup", "rank": 0}\n')
    shard_path(tmp_path, 1, 2).write_text('{"id": "a", "rank": 1}\n{"id": "dup", "rank": 1}\n{"id": "torn')
    (tmp_path / "results.jsonl").write_text('{"id": "b", "rank": "earlier merge"}\n')  # killed before shard cleanup
    with caplog.at_level("WARNING"):
        records = merge_records(tmp_path)
    assert records == [{"id": "a", "rank": 1}, {"id": "b", "rank": "earlier merge"}, {"id": "dup", "rank": 0}]
    assert read_results(tmp_path / "results.jsonl") == records and not (tmp_path / "shards").exists()
    assert "1 ids were scanned by more than one rank" in caplog.text and "'dup'" in caplog.text
