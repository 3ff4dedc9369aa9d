"""Gate mode: `safe-llava serve --model HEAD_ONLY_SAFELLAVA --upstream URL --upstream-model NAME`, for every base.

A head-only SafeLlava (`num_llm_safety_tokens=0`) of any base (LLaVA-1.5, LLaVA-NeXT, Gemma 3: `bases.BASES`) generates
with its stock base's language model, unchanged. So generation can run on any OpenAI-compatible engine that serves the
stock weights (vLLM, SGLang, `transformers serve`), with this process in front of it as a gate that loads only the
verdict's parts (the verdict model, `serving/verdict.py`). Nothing here depends on the base: the checkpoint's
`model_type` picks its classes in the registry. For each request the gate assesses the images (requests that arrive
together share one `assess_safety` call, each under its own rule), then does what
`model.generate(..., safety_threshold=..., safety_actions=...)` would:

- `refuse`: answers the configured refusal itself (`finish_reason: "content_filter"`); the upstream is never contacted;
- `hint`: forwards the request with the policy's safe hint appended to the text of the last message, which puts it
  at the end of the user's turn, where `generate` inserts it (right before the tokens the chat template puts after
  the user's text: `chat_template_safe_llava.hint_marker_ids`; LLaVA's ` ASSISTANT:`, Gemma 3's `<end_of_turn>` and model
  turn). Before
  forwarding, the gate checks with the model's own chat template and tokenizer that the edited conversation gives
  exactly `generate`'s token sequence (prompt, hint ids, marker); `hint_placement` says how it was placed;
- `allow` (or nothing judged): forwards the request unchanged (less the SafeLlava-only fields `safety_threshold` and
  `safety_actions`, with `model` set to `--upstream-model`).

The engine sees the very pixels that were judged: an image the gate fetched over http(s) (`--allow-image-urls`) is
forwarded as a PNG data URL of the decoded image, never as its URL, so that the engine fetches nothing (no second
fetch that could return other content, and no request to a host the gate's SSRF guard refused). Data URLs are
forwarded as they came.

Streams pass through chunk by chunk, after a first event that carries the verdict. A client that goes away closes the
engine's request too (the engine sees the disconnect and aborts, as vLLM, SGLang and `transformers serve` do); a
request waiting for its verdict leaves the verdict model's queue. Every response carries the
`safety` object. The gate holds no conversation state: run as many replicas as needed behind any load balancer.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

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
from .verdict import SafetyVerdictModel, VerdictRow
from .upstream import UpstreamClient


logger = logging.getLogger(__name__)

SAFELLAVA_ONLY_FIELDS = ("safety_threshold", "safety_actions")
HINT_APPENDED = "appended to the last text part"
HINT_NEW_PART = "a new text part"


class GateBackend(ServingBackend):
    """
    A `ServingBackend` that assesses in this process and generates on an upstream engine (see the module docstring).

    Args:
        verdict_model (`SafetyVerdictModel`): the verdict's parts of a head-only SafeLlava.
        upstream (`UpstreamClient`): the engine serving the stock base's weights.
        settings (`BackendSettings`): batching flags and names.
    """

    def __init__(self, verdict_model: SafetyVerdictModel, upstream: UpstreamClient, settings: BackendSettings):
        config = verdict_model.config
        super().__init__(settings.served_model_name, config.safety_type_labels, config.safety_level_labels)
        self.verdict_model, self.upstream = verdict_model, upstream
        self.policy = verdict_model.model.safety_policy
        if not self.policy.text_token_ids:
            self.policy.tokenize(verdict_model.processor)
        # The event loop's own copy: the verdict thread sets padding on its tokenizer while the loop tokenizes here.
        self._processor = copy.deepcopy(verdict_model.processor)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safe-llava-verdict")
        batching = dict(
            max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue,
            company=self.arrivals.count,
        )
        self._chat_verdicts = MicroBatcher(
            self.verdict_model.assess,
            self._executor,
            on_batch=lambda n: self.record_batch("chat", n),
            on_drop=lambda n: self.record_cancelled("chat", "queued", n),
            name="gate-chat",
            **batching,
        )
        self._moderation_verdicts = MicroBatcher(
            self.verdict_model.assess,
            self._executor,
            on_batch=lambda n: self.record_batch("moderation", n),
            on_drop=lambda n: self.record_cancelled("moderation", "queued", n),
            name="gate-moderation",
            **batching,
        )
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    # -- the contract ----------------------------------------------------------------------------------------------

    async def moderate(self, inputs: list[ModerationInput]) -> list[Verdict]:
        async with self._tracked():
            rows = [VerdictRow(i.messages(), list(i.images), i.safety_threshold, i.safety_actions) for i in inputs]
            results = await asyncio.gather(*(self._moderation_verdicts.submit(row) for row in rows))
            return [Verdict(_checked(result).safety) for result in results]

    async def complete(self, request: ChatRequest) -> ChatCompletionResult:
        async with self._tracked():
            safety, prompt_tokens = await self._verdict(request)
            if safety.get("action") == "refuse":
                return self._refusal(request, safety, prompt_tokens)
            try:
                answer = await self.upstream.chat(self.forward_body(request, safety))
                choices = [_choice(raw, i) for i, raw in enumerate(answer["choices"])]
                missing = request.n - len(choices)
                if missing > 0:  # an engine that ignores `n` (transformers serve): ask for the rest one by one
                    choices += await self._more_choices(request, safety, missing, start=len(choices))
            except asyncio.CancelledError:
                self.record_cancelled("chat", "upstream")  # the client left: the engine's requests are closed
                raise
            usage = _usage(answer.get("usage"), prompt_tokens, choices, self._processor.tokenizer)
            return ChatCompletionResult(choices=choices, usage=usage, safety=safety)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self._stream(request)

    async def close(self) -> None:
        self._closing = True
        await self._idle.wait()
        await self._chat_verdicts.close()
        await self._moderation_verdicts.close()
        await self.upstream.close()
        self._executor.shutdown(wait=True)

    def queue_depth(self) -> int:
        return self._chat_verdicts.depth() + self._moderation_verdicts.depth()

    def describe(self) -> dict:
        return {"mode": "gate", "upstream_model": self.upstream.model}

    # -- verdicts, refusals, hints ---------------------------------------------------------------------------------

    async def _verdict(self, request: ChatRequest) -> tuple[dict, int]:
        row = VerdictRow(request.messages, list(request.images), request.safety_threshold, request.safety_actions)
        result = _checked(await self._chat_verdicts.submit(row))
        return result.safety, result.prompt_tokens

    def refusal_text(self, safety: dict, request: ChatRequest) -> tuple[str, int]:
        """`generate`'s refusal for the verdict's category: its text (cut before the first stop sequence) and its
        token count (the refusal, then EOS, within `max_new_tokens`)."""
        tokens = list(self.policy.text_token_ids["refusals"][safety["category_name"]])
        eos = self.verdict_model.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        tokens = (tokens + eos[:1])[: request.max_new_tokens]
        text = self._processor.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in request.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text, len(tokens)

    def _refusal(self, request: ChatRequest, safety: dict, prompt_tokens: int) -> ChatCompletionResult:
        text, count = self.refusal_text(safety, request)
        choices = [Choice(i, text, "content_filter", count) for i in range(request.n)]
        return ChatCompletionResult(choices, Usage(prompt_tokens, count * request.n), safety)

    def forward_body(self, request: ChatRequest, safety: dict) -> dict:
        """The body sent upstream: the client's, less the SafeLlava-only fields; with a `hint` verdict, the safe hint
        added to the last message (see `hint_placement`)."""
        body = {k: v for k, v in copy.deepcopy(request.body).items() if k not in SAFELLAVA_ONLY_FIELDS}
        _inline_fetched_images(body.get("messages") or [], request.images)
        if safety.get("action") == "hint":
            hint = self.policy.hints[safety["category_name"]][safety["level"]]
            placement = self.hint_placement(request.messages, safety)
            _add_hint(body["messages"][-1], hint, placement)
        return body

    def hint_placement(self, messages: list[dict], safety: dict) -> str:
        """How to add the hint to the last message so that the chat template renders `generate`'s exact token
        sequence (prompt up to the hint's marker, hint ids, marker): appended to its last text part, or as a new text part; the first that matches, checked with the
        model's tokenizer (if none does, the first, with a warning: the answer may differ by the seam's tokens)."""
        hint = self.policy.hints[safety["category_name"]][safety["level"]]
        hint_ids = self.policy.text_token_ids["hints"][safety["category_name"]][safety["level"]]
        marker = self.policy.text_token_ids["assistant_prefix"]
        prompt_ids = self._prompt_ids(messages)
        target = prompt_ids[: -len(marker)] + list(hint_ids) + prompt_ids[-len(marker) :]
        for placement in (HINT_APPENDED, HINT_NEW_PART):
            edited = copy.deepcopy(messages)
            _add_hint(edited[-1], hint, placement)
            if self._prompt_ids(edited) == target:
                return placement
        logger.warning("No chat-message form of the safe hint tokenizes exactly as generate's; appending it.")
        return HINT_APPENDED

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True)
        return self._processor.tokenizer.encode(prompt, add_special_tokens=True)

    # -- upstream --------------------------------------------------------------------------------------------------

    async def _more_choices(self, request, safety, count: int, start: int) -> list[Choice]:
        """`count` further single-choice requests (seed + choice index, so seeded samples differ)."""
        body = self.forward_body(request, safety)
        answers = await asyncio.gather(*(self.upstream.chat(_single_choice(body, start + i)) for i in range(count)))
        return [_choice(answer["choices"][0], start + i) for i, answer in enumerate(answers)]

    async def _stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        async with self._tracked():
            safety, prompt_tokens = await self._verdict(request)
            if safety.get("action") == "refuse":
                async for event in self._stream_refusal(request, safety, prompt_tokens):
                    yield event
                return
            streams = await self._open_streams(request, safety)
            try:
                yield StreamEvent("verdict", safety=safety)
                async for event in self._pass_through(request, streams, prompt_tokens):
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                self.record_cancelled("stream", "upstream")  # the client left: its engine requests close below
                raise
            finally:
                await _close_all(streams)

    async def _pass_through(self, request: ChatRequest, streams: list, prompt_tokens: int) -> AsyncIterator:
        """The engine's chunks as events, choice after choice, then usage when asked for."""
        texts: dict[int, list[str]] = {}
        completion_tokens = []
        for index, chunks in enumerate(streams):
            upstream_usage = None
            async for chunk in chunks:
                upstream_usage = chunk.get("usage") or upstream_usage
                for event in _chunk_events(chunk, texts, index if len(streams) > 1 else 0):
                    yield event
            completion_tokens.append((upstream_usage or {}).get("completion_tokens"))
        if request.include_usage:
            yield StreamEvent("usage", usage=self._stream_usage(texts, completion_tokens, prompt_tokens))

    async def _open_streams(self, request: ChatRequest, safety: dict) -> list:
        """The engine's streams, opened before the verdict is sent (so that its refusals keep their status): one for
        `n == 1`; for `n > 1` one per choice (`n: 1`, the seed plus the choice's index, as the local backend streams
        them), since engines such as `transformers serve` ignore `n`."""
        body = self.forward_body(request, safety)
        bodies = [body] if request.n <= 1 else [_single_choice(body, i) for i in range(request.n)]
        streams = []
        try:
            for one in bodies:
                streams.append(await self.upstream.stream_chat(one))
        except BaseException:
            await _close_all(streams)
            raise
        return streams

    def _stream_usage(self, texts: dict, completion_tokens: list, prompt_tokens: int) -> Usage:
        if all(count is not None for count in completion_tokens):
            return Usage(prompt_tokens, sum(int(count) for count in completion_tokens))
        choices = [Choice(i, "".join(parts), "stop") for i, parts in sorted(texts.items())]
        return _usage(None, prompt_tokens, choices, self._processor.tokenizer)

    async def _stream_refusal(self, request, safety, prompt_tokens) -> AsyncIterator[StreamEvent]:
        result = self._refusal(request, safety, prompt_tokens)
        yield StreamEvent("verdict", safety=safety)
        for choice in result.choices:
            if choice.text:
                yield StreamEvent("delta", index=choice.index, text=choice.text)
            yield StreamEvent("finish", index=choice.index, finish_reason="content_filter")
        if request.include_usage:
            yield StreamEvent("usage", usage=result.usage)

    # -- draining --------------------------------------------------------------------------------------------------

    def _tracked(self):
        return _InFlight(self)


