"""Upload of a finished SafeLlava export (see `export.export_for_hub`) to the Hugging Face Hub.

```python
>>> from modeling_safe_llava.push import push_to_hub
>>> push_to_hub("exports/safe-llava-7b", "org/safe-llava-7b")  # private repository by default
```
"""

import argparse
import logging
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

from .export import verify_export_folder

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload SafeLlava export (weights, remote code, processor, model card)"


def push_to_hub(
    folder,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
):
    """
    Uploads an export folder to a Hub model repository in one commit.

    Args:
        folder (`str` or `os.PathLike`): a folder written by `export_for_hub` (checked again: complete, no pickle).
        repo_id (`str`): `"org/name"` (or `"name"` under the token's user).
        private (`bool`, defaults to `True`): visibility of a repository this call creates (an existing
            repository keeps its visibility).
        token (`str`, *optional*): a Hub token; None uses `HF_TOKEN` or the stored login.
        revision (`str`, *optional*): branch to commit to (created from main when missing); None: main.
        commit_message (`str`): the commit's message.

    Returns:
        The `CommitInfo` of `HfApi.upload_folder` (`.commit_url`, `.oid`).
    """
    folder = Path(folder)
    validate_repo_id(repo_id)  # HFValidationError (a ValueError) naming the problem
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}.")
    verify_export_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    logger.info("Uploading %s to %s (revision %s)", folder, repo_id, revision or "main")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )


def add_hub_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options shared by `safe-llava push` and `safe-llava export --push-to-hub`."""
    parser.add_argument("--public", action="store_true", help="Create the repository public (default: private).")
    parser.add_argument("--revision", help="Branch to push to (default: main).")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="Commit message.")
    return parser


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`safe-llava push` options. The token comes from `HF_TOKEN` or `hf auth login`, never from the command line."""
    parser.add_argument("--folder", required=True, help="Export folder written by `safe-llava export`.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. org/safe-llava-7b.")
    return add_hub_options(parser)


def run_from_args(args: argparse.Namespace):
    commit = push_to_hub(
        args.folder, args.repo_id, private=not args.public, revision=args.revision, commit_message=args.commit_message
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="safe-llava push", description="Upload a SafeLlava export to the Hub.")
    return run_from_args(add_cli_arguments(parser).parse_args(argv))


__all__ = ["push_to_hub", "add_cli_arguments", "run_from_args"]


if __name__ == "__main__":
    main()
