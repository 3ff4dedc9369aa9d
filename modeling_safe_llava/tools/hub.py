"""Hub export of a SafeLlava model: one folder that `from_pretrained(..., trust_remote_code=True)` loads anywhere.

The folder holds safetensors weights, the remote-code files with `auto_map` (written by the model's and the
processor's `save_pretrained`), the processor (tokenizer, image processor, chat template), a generation config
carrying the default `safety_threshold`, the policies (in `config.json`: `safety_actions`, `safety_hints`,
`safety_refusals`) and `README.md`, the model card. It is written into a hidden sibling folder and renamed into
place only once complete, so an interrupted export never leaves a half-written model at `output_dir`.

```python
>>> from modeling_safe_llava.tools.hub import export_for_hub, push_to_hub
>>> folder = export_for_hub(model, processor, "exports/safe-llava-7b", evaluation="runs/eval/metrics.json")
>>> push_to_hub(folder, "org/safe-llava-7b")  # private by default
```
"""

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id
from .. import pipeline_safe_llava
from ..bases import base_for_model_type, load_safe_model, load_safe_processor, remote_code_files
from ..fileio import MARKER_FILE, check_replaceable, write_marker
from ..policy_safe_llava import SafetyPolicy, generation_config_with_threshold
from .calibration import check_calibration_applied, default_threshold, load_calibration
from .model_card import (
    DEFAULT_BASE_MODEL,
    DEFAULT_LICENSE,
    card_metadata,
    model_facts,
    render_model_card,
    training_context,
)

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload SafeLlava export (weights, remote code, processor, model card)"

# The remote code: copied next to the weights, run by `trust_remote_code=True` (torch + transformers + each other).
# Every base's files; an export carries its own base's (`Base.remote_code_files`).
REMOTE_CODE_FILES = remote_code_files()
REQUIRED_FILES = (
    "config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json", "README.md",
)
# Weight or state files that unpickle (and can run code) when loaded: never part of an export.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
EVALUATION_FILE = "evaluation_metrics.json"
TRAINING_FILE = "training_details.json"
CALIBRATION_FILE = "calibration.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_COMMAND = "export"
# Files whose `auto_map` tells `trust_remote_code` which code to run; an export writes SafeLlava's own entries there.
CONFIG_FILE = "config.json"
PIPELINE_FILE = "pipeline_safe_llava.py"  # SafeLlava's pipeline, named by `custom_pipelines` in config.json
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


