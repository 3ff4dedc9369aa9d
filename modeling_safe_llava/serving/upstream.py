"""An async client for the OpenAI-compatible engine behind a gate (`safe-llava serve --upstream URL`): vLLM, SGLang or
`transformers serve`, serving the stock LLaVA weights.

`UpstreamClient.chat(body)` posts a chat completion and returns its JSON; `UpstreamClient.stream_chat(body)` opens a
streamed one (call it, check nothing was raised, then iterate the chunks). Every failure becomes a `ServingError` in
OpenAI's schema, never a traceback:

- the upstream cannot be reached: 503 (`upstream_unavailable`, with `Retry-After`);
- it does not answer in time: 504 (`upstream_timeout`);
- it answers 5xx, or something that is not an OpenAI response: 502 (`upstream_error`), without the engine's text;
- it rejects the request (4xx): the same status, with the upstream's own message (429 and 503 keep `Retry-After`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx2

from .backend import ServingError, UpstreamError


logger = logging.getLogger(__name__)

_SSE_DATA = "data:"
_SSE_DONE = "[DONE]"


class UpstreamClient:
    """
    Args:
        base_url (`str`): the upstream's OpenAI base URL, e.g. `http://127.0.0.1:8000/v1` (a URL without `/v1` gets it).
        model (`str`): the model name the upstream serves (`--upstream-model`), sent in every request.
        api_key (`str`, *optional*): sent as `Authorization: Bearer ...`.
        timeout_s (`float`): seconds to wait for the upstream (connect, and between streamed bytes).
        transport (`httpx2.AsyncBaseTransport`, *optional*): for tests of the error mapping.
    """

    def __init__(self, base_url: str, model: str, api_key=None, timeout_s: float = 600.0, transport=None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}.")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx2.Timeout(timeout_s, connect=min(10.0, timeout_s))
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64)
        self._client = httpx2.AsyncClient(
            headers=headers, timeout=timeout, limits=limits, transport=transport, trust_env=False
        )

    async def chat(self, body: dict) -> dict:
        """A non-streamed chat completion: the upstream's JSON (`body` is sent as it is, with `stream: false`)."""
        body = {**body, "model": self.model, "stream": False}
        body.pop("stream_options", None)
        try:
            response = await self._client.post(f"{self.base_url}/chat/completions", json=body)
        except httpx2.HTTPError as error:
            raise _transport_error(error) from None
        if response.status_code != 200:
            raise _status_error(response.status_code, response.headers, response.content)
        try:
            answer = response.json()
        except ValueError:
            raise UpstreamError("The upstream engine answered something that is not JSON.") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise UpstreamError("The upstream engine's answer is not a chat completion (no 'choices' list).")
        return answer

    async def stream_chat(self, body: dict) -> UpstreamStream:
        """Opens a streamed chat completion; raises here (before any chunk) when the upstream refuses or fails. The
        returned `UpstreamStream` yields each chunk's JSON and closes the connection when it ends or is closed."""
        # Token counts from the engine where it gives them (vLLM, SGLang); the gate sends usage on only when asked.
        body = {**body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        request = self._client.build_request("POST", f"{self.base_url}/chat/completions", json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx2.HTTPError as error:
            raise _transport_error(error) from None
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            raise _status_error(response.status_code, response.headers, content)
        return UpstreamStream(response)

    async def health(self) -> bool:
        """Whether the upstream answers `GET /v1/models` (for `/health`'s description)."""
        try:
            response = await self._client.get(f"{self.base_url}/models", timeout=5.0)
        except httpx2.HTTPError:
            return False
        return response.status_code < 500

    async def close(self):
        await self._client.aclose()


class UpstreamStream:
    """One streamed answer of the engine: an async iterator of its chunks' JSON. `aclose()` closes the connection, read
    to its end or not (even if never iterated), so that the engine sees its client leave and aborts the generation."""

    def __init__(self, response):
        self.response = response
        self._chunks = _chunks(response)

    def __aiter__(self) -> AsyncIterator[dict]:
        return self._chunks

    async def aclose(self):
        await self._chunks.aclose()
        await asyncio.shield(self.response.aclose())


async def _chunks(response) -> AsyncIterator[dict]:
    try:
        async for line in response.aiter_lines():
            if not line.startswith(_SSE_DATA):
                continue  # blank separators, comments, event names
            data = line[len(_SSE_DATA) :].strip()
            if data == _SSE_DONE:
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamError("The upstream engine streamed a chunk that is not JSON.") from None
            if isinstance(chunk, dict) and "error" in chunk:  # its text stays out of the answer (see _status_error)
                logger.warning("Upstream stream failed")
                raise UpstreamError("The upstream engine failed while streaming.")
            yield chunk
    except httpx2.HTTPError as error:
        raise _transport_error(error) from None
    finally:
        await asyncio.shield(response.aclose())


def _transport_error(error: Exception) -> ServingError:
    if isinstance(error, httpx2.TimeoutException):
        return ServingError(
            "The upstream engine did not answer in time.", status=504, type="upstream_error", code="upstream_timeout"
        )
    if isinstance(error, (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError)):
        logger.warning("Upstream unreachable: %s", type(error).__name__)
        return ServingError(
            "The upstream engine cannot be reached; retry later.",
            status=503,
            type="upstream_error",
            code="upstream_unavailable",
            retry_after=5,
        )
    return UpstreamError(f"The request to the upstream engine failed ({type(error).__name__}).")


def _status_error(status: int, headers, content: bytes) -> ServingError:
    if status >= 500 and status != 503:  # the engine's own text stays out: it may hold a traceback
        logger.warning("Upstream answered %d", status)
        return UpstreamError(f"The upstream engine failed (HTTP {status}); retry, or report it to its operator.")
    message = _message_of(_json_or_none(content)) or f"HTTP {status}"
    retry_after = headers.get("retry-after")
    default_retry = 5 if status in (429, 503) else None
    return ServingError(
        f"The upstream engine rejected the request: {message}",
        status=status,
        type="upstream_error" if status == 503 else "invalid_request_error",
        code="upstream_rejected",
        retry_after=int(retry_after) if retry_after and retry_after.isdigit() else default_retry,
    )


def _json_or_none(content: bytes):
    try:
        return json.loads(content)
    except ValueError:
        return None


def _message_of(payload) -> str:
    """The human message in an error body: OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}`, or a string."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail"))
        if isinstance(error, dict):
            error = error.get("message", "")
        return str(error)[:500] if error is not None else ""
    return ""
