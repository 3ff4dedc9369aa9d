"""The `safe-llava` console script: `--help` works and documents every subcommand; exit codes and stderr."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modeling_safe_llava.data.mini_benchmark import write_mini_benchmark
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.cli import SUBCOMMANDS, main
from modeling_safe_llava.tools.hub import verify_export_folder


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert f"safe-llava {command}" in help_text and "--" in help_text


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in SUBCOMMANDS)


def test_bad_input_gives_one_clear_line_and_exit_code_2(tmp_path, capsys):
    code = main(["audit", "--model", str(tmp_path / "missing"), "--images", str(tmp_path), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("safe-llava audit: error:") and "Traceback" not in err


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_safe_llava", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in SUBCOMMANDS)


# -- the command line as a Unix tool: exit 0 on success; an expected failure is one line on stderr and exit 2 -------
# Each case runs `python -m modeling_safe_llava ...` in its own process (two at a time).


REPOSITORY = Path(__file__).resolve().parents[1]
SMALL_BENCHMARK = ["--num-per-category", "3", "--image-size", "32"]


def training_run_folder(folder: Path) -> Path:
    """What a user's training run looks like: a SafeLlava config, a checkpoint folder and notes."""
    (folder / "checkpoint-500").mkdir(parents=True)
    (folder / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"model_type": "safe_llava"}))
    (folder / "notes.txt").write_text("learning rate 3e-4 diverged at step 800")
    return folder


# `safe-llava demo --base gemma3` on a tiny random Gemma 3, cut to seconds: the mechanics end to end (train, export,
# reload through the export's remote code, judge), not accuracy.
SMALL_GEMMA3_DEMO = ["--num-per-category", "6", "--stage1-epochs", "1", "--stage2-steps", "1", "--max-new-tokens", "4"]


def cli_cases(root: Path) -> dict:
    """name -> (argv, expected exit code, expected stderr fragment, or stdout fragment on success): one fast failure
    per subcommand and a success for the cheap ones (each process costs seconds of imports). More failures,
    in-process: tests/test_bad_inputs.py (rows `cli-*`, `export-overwrite-*`, `benchmark-data-overwrite-*`)."""
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    training_run_folder(root / "run")
    (root / "a_file").write_text("not a folder")
    missing_model = ["--model", str(root / "no_model"), "--output", str(root / "reports")]
    return {
        "export-succeeds": (["export", "--model", str(checkpoint), "--output", str(root / "export")], 0, "Exported to"),
        "evaluate-missing-model": (
            ["evaluate", *missing_model, "--data", str(root / "run")], 2, "--model must be a folder"
        ),
        "audit-missing-model": (["audit", *missing_model, "--images", str(root)], 2, "--model must be a folder"),
        "calibrate-missing-model": (
            ["calibrate", *missing_model, "--data", str(root / "run"), "--target-false-flag-rate", "0.05"],
            2,
            "--model must be a folder",
        ),
        "push-not-an-export": (
            ["push", "--folder", str(root / "run"), "--repo-id", "org/name"], 2, "not a complete SafeLlava export"
        ),
        "benchmark-data-succeeds": (
            ["benchmark-data", "--output", str(root / "new_benchmark"), *SMALL_BENCHMARK], 0, "Wrote the mini"
        ),
        "data-convert-missing-input": (
            ["data", "convert", "--source", "vlguard", "--input", str(root / "no_input"), "--output", str(root / "c")],
            2,
            "is not a folder",
        ),
        "demo-output-under-a-file": (["demo", "--output-dir", str(root / "a_file" / "demo")], 2, "Not a directory"),
        "serve-public-bind-without-key": (
            ["serve", "--model", str(checkpoint), "--host", "0.0.0.0"], 2, "refusing to serve on 0.0.0.0 without an API key"
        ),
        "demo-gemma3-succeeds": (
            ["demo", "--base", "gemma3", "--output-dir", str(root / "demo_gemma3"), *SMALL_GEMMA3_DEMO],
            0,
            "gemma3_safe_llava.SafeGemma3ForConditionalGeneration",
        ),
        "demo-gemma3-without-the-pretrained-tower": (
            ["demo", "--base", "gemma3", "--vision-tower", "efficientnet-lite0", "--output-dir", str(root / "demo_tower")],
            2,
            "--vision-tower 'efficientnet-lite0' is not available with --base gemma3; accepted: random",
        ),
        "demo-gemma3-without-smollm2": (
            ["demo", "--base", "gemma3", "--language-model", "smollm2", "--output-dir", str(root / "demo_smollm2")],
            2,
            "'smollm2' is not available with --base gemma3",
        ),
    }


def run_module(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SAFE_LLAVA_API_KEY"}
    env = {**env, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modeling_safe_llava", *argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cases = cli_cases(root)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda case: run_module(case[0], root), cases.values())))
    return root, cases, results


CASE_NAMES = [
    "export-succeeds", "evaluate-missing-model", "audit-missing-model", "calibrate-missing-model", "push-not-an-export",
    "benchmark-data-succeeds", "data-convert-missing-input", "demo-output-under-a-file", "serve-public-bind-without-key",
    "demo-gemma3-succeeds", "demo-gemma3-without-smollm2",
]  # fmt: skip


def test_every_subcommand_has_a_subprocess_case():
    covered = {command for command in SUBCOMMANDS for name in CASE_NAMES if name.startswith(f"{command}-")}
    assert covered == set(SUBCOMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_exit_status_and_stderr_in_a_subprocess(cli_runs, name):
    _, cases, results = cli_runs
    argv, expected_code, fragment = cases[name]
    result = results[name]
    assert result.returncode == expected_code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if expected_code == 0:
        assert fragment in result.stdout and "error" not in result.stderr.lower(), (result.stdout, result.stderr)
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"safe-llava {argv[0]}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and fragment in errors[0], result.stderr


@pytest.mark.slow
def test_failed_commands_left_every_user_file_and_successes_wrote_their_folders(cli_runs):
    root, _, _ = cli_runs
    assert sorted(p.name for p in (root / "run").iterdir()) == ["checkpoint-500", "config.json", "notes.txt"]
    assert (root / "run" / "notes.txt").read_text().startswith("learning rate")
    verify_export_folder(root / "export")
    assert (root / "new_benchmark" / "test.jsonl").is_file()
    assert not (root / "reports").exists()


def test_main_returns_0_for_a_subcommand_that_returns_a_path(monkeypatch):
    """`export` returns the export folder; `main` must still say 0 (a Path passed to sys.exit exits 1)."""
    from modeling_safe_llava.tools import cli

    monkeypatch.setattr("modeling_safe_llava.data.mini_benchmark.write_mini_benchmark", lambda *a, **k: Path("x"))
    monkeypatch.setattr("modeling_safe_llava.data.mini_benchmark.run_from_args", lambda args: Path("x"))
    assert cli.main(["benchmark-data", "--output", "unused"]) == 0
