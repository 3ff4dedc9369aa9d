"""The in-process backend: the whole SafeLlava in this process.

- Chat requests that arrive together with the same generation settings (`max_new_tokens`, sampling, stop
  sequences, `safety_threshold`, `safety_actions`; seeded requests never share a call) run as one left-padded batch
  through `model.generate(..., safety_threshold=..., safety_actions=..., return_dict_in_generate=True)`. `n > 1`
  adds `n` rows. Each row keeps its own verdict and action, as `generate` gives them.
- Streamed requests batch the same way, each row streaming its own text, token by token, after its request's
  verdict. SafeLlava's `generate` streams a hint or a refusal for one row only, so a streamed batch of several rows
  in which any row is hinted or refused goes on request by request (choice by choice), after the batch's verdicts.
- Moderation runs `model.assess_safety` (vision tower, safety projector and head; never the language model), in
  batches too.
- A request whose client went away (`ChatRequest.client_gone`) stops: a stopping criterion ends its rows at the next
  decoding step while the other rows of the batch go on, and `generate` ends when no row is left.

Every model call runs in one worker thread, so the event loop stays free (`/health` answers while generating).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..pipeline_safe_llava import NOT_JUDGED_NO_IMAGE, NOT_JUDGED_SAFETY_OFF, safety_entries
from ..safety_loading_safe_llava import DTYPES
from .backend import (
    BackendSettings,
    ChatCompletionResult,
    ChatRequest,
    Choice,
    ModerationInput,
    ServiceUnavailable,
    ServingBackend,
    ServingError,
    StreamEvent,
    Usage,
    Verdict,
)
from .batching import MicroBatcher
from .detokenize import IncrementalDetokenizer


logger = logging.getLogger(__name__)


def build_local_backend(settings: BackendSettings) -> LocalBackend:
    """Loads the model and processor `settings.model` names (a folder or a Hub id, of any base in `bases.BASES`)
    and wraps them in a backend.

    Raises:
        ValueError: the safety modules are untrained (`config.safety_modules_trained` is False): a server would
            answer with random verdicts. Train (or load a trained checkpoint) first.
    """
    from ..bases import load_safe_model, load_safe_processor

    dtype = "auto" if settings.dtype in (None, "auto") else DTYPES[settings.dtype]
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_safe_model(settings.model, dtype=dtype).to(device).eval()  # any base, by the registry
    processor = load_safe_processor(settings.model, model.config.model_type)
    if not model.config.safety_modules_trained:
        raise ValueError(
            f"{settings.model}: the safety modules are untrained (config.safety_modules_trained is false), so every "
            "verdict would be random; serve a checkpoint trained with stage 1."
        )
    return LocalBackend(model, processor, settings)


def default_served_name(model: str) -> str:
    """`--served-model-name`'s default: the folder's name (a Hub id as it is)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