def export_for_hub(
    model,
    processor,
    output_dir,
    evaluation=None,
    training: dict | None = None,
    base_model: str = DEFAULT_BASE_MODEL,
    license: str = DEFAULT_LICENSE,
    overwrite: bool = False,
    *,
    allow_untrained_safety: bool = False,
    repo_id: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    calibration=None,
) -> Path:
    """
    Writes a Hub-ready folder for `model` and `processor`, atomically.

    Args:
        model (`SafeLlavaForConditionalGeneration`): a trained model (`config.safety_modules_trained`), LoRA merged.
        processor (`SafeLlavaProcessor`): its processor, with the chat template.
        output_dir (`str` or `os.PathLike`): the folder to create. It must not exist (or be empty) unless
            `overwrite=True`, which replaces a folder that an earlier export wrote (marked by its
            `.safe-llava-output.json`), and only once the new one is complete. Any other folder is refused.
        evaluation (`dict`, `str` or `os.PathLike`, *optional*): an evaluate run's metrics (the dict, or the path of
            its metrics.json); written into the card and copied as `evaluation_metrics.json`. None: "not evaluated".
        training (`dict`, *optional*): both training stages, `{"stage1": {"data", "recipe", "steps", ...},
            "stage2": {...}, "notes": str}`; written into the card and copied as `training_details.json`.
        base_model, license (`str`): the card's metadata.
        allow_untrained_safety (`bool`): export untrained safety modules anyway (the card then says so loudly).
        repo_id (`str`, *optional*): the Hub id shown in the card's usage snippet.
        max_shard_size: largest weight file (`save_pretrained`'s argument).
        calibration (`dict`, `str` or `os.PathLike`, *optional*): a `safe-llava calibrate` report (the dict, or the
            path of its calibration.json) whose temperatures and threshold this model carries; the card reports the
            calibration and the false-flag guarantee, and the export carries it as `calibration.json`.

    Returns:
        `Path` of the complete export.

    Raises:
        ValueError: untrained safety modules (without `allow_untrained_safety`), a PEFT/LoRA model, a processor that
            does not fit the model, bad evaluation/training input, a pickle file in the folder, an `output_dir` under a
            file, or an existing folder that an earlier export did not write (it lacks the marker file
            `.safe-llava-output.json`). `fileio.FolderNotEmptyError` (a FileExistsError): `output_dir` holds files
            and `overwrite` is False.
    """
    output_dir = Path(output_dir).absolute()
    check_exportable(model, processor, allow_untrained_safety)
    evaluation, evaluation_source = load_evaluation(evaluation)
    check_evaluation_matches(model.config, evaluation)
    calibration, _ = load_calibration(calibration)
    if calibration is not None:
        check_calibration_applied(model.config, default_threshold(model), calibration)
    training = check_training(training)
    card_metadata(base_model, license, is_demo=False)  # validates the metadata before any heavy work
    check_replaceable(output_dir, EXPORT_COMMAND, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as output_dir, so the final rename is atomic. The payload sits one level down: a crash that
    # kills the process before cleanup leaves a hidden folder whose top level is no model folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    payload = staging / "export"
    try:
        write_export_folder(
            model, processor, payload, evaluation=evaluation, evaluation_source=evaluation_source, training=training,
            base_model=base_model, license=license, repo_id=repo_id,
            model_name=repo_id.split("/")[-1] if repo_id else output_dir.name,
            max_shard_size=max_shard_size, calibration=calibration,
        )
        verify_export_folder(payload)
        publish_folder(payload, output_dir, overwrite)
    finally:
        _remove_tree(staging)
    logger.info("Exported SafeLlava to %s", output_dir)
    return output_dir


# -- checks before anything is written --------------------------------------------------------------------------


def check_exportable(model, processor, allow_untrained_safety: bool = False):
    """Refuses what must not reach the Hub: not a SafeLlava, unmerged LoRA, untrained safety modules, a processor
    that does not fit the model, or policy texts that are missing or tokenized with another tokenizer."""
    config = getattr(model, "config", None)
    try:
        base_for_model_type(getattr(config, "model_type", None))
    except ValueError as error:
        raise ValueError(f"export_for_hub takes a SafeLlava model, got {type(model).__name__}: {error}") from None
    if hasattr(model, "peft_config") or any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError(
            "This model carries LoRA/PEFT layers; merge them first (peft_model.merge_and_unload()) so that the export "
            "is a plain SafeLlava checkpoint that loads without peft."
        )
    if not config.safety_modules_trained:
        if not allow_untrained_safety:
            raise ValueError(
                "The safety modules of this model are untrained (config.safety_modules_trained is False): its safety "
                "verdicts would be random. Train stage 1 first, or pass allow_untrained_safety=True to export a "
                "debugging checkpoint whose card says so."
            )
        logger.warning(
            "Exporting UNTRAINED safety modules (allow_untrained_safety=True): the model card marks this checkpoint "
            "as giving no protection."
        )
    check_processor_fits(config, processor)
    SafetyPolicy.from_config(config).check_tokenized_by(processor)


def check_processor_fits(config, processor):
    """The processor must expand `<image>` for this model's LLM safety tokens and carry a chat template."""
    processor_tokens = getattr(processor, "num_llm_safety_tokens", None)
    if processor_tokens != config.num_llm_safety_tokens:
        raise ValueError(
            f"The processor expands each image for {processor_tokens!r} LLM safety tokens, the model has "
            f"{config.num_llm_safety_tokens}; export the SafeLlavaProcessor built for this model."
        )
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("The processor has no chat template; SafeLlava places safe hints with it, so it must ship.")


def load_evaluation(evaluation) -> tuple[dict | None, str | None]:
    """`(metrics dict, where it came from)` from None, a dict, or the path of an evaluate run's metrics.json."""
    if evaluation is None:
        return None, None
    if isinstance(evaluation, dict):
        return copy.deepcopy(evaluation), None
    if isinstance(evaluation, (str, os.PathLike)):
        path = Path(evaluation)
        if not path.is_file():
            raise ValueError(f"evaluation={str(evaluation)!r} is not a file; pass a metrics.json path, a dict or None.")
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} holds a {type(loaded).__name__}; an evaluation JSON must be an object.")
        return loaded, path.name
    raise ValueError(f"evaluation must be None, a dict or a path to metrics.json, got {type(evaluation).__name__}.")


