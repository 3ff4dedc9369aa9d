"""Parsing and validation of request bodies: OpenAI's chat and moderation schemas, plus SafeLlava's
`safety_threshold` / `safety_actions`, into the backend's `ChatRequest` / `ModerationInput`.

Status codes: a field of the wrong JSON type or a missing required field is 422 (`code: "invalid_type"` /
`"missing_field"`); a value of the right type that is not accepted (out of range, unknown risky type, bad image) is
400; an unknown model is 404. Each error names the field (`param`) and what is accepted. Image decoding blocks: call
`parse_chat_request` / `parse_moderation_request` off the event loop.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..checks_safe_llava import is_integer, is_number
from ..policy_safe_llava import check_action_list, check_probability
from .backend import ChatRequest, ModerationInput, ServingError
from .images import ImagePolicy, decode_image_url


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change the output and that this server does not implement: refused rather than ignored.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "prediction")
SAFETY_FIELDS = ("safety_threshold", "safety_actions")


@dataclass
class RequestLimits:
    """
    What one request may ask for.

    Attributes:
        max_new_tokens (`int`): the largest `max_tokens` / `max_completion_tokens`.
        default_max_new_tokens (`int`): used when the request names none.
        max_images (`int`): images per request (chat) or per moderation input.
        max_n (`int`): the largest `n`.
        max_inputs (`int`): moderation inputs per request.
        images (`ImagePolicy`): which image forms are accepted, and their caps.
    """

    max_new_tokens: int = 2048
    default_max_new_tokens: int = 256
    max_images: int = 8
    max_n: int = 8
    max_inputs: int = 32
    max_stop: int = 4
    images: ImagePolicy = field(default_factory=ImagePolicy)


def invalid(message: str, param: str | None, status: int = 400, code: str | None = "invalid_value") -> ServingError:
    return ServingError(message, status=status, param=param, code=code)


def wrong_type(param: str, expected: str, value) -> ServingError:
    return invalid(f"{param} must be {expected}, got {_json_type(value)}.", param, status=422, code="invalid_type")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def require_object(body, what: str = "The request body") -> dict:
    if not isinstance(body, dict):
        raise invalid(f"{what} must be a JSON object, got {_json_type(body)}.", None, status=422, code="invalid_type")
    return body


def check_text(text: str, param: str) -> str:
    """`text`, unless it holds a lone surrogate (valid JSON, but not a Unicode string a tokenizer can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} holds an unpaired surrogate (\\ud800-\\udfff); send valid Unicode text.", param) from None
    return text


def check_model(body: dict, model_id: str) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("model is required: the name /v1/models lists.", "model", status=422, code="missing_field")
    if not isinstance(model, str):
        raise wrong_type("model", "a string", model)
    if model != model_id:
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise invalid(f"The model {shown!r} does not exist; this server serves {model_id!r}.", "model", status=404, code="model_not_found")
    return model


# ------------------------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------------------------


def _number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise wrong_type(name, "a number", value)
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(f"{name} must be in {bound}, got {value}.", name)
    return float(value)


def _integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if not is_integer(value):
        raise wrong_type(name, "an integer", value)
    if not low <= value <= high:
        raise invalid(f"{name} must be an integer in [{low}, {high}], got {value}.", name)
    return value


def _max_new_tokens(body, limits: RequestLimits) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _integer(body, name, None, 1, limits.max_new_tokens)
        if value is not None:
            return value
    return min(limits.default_max_new_tokens, limits.max_new_tokens)