class LocalEngine:
    """The model calls (blocking; run in the backend's worker thread).

    `on_cancelled(kind, count)` hears of requests whose rows were stopped because their client went away, and
    `on_generated(count)` of the tokens each call generated (both no-ops unless the backend sets them).
    """

    def __init__(self, model, processor):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.on_cancelled = lambda kind, count: None
        self.on_generated = lambda count: None
        self.max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))
        self.pad_id = self.tokenizer.pad_token_id

    # -- inputs ------------------------------------------------------------------------------------------------

    def prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, prompts: list[str], images: list):
        """The processor's left-padded tensors for `prompts` (images: flat, in order), on the model's device."""
        inputs = self.processor(
            images=images or None, text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generation_kwargs(self, request: ChatRequest, gone: _GoneRows | None = None) -> dict:
        """`generate`'s arguments for `request`'s settings; with `gone`, rows whose client left stop early."""
        kwargs = {
            "max_new_tokens": request.max_new_tokens,
            "safety_threshold": request.safety_threshold,
            "safety_actions": request.safety_actions,
            "pad_token_id": self.pad_id,
        }
        if request.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=None)
        if request.stop:
            kwargs.update(stop_strings=list(request.stop), tokenizer=self.tokenizer)
        if gone is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([gone])
        return kwargs

    def batch_inputs(self, requests: list[ChatRequest], rows_per_request: int | None = None):
        """The left-padded tensors of `requests`, `n` rows each (or `rows_per_request`), and the request index of
        each row."""
        prompts, images, owners = [], [], []
        for index, request in enumerate(requests):
            prompt = self.prompt(request.messages)
            for _ in range(rows_per_request or request.n):
                prompts.append(prompt)
                images.extend(request.images)
                owners.append(index)
        inputs = self.inputs(prompts, images)
        self.check_length(inputs, max(request.max_new_tokens for request in requests))
        return inputs, owners

    def check_length(self, inputs, max_new_tokens: int):
        """Raises ValueError (a 400) for a prompt that, with its new tokens, would not fit the language model."""
        longest = int(inputs["attention_mask"].sum(dim=1).max())
        if self.max_context is not None and longest + max_new_tokens > self.max_context:
            raise ValueError(
                f"the prompt has {longest} tokens, and with max_tokens={max_new_tokens} it exceeds the model's "
                f"context of {self.max_context} tokens; shorten the conversation or ask for fewer tokens."
            )

    # -- chat ------------------------------------------------------------------------------------------------

    def complete_batch(self, requests: list[ChatRequest]) -> list[ChatCompletionResult]:
        """One `generate` call for requests with the same settings (see `chat_batch_key`)."""
        inputs, owners = self.batch_inputs(requests)
        gone = _GoneRows(requests, owners)
        if requests[0].seed is not None:
            torch.manual_seed(requests[0].seed)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, **self.generation_kwargs(requests[0], gone), return_dict_in_generate=True
            )
        self.on_cancelled("chat", len(gone.seen))
        safety = safety_entries(getattr(output, "safety_assessment", None), num_rows=len(owners))
        self._count_generated(output, inputs["input_ids"].shape[1])
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            self._result(request, [r for r, o in enumerate(owners) if o == index], new_tokens, safety, prompt_lengths)
            for index, request in enumerate(requests)
        ]

    def _result(self, request, rows, new_tokens, safety, prompt_lengths) -> ChatCompletionResult:
        refused = safety[rows[0]].get("action") == "refuse"
        choices = [self.choice(i, new_tokens[row], request, refused) for i, row in enumerate(rows)]
        usage = Usage(int(prompt_lengths[rows[0]]), sum(choice.completion_tokens for choice in choices))
        return ChatCompletionResult(choices=choices, usage=usage, safety=safety[rows[0]])

    def answer_tokens(self, tokens: list[int]) -> tuple[list[int], bool]:
        """A row's new tokens up to its first EOS (included), padding dropped, and whether an EOS ended it."""
        ended = False
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, ended = tokens[: position + 1], True
                break
        return [t for t in tokens if t != self.pad_id or t in self.eos_ids], ended

    def choice(self, index: int, tokens: list[int], request: ChatRequest, refused: bool) -> Choice:
        """One answer from its new tokens: cut after EOS, decoded, cut before a stop sequence."""
        tokens, ended = self.answer_tokens(tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, request.stop)
        if refused:
            reason = "content_filter"
        elif ended or stopped or len(tokens) < request.max_new_tokens:
            reason = "stop"
        else:
            reason = "length"
        return Choice(index=index, text=text, finish_reason=reason, completion_tokens=len(tokens))

    # -- streaming ------------------------------------------------------------------------------------------

    def stream_batch(self, jobs: list[StreamJob]) -> None:
        """Streams requests with the same settings through one `generate` call, every row emitting its own events.
        SafeLlava's `generate` streams a hint or a refusal for one row only, so a batch of several rows in which any
        row is not allowed goes on request by request (the verdicts, already sent, are those of the batch)."""
        requests = [job.request for job in jobs]
        inputs, owners = self.batch_inputs(requests)
        streamer = _RowStreamer(self, jobs, owners, inputs["attention_mask"].sum(dim=1).tolist())
        gone = _GoneRows(requests, owners)
        if requests[0].seed is not None:
            torch.manual_seed(requests[0].seed)
        try:
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self.generation_kwargs(requests[0], gone), streamer=streamer)
        except _RowByRow:
            for job in jobs:
                self.stream_choice_by_choice(job)
            return
        self.on_cancelled("stream", len(gone.seen))
        self._count_generated(output, inputs["input_ids"].shape[1])
        streamer.finish()

    def _count_generated(self, output, prompt_width: int):
        """Reports the tokens a `generate` call generated (each row up to its EOS; a stopped row's padding not
        counted)."""
        sequences = getattr(output, "sequences", output)
        if isinstance(sequences, torch.Tensor) and sequences.dim() == 2:
            new_tokens = sequences[:, prompt_width:].tolist()
            self.on_generated(sum(len(self.answer_tokens(tokens)[0]) for tokens in new_tokens))

    def stream_choice_by_choice(self, job: StreamJob) -> None:
        """One request, one `generate` call of one row per choice (a hint or a refusal streams only so)."""
        inputs, _ = self.batch_inputs([job.request], rows_per_request=1)
        prompt_tokens, completion_tokens = int(inputs["attention_mask"].sum()), 0
        gone = _GoneRows([job.request], [0])
        for index in range(job.request.n):
            if job.request.client_gone.is_set():
                gone.seen.add(0)
                break
            streamer = _RowStreamer(self, [job], [0], [prompt_tokens], choices=[index], usage=False)
            if job.request.seed is not None:
                torch.manual_seed(job.request.seed + index)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self.generation_kwargs(job.request, gone), streamer=streamer)
            self._count_generated(output, inputs["input_ids"].shape[1])
            streamer.finish()
            completion_tokens += len(streamer.tokens[0])
        self.on_cancelled("stream", len(gone.seen))
        if job.request.include_usage:
            job.emit(StreamEvent(kind="usage", usage=Usage(prompt_tokens, completion_tokens)))
            StreamJob.hand_over([job], at_once=True)

    # -- moderation -----------------------------------------------------------------------------------------

    def moderate_batch(self, inputs: list[ModerationInput]) -> list[Verdict]:
        """One `assess_safety` call (vision tower and safety module only) for inputs with the same settings."""
        prompts = [self.prompt(item.messages()) for item in inputs]
        images = [image for item in inputs for image in item.images]
        tensors = self.inputs(prompts, images)
        with torch.inference_mode():
            assessment = self.model.assess_safety(
                **tensors, safety_threshold=inputs[0].safety_threshold, safety_actions=inputs[0].safety_actions
            )
        return [Verdict(entry) for entry in safety_entries(assessment, num_rows=len(inputs))]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to (not including) the earliest stop sequence, and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