def check_evaluation_matches(config, evaluation: dict | None):
    """
    An evaluation that describes its model (`evaluation["model"]`, as `modeling_safe_llava.tools.evaluation` writes it)
    must describe this one: same level and type names, and not untrained safety modules when these are trained.
    Otherwise its numbers would be printed on a card they do not belong to.
    """
    described = (evaluation or {}).get("model")
    if not isinstance(described, dict):
        return
    for key, expected in (("level_labels", config.safety_level_labels), ("type_labels", config.safety_type_labels)):
        if key in described and list(described[key]) != list(expected):
            raise ValueError(
                f"The evaluation was run on a model whose {key} are {described[key]!r}; this model has "
                f"{list(expected)!r}. Evaluate this model and export with that metrics.json."
            )
    if described.get("safety_modules_trained") is False and config.safety_modules_trained:
        raise ValueError(
            "The evaluation was run on untrained safety modules (model.safety_modules_trained is false in the "
            "evaluation JSON) but this model's are trained: its numbers do not describe this checkpoint. Evaluate "
            "this model and export with that metrics.json."
        )


def check_training(training: dict | None) -> dict | None:
    """Validates the training description (see `model_card.training_context`) and that it is JSON-serializable."""
    training_context(training)
    if training is None:
        return None
    try:
        return json.loads(json.dumps(training))
    except (TypeError, ValueError) as error:
        raise ValueError(f"training must hold only JSON values (str, numbers, lists, dicts): {error}") from error


# -- writing ----------------------------------------------------------------------------------------------------


