"""What the tools share: prompts for images, batching processor inputs, loading a saved model, and the
command-line options every tool that loads a model takes. (Decoding images and reading record files is
`modeling_safe_llava.fileio`, below the tools, training and data.)"""

from __future__ import annotations

from pathlib import Path

USER_ROLES = ("USER", "user", "human")
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_QUESTION = "What is shown in this image?"


def first_user_question(conversations) -> str:
    """
    The text of the first user turn of a paper-schema conversation, without its `<image>` placeholder.

    Args:
        conversations (`list[dict]`): `[{"from": "USER" | "human", "value": "<image>\\n..."}, ...]`.
    """
    if not isinstance(conversations, list):
        raise ValueError(
            f"conversations must be a list of {{'from', 'value'}} turns, got {type(conversations).__name__}."
        )
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in USER_ROLES:
            value = turn.get("value")
            if not isinstance(value, str):
                raise ValueError(f"A user turn's value must be a string, got {value!r}.")
            if value.count(IMAGE_PLACEHOLDER) > 1:
                raise ValueError(f"Only one {IMAGE_PLACEHOLDER} per row is supported, got {value!r}.")
            return value.replace(IMAGE_PLACEHOLDER, "").strip()
    raise ValueError(f"No user turn (from one of {USER_ROLES}) in conversations {conversations!r}.")


def image_prompt(processor, question: str) -> str:
    """The chat-template prompt for one image and `question`, ending where the assistant's answer starts."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def processor_batch(processor, model, images: list, prompts: list[str]):
    """The processor's tensors for a batch (left padding, as generation needs), on the model's device and dtype."""
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return inputs.to(device=model.device, dtype=model.dtype)


def load_model_and_processor(model_dir, device: str | None = None):
    """
    A saved SafeLlava of any base and its processor, in eval mode on `device` (default: CUDA when available, else
    CPU). The classes come from the registry of bases (`bases.BASES`), never from the folder's `auto_map`.

    Args:
        model_dir (`str` or `os.PathLike`): A folder written by `save_pretrained` (model and processor).
    """
    import torch

    from ..bases import load_safe_model, load_safe_processor

    check_model_folder(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_safe_model(model_dir).to(device).eval()
    processor = load_safe_processor(model_dir, model.config.model_type)
    return model, processor


def check_model_folder(model_dir, option: str = "--model"):
    """Raises a ValueError unless `model_dir` is a folder (a missing local path must not be mistaken for a Hub id)."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"{option} must be a folder written by save_pretrained, got {str(model_dir)!r}.")


def add_model_cli_arguments(parser):
    """Options every tool that loads a model shares: `--model`, `--device`, `--batch-size`, thresholds."""
    parser.add_argument("--model", required=True, help="Folder of a saved SafeLlava (model and processor).")
    parser.add_argument("--output", required=True, help="Folder for the reports (created if missing).")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available).")
    parser.add_argument(
        "--safety-threshold",
        type=float,
        default=None,
        help="Flag a row iff 1 - P(level 0) exceeds this (default: the threshold saved with the model).",
    )
    parser.add_argument(
        "--allow-untrained-safety",
        action="store_true",
        help="Run even though config.safety_modules_trained is False (tests and debugging only: verdicts are random).",
    )
    return parser


def model_description(model) -> dict:
    """What reports say about the model that produced them (a local folder as an absolute path, so that
    `out/model` and `./out/model` name the same model)."""
    name = str(model.config.name_or_path or "")
    if name and Path(name).is_dir():
        name = str(Path(name).resolve())
    return {
        "name_or_path": name,
        "safety_modules_trained": bool(model.config.safety_modules_trained),
        "level_labels": list(model.config.safety_level_labels),
        "type_labels": list(model.config.safety_type_labels),
    }


def resolved_thresholds(model, safety_threshold) -> dict:
    """`{risky type name: threshold}` that a `safety_threshold` argument means for `model`."""
    rule = model.safety_policy.for_call(safety_threshold, generation_config=model.generation_config)
    values = rule.thresholds.tolist()
    return {name: round(float(value), 6) for name, value in zip(model.config.risky_type_labels, values)}


def describe_thresholds(thresholds: dict) -> str:
    """`"0.5"` when every category has the same threshold, else `"Politics 0.3, Privacy 0.5, ..."`."""
    distinct = set(thresholds.values())
    if len(distinct) == 1:
        return f"{distinct.pop():g}"
    return ", ".join(f"{name} {value:g}" for name, value in thresholds.items())


__all__ = [
    "first_user_question",
    "image_prompt",
    "processor_batch",
    "load_model_and_processor",
    "check_model_folder",
    "add_model_cli_arguments",
    "model_description",
    "resolved_thresholds",
    "describe_thresholds",
]