class LoopOutbox:
    """Events from the model thread to the event loop. `send(pairs)` adds `(deliver, events)` pairs; the loop calls
    each `deliver` once per hand-over with all its events, in order.

    The first pair after a quiet spell wakes the loop at once; the loop then looks again every `interval_s` (a timer
    of its own, no wake-up from the model thread) and hands over what came meanwhile, until an interval brings
    nothing. `send(pairs, at_once=True)` (a stream's first token, its end) wakes the loop at once in any case. A
    stream whose steps come slower than the interval (any large model) gets each step at once; a fast one (a tiny
    model on a CPU, ~1 ms per step) gets several steps per hand-over, each still its own chunk, so that the event
    loop's work (wake-up, HTTP write) does not take the GIL from the decoding thread at every step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.02):
        self.loop, self.interval_s = loop, interval_s
        self._lock, self._pairs, self._ticking = threading.Lock(), [], False
        self._timer: asyncio.TimerHandle | None = None

    def send(self, pairs: list, at_once: bool = False):
        with self._lock:
            self._pairs.extend(pairs)
            wake, self._ticking = at_once or not self._ticking, True
        if wake:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self):
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._ticking = bool(pairs)  # a quiet interval stops the timer: the next pair wakes the loop
        self._timer = self.loop.call_later(self.interval_s, self._flush) if pairs else None
        _deliver_all(pairs)


class StreamJob:
    """One streamed request and where its events go.

    `emit(event)` keeps an event for the next hand-over (a second verdict is dropped: a batch's verdict stands when the
    batch goes on request by request); `hand_over(jobs)` gives the kept events of every job to their `deliver`
    callables, as one list per job (`deliver(events)`): through the jobs' `LoopOutbox` when they have one (the event
    loop then pays one callback per hand-over at most, not one per row and token), else at once.
    """

    def __init__(self, request: ChatRequest, deliver, outbox: LoopOutbox | None = None):
        self.request, self.deliver, self.outbox = request, deliver, outbox
        self.verdict_sent, self.kept = False, []

    def emit(self, event: StreamEvent):
        if event.kind == "verdict":
            if self.verdict_sent:
                return
            self.verdict_sent = True
        self.kept.append(event)

    @staticmethod
    def hand_over(jobs: list[StreamJob], at_once: bool = False):
        """Gives the kept events away; `at_once`: without waiting for the outbox's next look (`LoopOutbox.send`)."""
        pairs = [(job.deliver, job.kept) for job in jobs if job.kept]
        for job in jobs:
            job.kept = []
        if not pairs:
            return
        outbox = jobs[0].outbox
        if outbox is None:
            _deliver_all(pairs)
        else:
            outbox.send(pairs, at_once=at_once)


