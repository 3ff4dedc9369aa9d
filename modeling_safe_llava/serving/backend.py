"""The contract between the HTTP layer (`serving/app.py`) and what answers requests: a `ServingBackend`.

Two backends implement it, and the HTTP layer is the same for both:

- `serving/local.py` (`LocalBackend`): the whole SafeLlava in this process; chat runs `model.generate(...,
  safety_threshold=..., safety_actions=..., return_dict_in_generate=True)`, moderation runs `model.assess_safety`.
- `serving/gate.py` (gate mode, `--upstream`): a head-only SafeLlava (`num_llm_safety_tokens=0`) keeps only the vision
  tower and the safety module; generation runs on an OpenAI-compatible upstream serving the stock LLaVA weights.

The HTTP layer parses and validates every request (`serving/schemas.py`: messages, images, parameters, limits,
`safety_threshold` / `safety_actions` checked against the model's risky types) and hands the backend a `ChatRequest`
or a list of `ModerationInput`. It turns results into OpenAI's JSON and SSE, and `ServingError` into OpenAI's error
schema. A backend must keep these promises, whichever engine generates:

1. **A verdict on every answer.** `ChatCompletionResult.safety` and each moderation `Verdict.safety` is the pipeline's
   entry (`pipeline_safe_llava.safety_entries`): `{"judged": True, "risk", "flagged", "threshold", "level",
   "level_name", "category", "category_name", "action", "level_probs", "type_probs"}`, or `{"judged": False,
   "reason": NOT_JUDGED_*}` when nothing was judged (no image, or safety off with `safety_threshold=1.0`).
   With `n > 1` every choice shares that one verdict (one image set).
2. **Verdict first when streaming.** `stream()` yields exactly one `StreamEvent(kind="verdict")` before any
   `"delta"`; then deltas; then one `"finish"` per choice; then one `"usage"` event when `request.include_usage`.
3. **Refusals.** A refused request (`action == "refuse"`) answers `generate`'s configured refusal text for the
   verdict's category, with `finish_reason == "content_filter"` for every choice; a gate answers it itself and never
   contacts the upstream. `usage.completion_tokens` counts the refusal's tokens.
4. **Hints.** A `hint` inserts the policy's safe-hint text where `generate` inserts it: at the end of the last user
   turn, just before the assistant-turn marker (`generation_safe_llava.insert_hint`). A gate appends the hint text to
   the last user message it forwards. An `allow` is forwarded or generated unchanged.
5. **Greedy equals in-process.** With `temperature == 0` the text equals what in-process `model.generate` gives for
   the same folder and inputs (`do_sample=False`).
6. **Errors.** A backend raises `ServingError` (or a subclass) for anything the client should see; any other
   exception becomes a 500 with a generic message, its traceback only in the server's log. One request's failure
   must never fail another request batched with it.
7. **Draining.** `close()` finishes the work already accepted (queued and running), then releases resources; after
   `close()` starts, new calls raise `ServiceUnavailable`.
8. **A client that leaves stops its work.** The HTTP layer cancels the awaiting call (`complete`, `moderate`, or the
   stream's first event) when the client disconnects, and sets `ChatRequest.client_gone`: a queued request is dropped
   before it runs, a running one stops its rows at the next decoding step (the other rows of its batch go on), and a
   gate closes its upstream request. Backends count it with `record_cancelled(kind, stage)`.

Backends may batch: requests that arrive together with compatible settings run as one left-padded batch (see
`serving/batching.py`: `MicroBatcher`, shared by chat and moderation), each row keeping its own verdict and action.
They report batches through `self.record_batch(kind, size)` and queue depth through `queue_depth()`; the app sets
`self.metrics` before the first request.

Building a backend: `safe-llava serve` turns its flags into one `BackendSettings` and calls, in a worker thread
while `/health` answers `loading`, either `serving.local.build_local_backend(settings)` or (with `--upstream`)
`serving.gate.build_gate_backend(settings)`. A builder raises `ValueError` (or `OSError`) with a one-line message for
a model it cannot serve, e.g. gate mode on a model whose `num_llm_safety_tokens` is not 0; the command then prints
that line and exits with code 2.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal


if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

    from .metrics import ServingMetrics


FinishReason = Literal["stop", "length", "content_filter"]
StreamEventKind = Literal["verdict", "delta", "finish", "usage"]


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class BackendSettings:
    """
    What `safe-llava serve`'s flags say about the backend to build.

    Attributes:
        model (`str`): `--model`, a folder written by `save_pretrained` / `safe-llava export`, or a Hub id.
        served_model_name (`str`): `--served-model-name` (default: the folder's name).
        device (`str`, *optional*): `--device`, a torch device (default: CUDA when available, else CPU).
        dtype (`str`, *optional*): `--dtype`: `"float32"`, `"bfloat16"`, `"float16"` or `"auto"` (the checkpoint's).
        max_batch_size (`int`): `--max-batch-size`, rows per model call.
        batch_wait_ms (`float`): `--batch-wait-ms`, how long the first request of a batch waits for company while
            more requests are on their way (a lone request on an idle server never waits).
        max_queue (`int`): `--max-queue`, requests waiting at most; past it `Overloaded` (429).
        stream_interval_ms (`float`): `--stream-interval-ms`, in-process streaming: how often the decoding steps
            that come faster than this reach the event loop (each still its own chunk); a stream's verdict, first
            text and end go at once, and steps slower than this (any large model) each at once. 0: every step at once.
        max_new_tokens_limit (`int`): the largest `max_tokens` a request may ask for.
        trust_remote_code (`bool`): load a Hub id's remote code (a local folder uses this package's classes).
        upstream (`str`, *optional*): `--upstream`, the OpenAI-compatible base URL (gate mode), e.g.
            `http://127.0.0.1:8000/v1`.
        upstream_model (`str`, *optional*): `--upstream-model`, the model name the upstream serves.
        upstream_api_key (`str`, *optional*): the key read from the variable `--upstream-api-key-env` names.
        upstream_timeout_s (`float`): seconds to wait for the upstream.
    """

    model: str
    served_model_name: str
    device: str | None = None
    dtype: str | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    stream_interval_ms: float = 20.0
    max_new_tokens_limit: int = 2048
    trust_remote_code: bool = False
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    upstream_timeout_s: float = 600.0


# ------------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """
    One `POST /v1/chat/completions`, parsed and validated.

    Attributes:
        model (`str`): the model the client named (already checked against `ServingBackend.model_id`).
        messages (`list[dict]`): the conversation in the processor's chat format, ready for
            `processor.apply_chat_template(messages, add_generation_prompt=True)`: `{"role": "system" | "user" |
            "assistant", "content": [{"type": "text", "text": str} | {"type": "image"}, ...]}`.
        images (`list[PIL.Image.Image]`): the decoded RGB images (EXIF orientation applied), one per
            `{"type": "image"}` part, in order of appearance.
        max_new_tokens (`int`): `max_completion_tokens` or `max_tokens` (checked against the server's limit).
        temperature (`float`): 0 means greedy (`do_sample=False`); otherwise sampling at this temperature.
        top_p (`float`): nucleus sampling mass, in (0, 1].
        stop (`list[str]`): stop sequences; the returned text ends before the first one (OpenAI's convention).
        seed (`int`, *optional*): sampling seed; a seeded request gives the same answer each time.
        n (`int`): number of choices (all share one verdict).
        safety_threshold (`float` or `dict[str, float]`, *optional*): as `generate`'s (None: the model's default).
        safety_actions (`dict[str, str | list[str]]`, *optional*): as `generate`'s (None: the configured actions).
        stream (`bool`), include_usage (`bool`): SSE response; `stream_options.include_usage`.
        body (`dict`): the JSON body as the client sent it (a gate forwards it, less the SafeLlava-only fields).
        request_id (`str`): the response id (`chatcmpl-...`), also used in logs.
        client_gone (`threading.Event`): set by the HTTP layer when the client disconnects before its answer is done;
            a backend stops the request's work at its next step (read from the model's thread too).
    """

    model: str
    messages: list[dict]
    images: list[Image.Image]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    safety_threshold: float | dict | None = None
    safety_actions: dict | None = None
    stream: bool = False
    include_usage: bool = False
    body: dict = field(default_factory=dict)
    request_id: str = ""
    client_gone: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class ModerationInput:
    """
    One item of `POST /v1/moderations` (a string, or one list of text / image_url parts).

    Attributes:
        text (`str`): the text parts joined with newlines ("" when there is none).
        images (`list[PIL.Image.Image]`): the decoded images, in order. Without an image nothing is judged.
        safety_threshold, safety_actions: as in `ChatRequest`.
    """

    text: str
    images: list[Image.Image]
    safety_threshold: float | dict | None = None
    safety_actions: dict | None = None

    def messages(self) -> list[dict]:
        """The item as one user turn in the processor's chat format (images first, then the text)."""
        content = [{"type": "image"} for _ in self.images]
        if self.text:
            content.append({"type": "text", "text": self.text})
        return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class Verdict:
    """
    The safety verdict of one request or moderation item.

    Attributes:
        safety (`dict`): the pipeline's entry (see the module docstring, promise 1).
    """

    safety: dict

    @property
    def judged(self) -> bool:
        return bool(self.safety.get("judged"))

    @property
    def flagged(self) -> bool:
        return self.judged and bool(self.safety["flagged"])

    @property
    def action(self) -> str:
        """`"allow"`, `"hint"` or `"refuse"`; `"allow"` when nothing was judged."""
        return self.safety["action"] if self.judged else "allow"

    @property
    def category_name(self) -> str | None:
        return self.safety["category_name"] if self.judged else None


@dataclass
class Choice:
    """One generated answer: its text (stop sequence excluded) and why it ended."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int = 0


@dataclass
class ChatCompletionResult:
    """What `ServingBackend.complete` returns: the choices (`n` of them), token counts and the one verdict."""

    choices: list[Choice]
    usage: Usage
    safety: dict


@dataclass
class StreamEvent:
    """
    One event of `ServingBackend.stream`.

    - `kind="verdict"`: `safety` is set; always the first event.
    - `kind="delta"`: `index` (the choice) and `text` (new text, never empty).
    - `kind="finish"`: `index` and `finish_reason`.
    - `kind="usage"`: `usage`; last, only when the request asked for `include_usage`.
    """

    kind: StreamEventKind
    index: int = 0
    text: str = ""
    finish_reason: FinishReason | None = None
    safety: dict | None = None
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


class ServingError(Exception):
    """
    An error the client sees, as OpenAI's `{"error": {"message", "type", "param", "code"}}` with `status`.

    Args:
        message (`str`): what is wrong and what is accepted; never a traceback, image bytes or prompt text.
        status (`int`): the HTTP status (400, 401, 404, 413, 422, 429, 502, 503, ...).
        type (`str`): OpenAI's error type, e.g. `"invalid_request_error"`.
        param (`str`, *optional*): the request field at fault, e.g. `"messages[0].content[1].image_url"`.
        code (`str`, *optional*): a short machine-readable code, e.g. `"model_not_found"`.
        retry_after (`int`, *optional*): seconds, sent as the `Retry-After` header (429, 503).
    """

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, status=None, type=None, param=None, code=None, retry_after=None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type or self.type
        self.param = param
        self.code = code or self.code
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Overloaded(ServingError):
    """The queue is full (`--max-queue`): 429 with `Retry-After`."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message="The server's queue is full; retry later.", retry_after=1, **kwargs):
        super().__init__(message, retry_after=retry_after, **kwargs)


class ServiceUnavailable(ServingError):
    """Not ready (loading) or shutting down: 503 with `Retry-After`."""

    status = 503
    type = "service_unavailable"
    code = "unavailable"

    def __init__(self, message="The server is not ready or is shutting down; retry later.", retry_after=5, **kwargs):
        super().__init__(message, retry_after=retry_after, **kwargs)


class UpstreamError(ServingError):
    """Gate mode: the upstream engine failed or could not be reached (502)."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


# ------------------------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------------------------


class Arrivals:
    """Counts requests on their way to a batcher; `count()` is what `MicroBatcher(company=...)` asks.

    `with arrivals.admitted(): ...` spans a request's handler. The request counts as arriving from its first byte
    until its first item is queued (`MicroBatcher.submit` calls `landed()`, which finds the request through a context
    variable that the tasks it starts inherit), or until the handler ends, whichever comes first. Used from the event
    loop only.
    """

    def __init__(self):
        self._count = 0

    def count(self) -> int:
        return self._count

    @contextlib.contextmanager
    def admitted(self):
        self._count += 1
        arrival = _Arrival(self)
        token = _CURRENT_ARRIVAL.set(arrival)
        try:
            yield
        finally:
            _CURRENT_ARRIVAL.reset(token)
            arrival.land()

    @staticmethod
    def landed():
        """The current request (if any) is queued: it no longer counts as arriving."""
        arrival = _CURRENT_ARRIVAL.get()
        if arrival is not None:
            arrival.land()


class _Arrival:
    def __init__(self, arrivals: Arrivals):
        self.arrivals, self.done = arrivals, False

    def land(self):
        if not self.done:
            self.done = True
            self.arrivals._count -= 1


_CURRENT_ARRIVAL: contextvars.ContextVar[_Arrival | None] = contextvars.ContextVar("safe_llava_arrival", default=None)


class ServingBackend(abc.ABC):
    """
    What answers chat and moderation requests (see the module docstring for the promises it keeps).

    Attributes:
        model_id (`str`): the name `/v1/models` lists and requests must name (`--served-model-name`).
        type_names (`list[str]`): the safety head's type names, risky ones first and the clean one last
            (`config.safety_type_labels`); `type_probs` in a verdict follow this order.
        level_names (`list[str]`): the level names (`config.safety_level_labels`).
        created (`int`): Unix time the backend was built (`/v1/models`' `created`).
        metrics (`ServingMetrics`, *optional*): set by the app; backends record batch sizes and queue depth in it.
        arrivals (`Arrivals`): requests the app has admitted and not yet queued; a backend's batchers wait for
            company only while this is not zero.
    """

    model_id: str
    type_names: list[str]
    level_names: list[str]
    created: int = 0
    metrics: ServingMetrics | None = None

    def __init__(self, model_id: str, type_names: list[str], level_names: list[str]):
        self.model_id = model_id
        self.type_names = list(type_names)
        self.level_names = list(level_names)
        self.created = int(time.time())
        self.metrics = None
        self.arrivals = Arrivals()

    @property
    def risky_types(self) -> list[str]:
        """The type names that can be flagged (every one but the last, clean, type)."""
        return self.type_names[:-1]

    @abc.abstractmethod
    async def moderate(self, inputs: list[ModerationInput]) -> list[Verdict]:
        """One verdict per input, from the vision tower and the safety module only (no language model)."""

    @abc.abstractmethod
    async def complete(self, request: ChatRequest) -> ChatCompletionResult:
        """The whole answer: `request.n` choices, usage and the verdict (promises 1, 3, 4, 5)."""

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent | list[StreamEvent]]:
        """An async iterator of events: the verdict, deltas, one finish per choice, usage (promise 2); an item may be
        a list of events that are ready together (the HTTP layer writes a list in one write). Closing the iterator
        early (the client went away) must release the request's resources."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish the accepted work, then release resources (promise 7)."""

    def record_batch(self, kind: str, size: int):
        """Counts one model call of `size` rows (`kind`: `"chat"` or `"moderation"`) in `/metrics`."""
        if self.metrics is not None:
            self.metrics.observe_batch(kind, size)

    def record_cancelled(self, kind: str, stage: str, count: int = 1):
        """Counts `count` requests of `kind` whose client went away and whose work stopped at `stage` (`"queued"`,
        `"running"` or `"upstream"`) in `/metrics`."""
        if self.metrics is not None and count:
            self.metrics.observe_cancelled(kind, stage, count)

    def record_generated_tokens(self, count: int):
        """Counts tokens the in-process model generated in `/metrics`."""
        if self.metrics is not None and count:
            self.metrics.observe_generated_tokens(count)

    def queue_depth(self) -> int:
        """Requests waiting for a model call (for `/metrics`); 0 for a backend without a queue."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Extra fields for `/health` (e.g. `{"mode": "local"}` or the upstream's name)."""
        return {}


__all__ = [
    "Arrivals",
    "BackendSettings",
    "ChatCompletionResult",
    "ChatRequest",
    "Choice",
    "ModerationInput",
    "Overloaded",
    "ServiceUnavailable",
    "ServingBackend",
    "ServingError",
    "StreamEvent",
    "Usage",
    "UpstreamError",
    "Verdict",
]