def _stop(body, limits: RequestLimits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise wrong_type("stop", "a string or an array of strings", stop)
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise invalid(f"stop takes at most {limits.max_stop} non-empty strings.", "stop")
    return [check_text(s, "stop") for s in stops]


# ------------------------------------------------------------------------------------------------------------------
# SafeLlava's fields
# ------------------------------------------------------------------------------------------------------------------


def parse_safety_threshold(value, risky_types: list[str]):
    """`None`, a number in [0, 1], or `{risky type name: number}` (types left out keep their default), as in
    `generate`."""
    if value is None:
        return None
    accepted = f"a number in [0, 1], or an object {{risky type: number}} with types from {risky_types}"
    if not (is_number(value) or isinstance(value, dict)):
        raise wrong_type("safety_threshold", accepted, value)
    try:
        if isinstance(value, dict):
            unknown = [k for k in value if k not in risky_types]
            if unknown:
                raise ValueError(f"unknown risky type(s) {unknown}")
            return {name: check_probability("safety_threshold", v) for name, v in value.items()}
        return check_probability("safety_threshold", value)
    except ValueError as error:
        raise invalid(f"safety_threshold: {error}; accepted: {accepted}.", "safety_threshold") from None


def parse_safety_actions(value, risky_types: list[str]):
    """`None`, or `{risky type: action or list of 4 actions}` (actions: allow, hint, refuse), as in `generate`."""
    if value is None:
        return None
    accepted = f"an object {{risky type: action or list of 4 actions}}, types from {risky_types}, actions allow/hint/refuse"
    if not isinstance(value, dict):
        raise wrong_type("safety_actions", accepted, value)
    try:
        unknown = [k for k in value if k not in risky_types]
        if unknown:
            raise ValueError(f"unknown risky type(s) {unknown}")
        for name, levels in value.items():
            check_action_list(name, levels)
    except (ValueError, TypeError) as error:
        raise invalid(f"safety_actions: {error}; accepted: {accepted}.", "safety_actions") from None
    return value


# ------------------------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------------------------


def parse_messages(messages, limits: RequestLimits) -> tuple[list[dict], list]:
    """OpenAI messages -> (the processor's chat format, the decoded images in order)."""
    if messages is None:
        raise invalid("messages is required: a non-empty array of {role, content}.", "messages", status=422, code="missing_field")
    if not isinstance(messages, list):
        raise wrong_type("messages", "a non-empty array of {role, content}", messages)
    if not messages:
        raise invalid("messages must not be empty.", "messages")
    image_urls, converted = [], []
    for i, message in enumerate(messages):
        converted.append(_parse_message(message, f"messages[{i}]", image_urls))
    if len(image_urls) > limits.max_images:
        raise invalid(f"Too many images: {len(image_urls)}; this server takes at most {limits.max_images} per request.", "messages", code="too_many_images")
    images = [decode_image_url(url, limits.images, param) for url, param in image_urls]
    return converted, images


def _parse_message(message, param: str, image_urls: list) -> dict:
    message = require_object(message, param)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"{param}.role must be one of {sorted(ROLES)}, got {role!r}.", f"{param}.role")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": ROLES[role], "content": [{"type": "text", "text": check_text(content, f"{param}.content")}]}
    if content is None and role == "assistant":
        return {"role": "assistant", "content": [{"type": "text", "text": ""}]}
    if not isinstance(content, list):
        raise wrong_type(f"{param}.content", "a string or an array of text / image_url parts", content)
    parts = [_parse_part(part, f"{param}.content[{j}]", role, image_urls) for j, part in enumerate(content)]
    if role == "user" and not any(part["type"] == "text" for part in parts):
        # An image without a question: an empty text part keeps the turn's usual ending, so that the prompt ends
        # with the assistant-turn marker where a safe hint goes (as for any message with text).
        parts.append({"type": "text", "text": ""})
    return {"role": ROLES[role], "content": parts}


def _parse_part(part, param: str, role: str, image_urls: list) -> dict:
    part = require_object(part, param)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise wrong_type(f"{param}.text", "a string", text)
        return {"type": "text", "text": check_text(text, f"{param}.text")}
    if kind == "image_url":
        if role != "user":
            raise invalid(f"{param}: images are accepted in user messages only.", param)
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise wrong_type(f"{param}.image_url", "an object {url: string} or a string", image_url)
        image_urls.append((url, f"{param}.image_url"))
        return {"type": "image"}
    raise invalid(f"{param}.type must be 'text' or 'image_url', got {kind!r}.", f"{param}.type")