def _deliver_all(pairs: list):
    """Calls each `deliver` of `(deliver, events)` pairs once, with its events in order."""
    merged: dict = {}
    for deliver, events in pairs:
        merged.setdefault(deliver, []).extend(events)
    for deliver, events in merged.items():
        deliver(events)


class StreamInbox:
    """A stream's events on the event loop's side: `put(events)` (called on the loop) adds a list of events, `await
    take()` gives every event there is, in order, waiting for some when there is none. Lighter than an
    `asyncio.Queue` of single events: one wake-up of the reader per hand-over, whatever the number of events."""

    def __init__(self):
        self._events: list = []
        self._waiter: asyncio.Future | None = None

    def put(self, events: list):
        self._events.extend(events)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events, self._events = self._events, []
        return events


class _GoneRows(StoppingCriteria):
    """Stops the rows of requests whose client went away (`ChatRequest.client_gone`) at the next decoding step; the
    other rows go on, and `generate` ends once every row is done. `seen` holds the indexes of the requests it
    stopped. In a sub-batch of a mixed plan (hinted or refused rows generated apart), whose rows it cannot map, it
    stops only when every request is gone. While every client is there (nearly every step), it answers one
    all-False tensor made once (`StoppingCriteriaList` only reads it), not a new tensor per step."""

    def __init__(self, requests: list[ChatRequest], owners: list[int]):
        self.requests, self.owners = requests, owners
        self.seen: set[int] = set()
        self._none_gone: torch.BoolTensor | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        gone = [self.requests[owner].client_gone.is_set() for owner in self.owners]
        rows = input_ids.shape[0]
        if not any(gone):
            if self._none_gone is None or self._none_gone.shape[0] != rows or self._none_gone.device != input_ids.device:
                self._none_gone = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
            return self._none_gone
        self.seen.update(owner for owner, left in zip(self.owners, gone) if left)
        flags = gone if rows == len(gone) else [all(gone)] * rows
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowByRow(Exception):
    """A streamed batch holds a hint or a refusal: stream its requests one by one."""


class _RowStreamer(BaseStreamer):
    """
    Streams every row of one `generate` call as `StreamEvent`s, token by token: each request's verdict first, then
    per-row text (until EOS or a stop sequence; held back while it ends in an incomplete character or may be the start
    of a stop sequence), one finish per row, and usage per request (`usage=True`). Text is decoded incrementally
    (`IncrementalDetokenizer`: a short window per step), stop sequences are looked for in the new text only, and each
    step's events of every row go to the event loop in one hand-over (the verdicts, the first text and the finish at
    once, the steps between on the outbox's timer).

    With several rows, a verdict that is not `allow` for every row raises `_RowByRow` before anything is generated.
    With one row, `generate` streams the hinted answer or the refusal (then as one tensor of tokens) itself.
    """

    def __init__(self, engine, jobs, owners, prompt_lengths, choices=None, usage=True):
        self.engine, self.jobs, self.owners, self.prompt_lengths, self.usage = engine, jobs, owners, prompt_lengths, usage
        self.choices = choices or [owners[:row].count(owner) for row, owner in enumerate(owners)]
        self.rows = [_RowText(engine, jobs[owner].request.stop) for owner in owners]
        self.actions = ["allow"] * len(owners)
        self.prompt_seen, self.text_given = False, False

    @property
    def tokens(self) -> list[list[int]]:
        return [row.tokens for row in self.rows]

    def on_safety_assessment(self, assessment):
        self._give_verdicts(safety_entries(assessment))
        self.actions = list(assessment.actions)
        if len(self.owners) > 1 and any(action != "allow" for action in self.actions):
            raise _RowByRow()

    def _give_verdicts(self, entries: list[dict]):
        for index, job in enumerate(self.jobs):
            safety = entries[self.owners.index(index)]
            if not safety.get("judged"):  # as precise as the non-streamed reason
                safety = {"judged": False, "reason": NOT_JUDGED_SAFETY_OFF if job.request.images else NOT_JUDGED_NO_IMAGE}
            job.emit(StreamEvent(kind="verdict", safety=safety))
        StreamJob.hand_over(self.jobs, at_once=True)

    def put(self, value):
        if not self.prompt_seen:  # the prompt comes first; without a verdict by then, nothing was judged
            self.prompt_seen = True
            self._give_verdicts([{"judged": False}] * len(self.owners))
            return
        tokens, before = value.reshape(-1).tolist(), self.text_given
        for row, new in enumerate([tokens] if len(self.owners) == 1 else [[t] for t in tokens]):
            if self.jobs[self.owners[row]].request.client_gone.is_set():
                self.rows[row].done = True  # nobody reads it: no more text (the model stops the row at this step)
                continue
            self._send(row, self.rows[row].add(new))
        StreamJob.hand_over(self.jobs, at_once=self.text_given and not before)  # the first text: at once

    def _send(self, row: int, text: str):
        if text:
            self.text_given = True
            self.jobs[self.owners[row]].emit(StreamEvent(kind="delta", index=self.choices[row], text=text))

    def end(self):
        """Called by `generate` after the last token; the finish events follow in `finish`."""

    def finish(self):
        for row in range(len(self.owners)):
            self._send(row, self.rows[row].finish())
            self.jobs[self.owners[row]].emit(StreamEvent(kind="finish", index=self.choices[row], finish_reason=self._reason(row)))
        for index, job in enumerate(self.jobs):
            if self.usage and job.request.include_usage:
                rows = [row for row, owner in enumerate(self.owners) if owner == index]
                usage = Usage(int(self.prompt_lengths[rows[0]]), sum(len(self.rows[row].tokens) for row in rows))
                job.emit(StreamEvent(kind="usage", usage=usage))
        StreamJob.hand_over(self.jobs, at_once=True)

    def _reason(self, row: int) -> str:
        if self.actions[row] == "refuse":
            return "content_filter"
        text = self.rows[row]
        ended = bool(text.tokens) and text.tokens[-1] in self.engine.eos_ids
        too_long = len(text.tokens) >= self.jobs[self.owners[row]].request.max_new_tokens
        return "length" if too_long and not ended and not text.stopped else "stop"