class _InFlight:
    """Counts a request in flight, so that `close()` waits for it; refuses new ones once closing."""

    def __init__(self, backend: GateBackend):
        self.backend = backend

    async def __aenter__(self):
        if self.backend._closing:
            raise ServiceUnavailable("The server is shutting down; retry on another replica.")
        self.backend._in_flight += 1
        self.backend._idle.clear()

    async def __aexit__(self, *exc_info):
        self.backend._in_flight -= 1
        if self.backend._in_flight == 0:
            self.backend._idle.set()
        return False


async def _close_all(streams: list):
    """Closes the engine's streams (each closes its connection even if never read); shielded, so that a cancelled
    request still closes them."""
    for stream in streams:
        await asyncio.shield(stream.aclose())


def _checked(result):
    if result.error is not None:
        raise ServingError(str(result.error), status=400)
    return result


def _add_hint(message: dict, hint: str, placement: str):
    """Adds `hint` to `message` (OpenAI or processor chat format) as `placement` says."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + hint if placement == HINT_APPENDED else [
            {"type": "text", "text": content},
            {"type": "text", "text": hint},
        ]
        return
    content = list(content or [])
    text_parts = [i for i, part in enumerate(content) if part.get("type") == "text"]
    if placement == HINT_APPENDED and text_parts:
        last = text_parts[-1]
        content[last] = {**content[last], "text": content[last]["text"] + hint}
    else:
        content.append({"type": "text", "text": hint})
    message["content"] = content


def _inline_fetched_images(messages: list[dict], images: list):
    """Replaces each `image_url` part whose URL is not a data URL by a PNG data URL of the decoded image judged for
    it (`images` are in order of appearance)."""
    parts = [part for message in messages if isinstance(message.get("content"), list) for part in message["content"]]
    image_parts = [part for part in parts if isinstance(part, dict) and part.get("type") == "image_url"]
    if len(image_parts) != len(images):
        raise ServingError(f"The request has {len(image_parts)} image parts but {len(images)} decoded images.")
    for part, image in zip(image_parts, images):
        url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
        if isinstance(url, str) and url.startswith("data:"):
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        inline = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        part["image_url"] = {**part["image_url"], "url": inline} if isinstance(part.get("image_url"), dict) else inline


def _choice(raw: dict, index: int) -> Choice:
    message = raw.get("message") or {}
    finish = raw.get("finish_reason") or "stop"
    finish = finish if finish in ("stop", "length", "content_filter") else "stop"
    return Choice(index, message.get("content") or "", finish)


def _single_choice(body: dict, index: int) -> dict:
    one = {**body, "n": 1}
    if isinstance(body.get("seed"), int):
        one["seed"] = body["seed"] + index
    return one


def _chunk_events(chunk: dict, texts: dict[int, list[str]], offset: int = 0):
    for raw in chunk.get("choices") or []:
        index = int(raw.get("index", 0)) + offset
        text = (raw.get("delta") or {}).get("content")
        if text:
            texts.setdefault(index, []).append(text)
            yield StreamEvent("delta", index=index, text=text)
        finish = raw.get("finish_reason")
        if finish:
            texts.setdefault(index, [])
            yield StreamEvent("finish", index=index, finish_reason=finish if finish in ("stop", "length") else "stop")


def _usage(upstream_usage, prompt_tokens: int, choices: list[Choice], tokenizer) -> Usage:
    """The upstream's token counts when it reports them; otherwise the prompt's (this tokenizer, images expanded) and
    each answer's text re-tokenized with this model's tokenizer: an estimate (a decoded text need not re-tokenize
    into the tokens that produced it), for engines that send no usage in streams (`transformers serve`)."""
    if isinstance(upstream_usage, dict) and "completion_tokens" in upstream_usage:
        return Usage(int(upstream_usage.get("prompt_tokens", prompt_tokens)), int(upstream_usage["completion_tokens"]))
    return Usage(prompt_tokens, sum(len(tokenizer.encode(c.text, add_special_tokens=False)) for c in choices))


def build_gate_backend(settings: BackendSettings) -> GateBackend:
    """The gate for `settings` (`--model`, `--upstream`, `--upstream-model`, ...), for a head-only SafeLlava of any base
    (`bases.BASES`). Raises a one-line `ValueError` for a stock checkpoint, and for a model whose language model is
    not its stock base's (`num_llm_safety_tokens` > 0)."""
    from transformers import PretrainedConfig

    from ..bases import BASES, base_for_model_type, base_for_stock_model_type
    from .verdict import load_safe_config

    if not settings.upstream or not settings.upstream_model:
        raise ValueError("Gate mode needs both --upstream URL and --upstream-model NAME.")
    model_type = PretrainedConfig.get_config_dict(settings.model)[0].get("model_type")
    if model_type not in [base.model_type for base in BASES]:
        stock = base_for_stock_model_type(model_type)
        hint = (
            f"it is a stock {stock.stock_class_name} checkpoint: serve it on the engine (--upstream-model) and give "
            f"--model the head-only SafeLlava ({stock.model_type}) trained on it"
            if stock is not None
            else "give --model a head-only SafeLlava checkpoint"
        )
        raise ValueError(
            f"Gate mode serves a head-only SafeLlava checkpoint (model_type one of "
            f"{[base.model_type for base in BASES]}); {settings.model!r} has model_type {model_type!r}: {hint}."
        )
    config = load_safe_config(settings.model)
    if config.num_llm_safety_tokens != 0:
        stock_name = base_for_model_type(model_type).stock_class_name
        raise ValueError(
            f"Gate mode needs a head-only SafeLlava (num_llm_safety_tokens=0), but {settings.model!r} has "
            f"num_llm_safety_tokens={config.num_llm_safety_tokens}: its language model reads safety tokens that an "
            f"upstream serving the stock {stock_name} lacks. Serve it without --upstream."
        )
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    verdict_model = SafetyVerdictModel.from_pretrained(settings.model, device=device, dtype=settings.dtype)
    upstream = UpstreamClient(
        settings.upstream, settings.upstream_model, settings.upstream_api_key, settings.upstream_timeout_s
    )
    return GateBackend(verdict_model, upstream, settings)