def write_export_folder(
    model,
    processor,
    folder: Path,
    *,
    evaluation: dict | None,
    evaluation_source: str | None,
    training: dict | None,
    base_model: str,
    license: str,
    repo_id: str | None,
    model_name: str,
    max_shard_size,
    calibration: dict | None = None,
):
    """Writes every file of the export into `folder` (no atomicity here: `export_for_hub` stages it)."""
    folder.mkdir(parents=True)
    logger.info("Writing weights (safetensors) and remote code")
    model.save_pretrained(folder, max_shard_size=max_shard_size)  # transformers 5 writes safetensors only
    logger.info("Writing the processor")
    processor.save_pretrained(folder)
    generation_config = generation_config_with_threshold(model.generation_config, model.config.safety_threshold)
    generation_config.save_pretrained(folder)
    if evaluation is not None:
        (folder / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    if training is not None:
        (folder / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
    if calibration is not None:
        (folder / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
    logger.info("Writing the model card")
    card = render_model_card(
        model.config,
        evaluation,
        training,
        facts=model_facts(model),
        threshold=generation_config.safety_threshold,
        base_model=base_model,
        license=license,
        model_name=model_name,
        repo_id=repo_id,
        evaluation_source=evaluation_source,
        evaluation_copied=evaluation is not None,
        calibration=calibration,
    )
    (folder / "README.md").write_text(card)
    pin_auto_map(folder)
    write_custom_pipeline(folder)
    write_marker(folder, EXPORT_COMMAND)


def pin_auto_map(folder: Path):
    """
    Rewrites the `auto_map` of `config.json` and of the processor's JSON files with SafeLlava's own entries, whatever
    the loaded config said: an `auto_map` inherited from a downloaded checkpoint (e.g. `"attacker/repo--evil.Evil"`)
    must never send `trust_remote_code` users of this export to other code.
    """
    config_map, processor_map = _folder_base(folder).auto_maps()
    for name, auto_map in ((CONFIG_FILE, config_map), *((name, processor_map) for name in PROCESSOR_FILES)):
        path = folder / name
        if not path.is_file():
            continue
        values = json.loads(path.read_text())
        if values.get("auto_map") == auto_map or (name != CONFIG_FILE and "auto_map" not in values):
            continue
        logger.warning("Export: replacing the auto_map %s of %s with SafeLlava's own.", values.get("auto_map"), name)
        values["auto_map"] = auto_map
        path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def write_custom_pipeline(folder: Path):
    """
    Makes `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` pick SafeLlava's pipeline (the
    text plus a `safety` entry): copies `pipeline_safe_llava.py` into `folder` and pins `custom_pipelines` of its
    `config.json` to SafeLlava's own (`pipeline_safe_llava.CUSTOM_PIPELINES`), whatever a loaded config said.
    """
    shutil.copyfile(pipeline_safe_llava.__file__, folder / PIPELINE_FILE)
    path = folder / CONFIG_FILE
    values = json.loads(path.read_text())
    if values.get("custom_pipelines") == pipeline_safe_llava.CUSTOM_PIPELINES:
        return
    if values.get("custom_pipelines"):
        logger.warning(
            "Export: replacing the custom_pipelines %s of config.json with SafeLlava's own.", values["custom_pipelines"]
        )
    values["custom_pipelines"] = copy.deepcopy(pipeline_safe_llava.CUSTOM_PIPELINES)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def check_custom_pipelines(folder: Path, custom_pipelines) -> None:
    """`config.json` must name SafeLlava's pipeline for `image-text-to-text`, and every `custom_pipelines` entry a
    class in one of the export's audited remote-code files (as `check_auto_map` for `auto_map`)."""
    if not isinstance(custom_pipelines, dict) or "image-text-to-text" not in custom_pipelines:
        raise ValueError(
            f"{folder}/config.json has no custom_pipelines entry for 'image-text-to-text', so pipeline(...) would not "
            "return the safety verdict; export with export_for_hub (it writes the entry)."
        )
    for task, info in custom_pipelines.items():
        reference = info.get("impl") if isinstance(info, dict) else None
        if not _is_local_class_reference(folder, reference):
            raise ValueError(
                f"{folder}/config.json: custom_pipelines[{task!r}] = {info!r} does not name a class in a file of this "
                f"folder (accepted: 'impl': 'module.Class' with module.py one of {list(REMOTE_CODE_FILES)} present)."
            )


def verify_export_folder(folder) -> Path:
    """
    Checks that `folder` is a complete SafeLlava export: the required files, safetensors weights (every shard of an
    index present) and no pickle file anywhere. Raises ValueError naming what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    files = [path for path in folder.rglob("*") if path.is_file()]
    pickles = sorted(str(path.relative_to(folder)) for path in files if path.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}; an export carries .safetensors weights only.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not missing:
        missing = [name for name in _folder_base(folder).remote_code_files() if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a complete SafeLlava export: missing {missing}.")
    _check_weights(folder)
    config = json.loads((folder / "config.json").read_text())
    if "AutoModel" not in (config.get("auto_map") or {}):
        raise ValueError(f"{folder}/config.json is not a SafeLlava config with auto_map.")
    check_custom_pipelines(folder, config.get("custom_pipelines"))
    for name in (CONFIG_FILE, *PROCESSOR_FILES):
        if (folder / name).is_file():
            check_auto_map(folder, name, json.loads((folder / name).read_text()).get("auto_map"))
    if json.loads((folder / "generation_config.json").read_text()).get("safety_threshold") is None:
        raise ValueError(f"{folder}/generation_config.json has no safety_threshold.")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    if not (folder / "chat_template.jinja").is_file() and not processor_config.get("chat_template"):
        raise ValueError(f"{folder} has no chat template.")
    return folder


def check_auto_map(folder: Path, file_name: str, auto_map) -> None:
    """
    Every `auto_map` entry of `file_name` must name a class in one of the export's audited remote-code files, present
    in `folder` (`"module.Class"` with `module.py` one of `REMOTE_CODE_FILES`): no `"org/repo--module.Class"`
    reference to another repository's code, no path, no other file.
    """
    if auto_map is None:
        return
    if not isinstance(auto_map, dict):
        raise ValueError(f"{folder}/{file_name}: auto_map must be an object, got {type(auto_map).__name__}.")
    for auto_class, references in auto_map.items():
        for reference in references if isinstance(references, list) else [references]:
            if reference is None and isinstance(references, list):
                continue  # a tokenizer's [slow, fast] pair may leave one empty
            if not _is_local_class_reference(folder, reference):
                raise ValueError(
                    f"{folder}/{file_name}: auto_map[{auto_class!r}] = {reference!r} does not name a class in a file "
                    f"of this folder (accepted: 'module.Class' with module.py one of {list(REMOTE_CODE_FILES)} present; "
                    "never 'org/repo--module.Class', which would run another repository's code)."
                )


def _folder_base(folder: Path):
    """The base of the SafeLlava checkpoint in `folder` (from its config.json's `model_type`)."""
    model_type = json.loads((folder / CONFIG_FILE).read_text()).get("model_type")
    try:
        return base_for_model_type(model_type)
    except ValueError as error:
        raise ValueError(f"{folder}/config.json is not a SafeLlava config: {error}") from None


def _is_local_class_reference(folder: Path, reference) -> bool:
    if not isinstance(reference, str) or "--" in reference or reference.count(".") != 1:
        return False
    module, class_name = reference.split(".")
    if f"{module}.py" not in REMOTE_CODE_FILES or not class_name.isidentifier():
        return False
    return (folder / f"{module}.py").is_file()


def _check_weights(folder: Path):
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder} has no .safetensors weights.")
    for index_file in folder.glob("*.safetensors.index.json"):
        shards = set(json.loads(index_file.read_text())["weight_map"].values())
        absent = sorted(shard for shard in shards if not (folder / shard).is_file())
        if absent:
            raise ValueError(f"{index_file.name} lists shards that are missing: {absent}.")


# -- publishing -------------------------------------------------------------------------------------------------


def publish_folder(payload: Path, output_dir: Path, overwrite: bool):
    """
    Moves the complete `payload` to `output_dir` by renames on one filesystem. An existing export (only with
    `overwrite`) is renamed away first, then deleted once the new one is in place; if the second rename fails, it
    is put back.
    """
    if output_dir.exists() and not any(output_dir.iterdir()):
        output_dir.rmdir()  # an empty placeholder folder
    if not output_dir.exists():
        _move(payload, output_dir)
        return
    if not overwrite:  # appeared while exporting
        raise FileExistsError(f"{output_dir} appeared during the export; pass overwrite=True to replace it.")
    check_replaceable(output_dir, EXPORT_COMMAND, overwrite)  # it may have changed while exporting
    previous = output_dir.parent / f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
    _move(output_dir, previous)
    try:
        _move(payload, output_dir)
    except BaseException:
        _move(previous, output_dir)
        raise
    _remove_tree(previous)


def _move(source: Path, destination: Path):
    os.rename(source, destination)


def _remove_tree(path: Path):
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as error:
        logger.warning("Could not remove %s (%s); delete it by hand.", path, error)


# -- command line -----------------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`safe-llava export` options."""
    parser.add_argument("--model", required=True, help="Folder of a trained SafeLlava checkpoint (save_pretrained).")
    parser.add_argument("--processor", help="Folder of its processor (default: --model).")
    parser.add_argument("--output", required=True, help="Export folder to create.")
    parser.add_argument("--evaluation", help="metrics.json of an evaluate run, written into the card.")
    parser.add_argument(
        "--calibration", help="calibration.json of a calibrate run (export its <output>/model), written into the card."
    )
    parser.add_argument("--training", help="JSON file describing both training stages (data, recipe, steps).")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="base_model in the card metadata.")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="license in the card metadata.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a previous export at --output.")
    parser.add_argument(
        "--allow-untrained-safety", action="store_true", help="Export untrained safety modules (debugging only)."
    )
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="Largest weight file.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the export to this Hub repository.")
    add_hub_options(parser)
    return parser


