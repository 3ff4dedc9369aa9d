"""The `safe-llava` console script: `--help` works and documents every subcommand."""

import pytest

from modeling_safe_llava.tools.cli import SUBCOMMANDS, main


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
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "modeling_safe_llava", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in SUBCOMMANDS)