class _RowText:
    """One streamed row's tokens and text: decoded incrementally, cut before the first stop sequence (looked for in
    the new text and the few characters before it), with the possible start of a stop sequence held back."""

    def __init__(self, engine, stops: list[str]):
        self.eos_ids, self.stops = engine.eos_ids, [stop for stop in stops if stop]
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer)
        self.tokens: list[int] = []
        self.text, self.sent, self.done, self.stopped = "", 0, False, False
        self.overlap = max((len(stop) for stop in self.stops), default=1) - 1

    def add(self, new: list[int]) -> str:
        """Takes the row's new tokens (those past EOS or a stop are ignored); returns the text ready to send."""
        taken = []
        for token in new:
            if self.done:
                break
            taken.append(token)
            self.done = token in self.eos_ids
        self.tokens.extend(taken)
        if not taken:
            return ""
        return self._ready(self.detokenizer.push(taken), final=self.done)

    def finish(self) -> str:
        """The rest of the text once the row has ended."""
        self.done = True
        return self._ready(self.detokenizer.flush(), final=True)

    def _ready(self, piece: str, final: bool) -> str:
        if not self.stops:  # nothing to look for or hold back: the new text as it is
            return piece
        if not self.stopped:
            searched_from = max(0, len(self.text) - self.overlap)
            self.text += piece
            self._cut_at_stop(searched_from)
        hold = 0 if (final or self.stopped) else _held_back(self.text, self.stops)
        ready = self.text[self.sent : len(self.text) - hold]
        self.sent += len(ready)
        return ready

    def _cut_at_stop(self, searched_from: int):
        positions = [self.text.find(stop, searched_from) for stop in self.stops]
        positions = [position for position in positions if position >= 0]
        if positions:
            self.text, self.stopped, self.done = self.text[: min(positions)], True, True


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence (not sent yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


@contextlib.contextmanager
def _model_errors_as_400():
    """The model's `ValueError`s name a problem with the inputs (this project's convention): the client gets them
    as a 400. A batch that fails is rerun row by row (`MicroBatcher`), so only the faulty request sees it."""
    try:
        yield
    except ValueError as error:
        message = " ".join(str(error).split())
        raise ServingError(f"The model cannot run this request: {message}", code="model_input_error") from None


def chat_batch_key(request: ChatRequest):
    """Requests with equal keys share a `generate` call; a seeded request shares it with nobody."""
    return (
        request.max_new_tokens,
        request.temperature,
        request.top_p,
        tuple(request.stop),
        request.request_id if request.seed is not None else None,
        json.dumps(request.safety_threshold, sort_keys=True),
        json.dumps(request.safety_actions, sort_keys=True),
    )


def moderation_batch_key(item: ModerationInput):
    return json.dumps([item.safety_threshold, item.safety_actions], sort_keys=True)


class LocalBackend(ServingBackend):
    """`ServingBackend` over an in-process SafeLlava (see the module docstring)."""

    def __init__(self, model, processor, settings: BackendSettings):
        config = model.config
        super().__init__(settings.served_model_name, config.safety_type_labels, config.safety_level_labels)
        self.engine = LocalEngine(model, processor)
        self.engine.on_cancelled = lambda kind, count: self.record_cancelled(kind, "running", count)
        self.engine.on_generated = self.record_generated_tokens
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safe-llava-model")
        batching = {
            "executor": self.executor, "batch_wait_ms": settings.batch_wait_ms, "max_queue": settings.max_queue,
            "company": self.arrivals.count,
        }
        self.chat = MicroBatcher(
            self._run_chat, key=chat_batch_key, max_batch_size=settings.max_batch_size, name="chat",
            on_batch=lambda size: self.record_batch("chat", size),
            on_drop=lambda count: self.record_cancelled("chat", "queued", count), **batching,
        )
        self.streams = MicroBatcher(
            self._run_streams, key=lambda job: chat_batch_key(job.request), max_batch_size=settings.max_batch_size,
            name="stream", on_batch=lambda size: self.record_batch("stream", size),
            on_drop=lambda count: self.record_cancelled("stream", "queued", count), **batching,
        )
        self.moderation = MicroBatcher(
            self._run_moderation, key=moderation_batch_key, max_batch_size=settings.max_batch_size,
            name="moderation", on_batch=lambda size: self.record_batch("moderation", size),
            on_drop=lambda count: self.record_cancelled("moderation", "queued", count), **batching,
        )
        self._outbox: LoopOutbox | None = None
        self._stream_interval_s = settings.stream_interval_ms / 1000.0
        self._closing = False

    def _run_chat(self, requests: list[ChatRequest]) -> list:
        with _model_errors_as_400():
            return self.engine.complete_batch(requests)

    def _run_streams(self, jobs: list[StreamJob]) -> list:
        with _model_errors_as_400():
            self.engine.stream_batch(jobs)
        return [None] * len(jobs)

    def _run_moderation(self, inputs: list[ModerationInput]) -> list:
        with _model_errors_as_400():
            return self.engine.moderate_batch(inputs)

    async def complete(self, request: ChatRequest) -> ChatCompletionResult:
        self._check_open()
        return await self.chat.submit(request)

    async def moderate(self, inputs: list[ModerationInput]) -> list[Verdict]:
        self._check_open()
        verdicts = [None if item.images else Verdict(safety_entries(None, 1)[0]) for item in inputs]
        judged = [item for item in inputs if item.images]
        results = await asyncio.gather(*(self.moderation.submit(item) for item in judged))
        fill = iter(results)
        return [verdict if verdict is not None else next(fill) for verdict in verdicts]

    async def stream(self, request: ChatRequest) -> AsyncIterator[list[StreamEvent]]:
        """The request's events, in lists: all those that are ready when the event loop comes to them."""
        self._check_open()
        loop, inbox = asyncio.get_running_loop(), StreamInbox()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = LoopOutbox(loop, self._stream_interval_s)
        outbox = self._outbox
        job = asyncio.ensure_future(self.streams.submit(StreamJob(request, inbox.put, outbox)))
        # The end mark goes through the outbox too, behind the events still waiting there.
        job.add_done_callback(lambda _: outbox.send([(inbox.put, [None])], at_once=True))
        try:
            while True:
                ready = await inbox.take()  # the steps the event loop fell behind on come together
                ended = ready[-1] is None
                events = ready[:-1] if ended else ready
                if events:
                    yield events
                if ended:
                    break
            job.result()  # raises the generation's error, if any
        finally:
            if not job.done():
                job.cancel()

    def _check_open(self):
        if self._closing:
            raise ServiceUnavailable("The server is shutting down; retry on another replica.")

    def queue_depth(self) -> int:
        return self.chat.depth() + self.streams.depth() + self.moderation.depth()

    def describe(self) -> dict:
        return {"mode": "local", "device": str(self.engine.model.device), "dtype": str(self.engine.model.dtype).replace("torch.", "")}

    async def close(self) -> None:
        self._closing = True
        for batcher in (self.chat, self.streams, self.moderation):
            await batcher.close()
        self.executor.shutdown(wait=True)


__all__ = ["LocalBackend", "LocalEngine", "build_local_backend", "default_served_name", "ServingError"]