def run_export(args: argparse.Namespace) -> Path:
    """Loads the checkpoint, exports it, and pushes it when `--push-to-hub` is given. Returns the export folder."""
    from .loading import check_model_folder

    check_model_folder(args.model)
    check_model_folder(args.processor or args.model, "--processor")
    model = load_safe_model(args.model)
    processor = load_safe_processor(args.processor or args.model, model.config.model_type)
    training = json.loads(Path(args.training).read_text()) if args.training else None
    folder = export_for_hub(
        model,
        processor,
        args.output,
        evaluation=args.evaluation,
        training=training,
        base_model=args.base_model,
        license=args.license,
        overwrite=args.overwrite,
        allow_untrained_safety=args.allow_untrained_safety,
        repo_id=args.push_to_hub,
        max_shard_size=args.max_shard_size,
        calibration=args.calibration,
    )
    print(f"Exported to {folder}")
    if args.push_to_hub:
        commit = push_to_hub(
            folder,
            args.push_to_hub,
            private=not args.public,
            revision=args.revision,
            commit_message=args.commit_message,
        )
        print(f"Pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    return folder


# -- upload to the Hub ------------------------------------------------------------------------------------------


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
        ignore_patterns=[MARKER_FILE],  # local bookkeeping (see fileio/folders.py), not part of the model repository
    )


def add_hub_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options shared by `safe-llava push` and `safe-llava export --push-to-hub`."""
    parser.add_argument("--public", action="store_true", help="Create the repository public (default: private).")
    parser.add_argument("--revision", help="Branch to push to (default: main).")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="Commit message.")
    return parser


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`safe-llava push` options. The token comes from `HF_TOKEN` or `hf auth login`, never from the command line."""
    parser.add_argument("--folder", required=True, help="Export folder written by `safe-llava export`.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. org/safe-llava-7b.")
    return add_hub_options(parser)


def run_push(args: argparse.Namespace):
    commit = push_to_hub(
        args.folder, args.repo_id, private=not args.public, revision=args.revision, commit_message=args.commit_message
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit


__all__ = [
    "export_for_hub",
    "verify_export_folder",
    "write_custom_pipeline",
    "check_exportable",
    "push_to_hub",
    "add_export_arguments",
    "run_export",
    "add_push_arguments",
    "run_push",
]
