"""The `safe-llava` console script: one subcommand per job, each backed by an importable module."""

import argparse
import importlib
import logging
import sys

from ..checks_safe_llava import is_integer

# subcommand -> (module, its options function, its run function, one-line help). Modules are imported lazily so
# `--help` stays fast.
SUBCOMMANDS = {
    "demo": (
        "modeling_safe_llava.tools.demo", "add_cli_arguments", "run_from_args",
        "build, train both stages, export, reload and judge held-out images",
    ),
    "evaluate": (
        "modeling_safe_llava.tools.evaluation", "add_cli_arguments", "run_from_args",
        "measure the safety head on a labelled dataset",
    ),
    "calibrate": (
        "modeling_safe_llava.tools.calibration", "add_cli_arguments", "run_from_args",
        "fit temperatures and a threshold with a guaranteed false-flag rate on labelled validation rows",
    ),
    "audit": (
        "modeling_safe_llava.tools.audit", "add_cli_arguments", "run_from_args",
        "scan an image folder or dataset for risky content (resumable)",
    ),
    "export": (
        "modeling_safe_llava.tools.hub", "add_export_arguments", "run_export",
        "write a Hub-ready folder with a model card, optionally push it",
    ),
    "push": (
        "modeling_safe_llava.tools.hub", "add_push_arguments", "run_push",
        "upload an exported folder to the Hugging Face Hub",
    ),
    "serve": (
        "modeling_safe_llava.serving.server", "add_cli_arguments", "run_from_args",
        "serve a model over HTTP: OpenAI-compatible chat and moderations, a safety verdict on every answer",
    ),
    "benchmark-data": (
        "modeling_safe_llava.data.mini_benchmark", "add_cli_arguments", "run_from_args",
        "write the offline mini safety benchmark to a folder",
    ),
    "data": (
        "modeling_safe_llava.data.convert", "add_cli_arguments", "run_from_args",
        "convert a public safety dataset (VLGuard, HoliSafe-Bench) to the paper's schema",
    ),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe-llava", description="SafeLlava: safety modules for LLaVA-1.5.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested_subcommand(argv)
    for name, (module_name, add_arguments, run, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if wanted == name:  # only the command being run is imported: a typo or --help never imports them all
            getattr(importlib.import_module(module_name), add_arguments)(sub)
        sub.set_defaults(module=module_name, run=run)
    return parser


def _requested_subcommand(argv):
    """The subcommand named on the command line, so that only its module is imported (None: import all)."""
    for arg in argv or []:
        if arg in SUBCOMMANDS:
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    """
    Runs one subcommand; returns the process exit code: 0 on success (whatever the subcommand returns, unless it
    returns an int exit code), 2 on an expected failure (bad input, an existing or misplaced folder, a missing file,
    an unreadable model), reported as one line on stderr without a traceback, 130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = getattr(importlib.import_module(args.module), args.run)(args)
    except _expected_failures() as error:
        _print_error(args.command, _describe(error))
        return 2
    except KeyboardInterrupt:
        _print_error(args.command, "interrupted")
        return 130
    return result if is_integer(result) else 0


def _expected_failures() -> tuple[type[BaseException], ...]:
    """What a user's input can make a subcommand raise: bad values (ValueError, which includes JSON and Unicode
    errors and Hub id errors), files and folders (OSError: FileExistsError, NotADirectoryError, FileNotFoundError,
    PermissionError, and transformers' "cannot load this model"), and a corrupt safetensors file."""
    from safetensors import SafetensorError  # a dependency of transformers; imported here to keep --help fast

    return (ValueError, OSError, SafetensorError)


def _describe(error: BaseException) -> str:
    """The error as one line: its message with line breaks folded; an OS error about a file: its reason and the file
    (`"File exists: out/model"`, without Python's `[Errno 17]`)."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, ValueError) and error.filename is not None:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    return message


def _print_error(command: str, message: str):
    print(f"safe-llava {command}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