# ------------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------------


def parse_chat_request(body, model_id: str, risky_types: list[str], limits: RequestLimits) -> ChatRequest:
    """A validated `ChatRequest` (images decoded) from a chat completions body; raises `ServingError`."""
    body = require_object(body)
    model = check_model(body, model_id)
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) not in (None, [], {}):
            raise invalid(f"{name} is not supported by this server.", name, code="unsupported_parameter")
    _check_unsupported_settings(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise wrong_type("stream_options", "an object {include_usage: boolean}", options)
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise wrong_type("stream_options.include_usage", "a boolean", include_usage)
    safety_threshold = parse_safety_threshold(body.get("safety_threshold"), risky_types)
    safety_actions = parse_safety_actions(body.get("safety_actions"), risky_types)
    seed = body.get("seed")
    if seed is not None and not is_integer(seed):
        raise wrong_type("seed", "an integer", seed)
    numbers = _chat_numbers(body, limits)
    messages, images = parse_messages(body.get("messages"), limits)
    return ChatRequest(
        model=model, messages=messages, images=images, stop=_stop(body, limits), seed=seed, **numbers,
        safety_threshold=safety_threshold, safety_actions=safety_actions, stream=stream,
        include_usage=bool(stream and include_usage), body=body, request_id=f"chatcmpl-{uuid.uuid4().hex}",
    )


def _check_unsupported_settings(body: dict):
    """Settings that would change the answer and that this server does not implement: refused, not ignored."""
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs is not supported by this server.", "logprobs", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported by this server (only 0).", name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("response_format is not supported by this server (only {\"type\": \"text\"}).", "response_format", code="unsupported_parameter")


def _chat_numbers(body, limits: RequestLimits) -> dict:
    return {
        "max_new_tokens": _max_new_tokens(body, limits),
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "n": _integer(body, "n", 1, 1, limits.max_n),
    }


def parse_moderation_request(body, model_id: str, risky_types: list[str], limits: RequestLimits) -> list[ModerationInput]:
    """The inputs of a moderations body: a string, an array of strings, or one array of text / image_url parts."""
    body = require_object(body)
    if body.get("model") is not None:
        check_model(body, model_id)
    safety_threshold = parse_safety_threshold(body.get("safety_threshold"), risky_types)
    safety_actions = parse_safety_actions(body.get("safety_actions"), risky_types)
    items = _moderation_items(body.get("input"), limits)
    return [ModerationInput(text, images, safety_threshold, safety_actions) for text, images in items]


def _moderation_items(value, limits: RequestLimits) -> list[tuple[str, list]]:
    accepted = "a string, an array of strings, or an array of text / image_url parts"
    if value is None:
        raise invalid(f"input is required: {accepted}.", "input", status=422, code="missing_field")
    if isinstance(value, str):
        return [(check_text(value, "input"), [])]
    if not isinstance(value, list) or not value:
        raise wrong_type("input", f"{accepted} (non-empty)", value)
    if all(isinstance(item, str) for item in value):
        if len(value) > limits.max_inputs:
            raise invalid(f"input takes at most {limits.max_inputs} strings.", "input")
        return [(check_text(item, f"input[{i}]"), []) for i, item in enumerate(value)]
    image_urls, texts = [], []
    for j, part in enumerate(value):
        parsed = _parse_part(part, f"input[{j}]", "user", image_urls)
        if parsed["type"] == "text":
            texts.append(parsed["text"])
    if len(image_urls) > limits.max_images:
        raise invalid(f"Too many images: {len(image_urls)}; this server takes at most {limits.max_images} per input.", "input", code="too_many_images")
    images = [decode_image_url(url, limits.images, param) for url, param in image_urls]
    return [("\n".join(texts), images)]


__all__ = ["RequestLimits", "parse_chat_request", "parse_moderation_request", "parse_safety_threshold", "parse_safety_actions"]
