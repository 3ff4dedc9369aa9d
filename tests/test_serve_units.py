"""`safe-llava serve`'s parts without a server: image decoding and its SSRF guard, request validation, the
micro-batcher, stop sequences and the moderation schema. The live server is tested in tests/test_serve.py."""

import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from modeling_safe_llava.serving.app import moderation_result
from modeling_safe_llava.serving.backend import Arrivals, Overloaded, ServiceUnavailable, ServingError
from modeling_safe_llava.serving.batching import MicroBatcher
from modeling_safe_llava.serving.images import ImagePolicy, decode_image_url, is_public_address
from modeling_safe_llava.serving.local import _held_back, cut_at_stop
from modeling_safe_llava.serving.schemas import RequestLimits, parse_chat_request, parse_moderation_request
from modeling_safe_llava.serving.server import is_loopback
from bases import BASE_NAMES, BASES


RISKY = ["Politics", "Illegal Risk", "Insults and Bullying", "Fairness", "Privacy", "Misleading"]
TYPES = [*RISKY, "Clean"]


def png_bytes(size=(8, 8), image_format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format=image_format)
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


# -- images ---------------------------------------------------------------------------------------------------------


def test_a_data_url_decodes_to_an_upright_rgb_image():
    image = decode_image_url(data_url(png_bytes((10, 6))), ImagePolicy(), "p")
    assert image.mode == "RGB" and image.size == (10, 6)


def test_exif_orientation_is_applied_as_the_processor_does():
    image = Image.new("RGB", (10, 6), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image_url(data_url(buffer.getvalue(), "jpeg"), ImagePolicy(), "p").size == (6, 10)


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "data:image/<format>;base64"),
        (data_url(b"hello, not an image"), "not an image"),
        ("file:///etc/passwd", "file: URLs"),
        ("/etc/passwd", "local paths"),
        ("C:\\Windows\\win.ini", "local paths"),
        ("ftp://example.com/a.png", "local paths and other schemes"),
        ("http://example.com/a.png", "image URLs are turned off"),
        ("", "non-empty string"),
    ],
)
def test_bad_image_urls_raise_a_400_that_names_the_problem(url, fragment):
    with pytest.raises(ServingError) as info:
        decode_image_url(url, ImagePolicy(), "messages[0].content[0].image_url")
    assert info.value.status == 400 and fragment in info.value.message
    assert info.value.param == "messages[0].content[0].image_url"


def test_pixel_and_byte_caps_are_checked_before_decoding():
    big = png_bytes((400, 400))
    with pytest.raises(ServingError, match="more than this server's cap") as info:
        decode_image_url(data_url(big), ImagePolicy(max_pixels=100 * 100), "p")
    assert info.value.code == "image_too_large"
    with pytest.raises(ServingError, match="larger than 100 bytes"):
        decode_image_url(data_url(big), ImagePolicy(max_bytes=100), "p")


@pytest.mark.parametrize("side, fragment", [(9000, "9000x9000 pixels, more than"), (14000, "decompression bomb")])
def test_a_decompression_bomb_is_refused_from_its_header(side, fragment):
    # A 1-bit PNG of side x side compresses to a few kB and would decode to side**2 pixels (14000: 196 M, past
    # Pillow's own bomb limit, so Pillow refuses to open it at all).
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(ServingError, match=fragment) as info:
        decode_image_url(data_url(buffer.getvalue()), ImagePolicy(), "p")
    assert info.value.code == "image_too_large"


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False),
        ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
        ("0.0.0.0", False), ("224.0.0.1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True), ("not an address", False),
    ],
)  # fmt: skip
def test_only_public_addresses_may_be_contacted(address, public):
    assert is_public_address(address) is public


class _ImageServer:
    """A local HTTP server: /image.png serves a PNG, /redirect-private redirects to the metadata address,
    /redirect-ok redirects to /image.png, /huge announces 10 MB."""

    def __init__(self):
        body = png_bytes((9, 7))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                routes = {
                    "/redirect-private": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
                    "/redirect-ok": (302, {"Location": "/image.png"}, b""),
                    "/image.png": (200, {"Content-Type": "image/png"}, body),
                    "/huge": (200, {"Content-Length": str(10_000_000)}, b""),
                }
                status, headers, payload = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _policy_with_fake_public_host(**kwargs) -> ImagePolicy:
    """`images.test` resolves to 127.0.0.1, which this policy alone treats as public (the test's stand-in for a
    public image host); every other name uses the real resolver and the real address check."""
    def resolve(host, port):
        return ["127.0.0.1"] if host == "images.test" else __import__("socket").gethostbyname_ex(host)[2]

    return ImagePolicy(allow_urls=True, resolve=resolve, is_allowed_address=lambda a: a == "127.0.0.1" or is_public_address(a), **kwargs)


def test_url_fetching_follows_redirects_and_decodes():
    with _ImageServer() as server:
        image = decode_image_url(f"http://images.test:{server.port}/redirect-ok", _policy_with_fake_public_host(), "p")
    assert image.size == (9, 7)


def test_a_redirect_to_the_metadata_address_is_refused_before_it_is_contacted():
    with _ImageServer() as server:
        with pytest.raises(ServingError, match="non-public address") as info:
            decode_image_url(f"http://images.test:{server.port}/redirect-private", _policy_with_fake_public_host(), "p")
    assert info.value.status == 400 and info.value.code == "image_url_not_allowed"


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.png", "http://localhost/a.png", "http://169.254.169.254/", "http://[::1]/x", "http://10.0.0.1/"])
def test_loopback_private_and_metadata_targets_are_refused_with_urls_on(url):
    with pytest.raises(ServingError, match="non-public address"):
        decode_image_url(url, ImagePolicy(allow_urls=True), "p")


def test_a_dns_answer_with_one_private_address_is_refused():
    policy = ImagePolicy(allow_urls=True, resolve=lambda host, port: ["8.8.8.8", "10.0.0.5"])
    with pytest.raises(ServingError, match="non-public address"):
        decode_image_url("http://rebind.test/a.png", policy, "p")


def test_fetched_bodies_are_capped():
    with _ImageServer() as server:
        with pytest.raises(ServingError, match="larger than") as info:
            decode_image_url(f"http://images.test:{server.port}/huge", _policy_with_fake_public_host(max_bytes=1000), "p")
    assert info.value.code == "image_too_large"


# -- request validation ---------------------------------------------------------------------------------------------


def chat_body(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    "body, status, param",
    [
        ([1, 2], 422, None),
        ({"messages": [{"role": "user", "content": "hi"}]}, 422, "model"),
        (chat_body(model="other"), 404, "model"),
        (chat_body(messages="hi"), 422, "messages"),
        (chat_body(messages=[]), 400, "messages"),
        (chat_body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
        (chat_body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "messages[0].content[0].type"),
        (chat_body(messages=[{"role": "user", "content": 5}]), 422, "messages[0].content"),
        (chat_body(temperature="hot"), 422, "temperature"),
        (chat_body(temperature=3), 400, "temperature"),
        (chat_body(top_p=0), 400, "top_p"),
        (chat_body(max_tokens=10**9), 400, "max_tokens"),
        (chat_body(max_tokens=0), 400, "max_tokens"),
        (chat_body(max_completion_tokens=2.5), 422, "max_completion_tokens"),
        (chat_body(n=100), 400, "n"),
        (chat_body(stop=[1]), 422, "stop"),
        (chat_body(seed="x"), 422, "seed"),
        (chat_body(stream="yes"), 422, "stream"),
        (chat_body(tools=[{"type": "function"}]), 400, "tools"),
        (chat_body(logprobs=True), 400, "logprobs"),
        (chat_body(frequency_penalty=0.5), 400, "frequency_penalty"),
        (chat_body(response_format={"type": "json_object"}), 400, "response_format"),
        (chat_body(safety_threshold=1.5), 400, "safety_threshold"),
        (chat_body(safety_threshold="high"), 422, "safety_threshold"),
        (chat_body(safety_threshold={"Weather": 0.3}), 400, "safety_threshold"),
        (chat_body(safety_actions={"Privacy": "delete"}), 400, "safety_actions"),
        (chat_body(safety_actions=["refuse"]), 422, "safety_actions"),
    ],
)  # fmt: skip
def test_chat_requests_are_validated_with_the_right_status_and_param(body, status, param):
    with pytest.raises(ServingError) as info:
        parse_chat_request(body, "m", RISKY, RequestLimits())
    assert (info.value.status, info.value.param) == (status, param), info.value.message


def test_a_valid_chat_request_becomes_the_processor_chat_format():
    url = data_url(png_bytes())
    body = chat_body(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]},
        ],
        max_tokens=5, temperature=0, stop="END", n=2, safety_threshold={"Privacy": 0.2}, safety_actions={"Politics": "allow"},
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    request = parse_chat_request(body, "m", RISKY, RequestLimits())
    assert request.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image"}]},
    ]
    assert len(request.images) == 1 and request.greedy and request.stop == ["END"] and request.n == 2
    assert request.safety_threshold == {"Privacy": 0.2} and request.include_usage and request.max_new_tokens == 5


def test_too_many_images_are_refused_before_any_is_decoded():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}  # never decoded
    body = chat_body(messages=[{"role": "user", "content": [part] * 9}])
    with pytest.raises(ServingError, match="Too many images: 9"):
        parse_chat_request(body, "m", RISKY, RequestLimits(max_images=8))


def test_moderation_inputs_take_strings_lists_and_parts():
    assert [item.text for item in parse_moderation_request({"input": "a"}, "m", RISKY, RequestLimits())] == ["a"]
    assert len(parse_moderation_request({"input": ["a", "b"]}, "m", RISKY, RequestLimits())) == 2
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]
    (item,) = parse_moderation_request({"input": parts, "safety_threshold": 0.3}, "m", RISKY, RequestLimits())
    assert item.text == "look" and len(item.images) == 1 and item.safety_threshold == 0.3
    with pytest.raises(ServingError) as info:
        parse_moderation_request({"input": 5}, "m", RISKY, RequestLimits())
    assert info.value.status == 422


def test_moderation_results_use_the_models_risky_types():
    safety = {
        "judged": True, "risk": 0.8, "flagged": True, "category_name": "Privacy", "action": "refuse",
        "type_probs": [0.0, 0.0, 0.0, 0.0, 0.5, 0.25, 0.25],
    }  # fmt: skip
    result = moderation_result(safety, RISKY, TYPES)
    assert result["flagged"] and result["categories"]["Privacy"] and not result["categories"]["Misleading"]
    assert result["category_scores"]["Privacy"] == pytest.approx(0.4) and set(result["categories"]) == set(RISKY)
    unjudged = moderation_result({"judged": False, "reason": "no image"}, RISKY, TYPES)
    assert not unjudged["flagged"] and not any(unjudged["categories"].values()) and unjudged["safety"]["judged"] is False


# -- stop sequences, loopback -----------------------------------------------------------------------------------------


def test_stop_sequences_cut_the_text_and_streams_hold_back_their_possible_starts():
    assert cut_at_stop("hello END world", ["END"]) == ("hello ", True)
    assert cut_at_stop("hello", ["END"]) == ("hello", False)
    assert _held_back("hello E", ["END"]) == 1 and _held_back("hello EN", ["END", "X"]) == 2 and _held_back("hi", ["END"]) == 0


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("10.0.0.2", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


# -- the micro-batcher ------------------------------------------------------------------------------------------------


def _run(coroutine):
    return asyncio.run(coroutine)


def test_compatible_items_share_a_batch_and_a_bad_item_fails_alone():
    sizes, executor = [], ThreadPoolExecutor(1)

    def run_batch(items):
        if "!!" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def main():
        batcher = MicroBatcher(run_batch, executor, key=len, max_batch_size=8, batch_wait_ms=50, on_batch=sizes.append)
        results = await asyncio.gather(*(batcher.submit(item) for item in ["ab", "cd", "!!", "ef", "xyz"]), return_exceptions=True)
        await batcher.close()
        return results

    results = _run(main())
    assert results[:2] == ["AB", "CD"] and isinstance(results[2], ValueError) and results[3:] == ["EF", "XYZ"]
    assert sizes == [4, 1]  # the four of length 2 together (rerun one by one when "!!" failed), then "xyz" alone


def test_a_full_queue_answers_overloaded_and_close_drains_then_refuses():
    executor, release = ThreadPoolExecutor(1), threading.Event()

    def slow(items):
        release.wait(10)
        return items

    async def main():
        batcher = MicroBatcher(slow, executor, max_batch_size=1, batch_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # 1 is running; 2 and 3 wait
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await batcher.submit(4)
        assert info.value.status == 429 and info.value.retry_after
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            await batcher.submit(5)
        release.set()
        await closing
        return [await first] + [await task for task in waiting]

    assert _run(main()) == [1, 2, 3]


def test_batch_wait_gathers_items_that_arrive_a_little_later():
    sizes, executor = [], ThreadPoolExecutor(1)

    async def main():
        batcher = MicroBatcher(lambda items: items, executor, max_batch_size=4, batch_wait_ms=200, on_batch=sizes.append)
        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(0.01)
        start = time.monotonic()
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return results, time.monotonic() - start

    results, waited = _run(main())
    assert results == [0, 1, 2, 3] and sizes == [4] and waited < 0.2  # a full batch runs without waiting out the window


def test_a_lone_item_runs_at_once_when_no_company_is_on_its_way():
    """`company` (the app's `Arrivals.count`) ends the batch wait when nothing else is coming, and keeps it while
    requests are still being read: a lone request on an idle server does not pay `batch_wait_ms`."""
    sizes, executor, arrivals = [], ThreadPoolExecutor(1), Arrivals()

    async def main():
        batcher = MicroBatcher(lambda items: items, executor, max_batch_size=4, batch_wait_ms=2000, on_batch=sizes.append, company=arrivals.count)
        start = time.monotonic()
        assert await batcher.submit("alone") == "alone"
        lone = time.monotonic() - start
        read, go = asyncio.Event(), asyncio.Event()

        async def arriving():  # a request still being read until `go`; queued, it no longer counts as arriving
            with arrivals.admitted():
                read.set()
                await go.wait()
                result = await batcher.submit("second")
                assert arrivals.count() == 0
                return result

        second = asyncio.ensure_future(arriving())
        await read.wait()
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.05)
        assert not first.done() and arrivals.count() == 1  # the first waits for the arriving one
        go.set()
        results = await asyncio.gather(first, second)
        await batcher.close()
        return lone, results

    lone, results = _run(main())
    assert lone < 1.0 and results == ["first", "second"] and sizes == [1, 2]


def test_the_outbox_hands_fast_steps_over_together_and_a_slow_step_at_once():
    from modeling_safe_llava.serving.local import LoopOutbox

    async def main():
        loop, got = asyncio.get_running_loop(), []
        outbox = LoopOutbox(loop, interval_s=0.2)
        deliver = lambda events: got.append((events, loop.time()))  # noqa: E731
        started = loop.time()
        await loop.run_in_executor(None, outbox.send, [(deliver, ["a"])])  # the first hand-over: at once
        await asyncio.sleep(0.01)
        assert [events for events, _ in got] == [["a"]] and got[0][1] - started < 0.2
        for event in "bcd":  # three steps inside the interval: one hand-over when it is due
            await loop.run_in_executor(None, outbox.send, [(deliver, [event])])
        await asyncio.sleep(0.01)
        assert len(got) == 1
        await asyncio.sleep(0.3)
        assert [events for events, _ in got] == [["a"], ["b", "c", "d"]]  # in one call, in order
        assert got[1][1] - got[0][1] >= 0.19  # when the interval since the first hand-over was up
        await asyncio.sleep(0.25)  # longer than the interval since the last one: the next step goes at once
        sent = loop.time()
        await loop.run_in_executor(None, outbox.send, [(deliver, ["e"])])
        await asyncio.sleep(0.01)
        assert got[-1][0] == ["e"] and got[-1][1] - sent < 0.1

    _run(main())


def test_the_model_card_tells_how_to_serve_the_model():
    from modeling_safe_llava.tiny import build_tiny_safe_llava
    from modeling_safe_llava.tools.model_card import model_facts, render_model_card

    model, _ = build_tiny_safe_llava(seed=0)
    card = render_model_card(model.config, None, None, facts=model_facts(model))
    assert "safe-llava serve --model" in card and "/v1/chat/completions" in card and '"content_filter"' in card


def test_a_mixed_left_padded_batch_gives_each_request_what_it_gets_alone():
    """Hinted, refused and allowed rows with prompts of different lengths, in one `generate` call and one by one."""
    from conftest import random_image
    from modeling_safe_llava.serving.backend import ChatRequest
    from modeling_safe_llava.serving.local import LocalEngine
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    engine = LocalEngine(model, processor)

    def request(i):
        question = "What?" if i % 2 else "Describe the picture, please."
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return ChatRequest("m", [{"role": "user", "content": content}], [random_image(i, 32)], max_new_tokens=10, temperature=0.0)

    requests = [request(i) for i in range(8)]
    together = engine.complete_batch(requests)
    alone = [engine.complete_batch([r])[0] for r in requests]
    assert {result.safety["action"] for result in together} >= {"hint", "refuse"}  # a mixed batch indeed
    for batched, single in zip(together, alone):
        assert batched.choices == single.choices and batched.usage == single.usage and batched.safety == single.safety
    refused = next(result for result in together if result.safety["action"] == "refuse")
    assert refused.choices[0].finish_reason == "content_filter"


def test_a_streamed_batch_with_hints_and_refusals_streams_each_request_as_alone():
    from conftest import random_image
    from modeling_safe_llava.serving.backend import ChatRequest
    from modeling_safe_llava.serving.local import LocalEngine, StreamJob
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    engine = LocalEngine(model, processor)
    content = [{"type": "image"}, {"type": "text", "text": "What?"}]
    requests = [
        ChatRequest("m", [{"role": "user", "content": content}], [random_image(i, 32)], max_new_tokens=10, temperature=0.0, stream=True, include_usage=True)
        for i in range(4)
    ]  # fmt: skip
    events = [[] for _ in requests]
    engine.stream_batch([StreamJob(request, events[i].extend) for i, request in enumerate(requests)])  # no loop: at once
    plain = engine.complete_batch(requests)
    assert {result.safety["action"] for result in plain} >= {"hint", "refuse"}
    for got, answer in zip(events, plain):
        assert [e.kind for e in got].count("verdict") == 1 and got[0].kind == "verdict" and got[0].safety == answer.safety
        assert "".join(e.text for e in got if e.kind == "delta") == answer.choices[0].text
        assert [e.finish_reason for e in got if e.kind == "finish"] == [answer.choices[0].finish_reason]
        assert got[-1].kind == "usage" and got[-1].usage == answer.usage


# -- the app while loading, and the backend's flags -------------------------------------------------------------------


class _FakeBackend:
    """Stands in for a loaded backend (only what /health and /v1/models read)."""

    model_id, created, metrics = "fake", 0, None
    arrivals = Arrivals()

    def queue_depth(self):
        return 0

    def describe(self):
        return {"mode": "fake"}

    async def close(self):
        pass


def test_health_says_loading_with_503_until_the_backend_is_built(tmp_path):
    import json
    import urllib.error
    import urllib.request

    import uvicorn

    from modeling_safe_llava.serving.app import ServerConfig, create_app
    from modeling_safe_llava.serving.server import bind_socket

    release = threading.Event()

    def loader():
        release.wait(30)
        return _FakeBackend()

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(loader, ServerConfig()), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def get(path):
        for _ in range(100):
            try:
                with urllib.request.urlopen(url + path, timeout=5) as response:
                    return response.status, json.loads(response.read()), response.headers
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read()), error.headers
            except urllib.error.URLError:
                time.sleep(0.05)
        raise TimeoutError(path)

    try:
        status, body, headers = get("/health")
        assert (status, body) == (503, {"status": "loading"}) and headers["Retry-After"]
        status, body, headers = get("/v1/models")
        assert status == 503 and "still loading" in body["error"]["message"] and headers["Retry-After"]
        release.set()
        for _ in range(100):
            status, body, _ = get("/health")
            if status == 200:
                break
            time.sleep(0.05)
        assert body == {"status": "ready", "model": "fake", "mode": "fake"}
        assert get("/v1/models")[1]["data"][0]["id"] == "fake"
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_dtype_and_device_flags_reach_the_model(tmp_path):
    import torch

    from modeling_safe_llava.serving.backend import BackendSettings, ChatRequest
    from modeling_safe_llava.serving.local import build_local_backend, default_served_name
    from serving_live import save_tiny_server_model

    folder = save_tiny_server_model(tmp_path / "my-model")
    backend = build_local_backend(BackendSettings(folder, default_served_name(folder), device="cpu", dtype="bfloat16"))
    assert backend.engine.model.dtype == torch.bfloat16 and backend.describe() == {"mode": "local", "device": "cpu", "dtype": "bfloat16"}
    assert default_served_name(folder) == "my-model" and backend.model_id == "my-model"
    content = [{"type": "image"}, {"type": "text", "text": "What?"}]
    request = ChatRequest("my-model", [{"role": "user", "content": content}], [Image.new("RGB", (32, 32), "red")], max_new_tokens=3, temperature=0.0)
    (result,) = backend.engine.complete_batch([request])  # bfloat16 pixels and weights run together
    assert result.safety["judged"] and result.choices[0].finish_reason in ("stop", "length", "content_filter")
    asyncio.run(backend.close())


@pytest.mark.parametrize("base_name", BASE_NAMES)
def test_the_local_backend_serves_every_base_through_the_registry(base_name, tmp_path):
    from modeling_safe_llava.serving.backend import BackendSettings, ChatRequest
    from modeling_safe_llava.serving.local import build_local_backend

    base = BASES[base_name]
    _, safe, processor = base.build_pair()
    safe.config.safety_modules_trained = True
    safe.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    backend = build_local_backend(BackendSettings(str(tmp_path / "m"), "m", device="cpu"))
    assert type(backend.engine.model) is base.safe_model_class
    content = [{"type": "image"}, {"type": "text", "text": "What?"}]
    request = ChatRequest("m", [{"role": "user", "content": content}], [base.random_image(0)], max_new_tokens=2, temperature=0.0)
    (result,) = backend.engine.complete_batch([request])
    assert result.safety["judged"] and result.safety["action"] in ("allow", "hint", "refuse")
    asyncio.run(backend.close())


def test_accepted_connections_send_without_nagle_delay_and_the_openai_client_keeps_them_alive():
    """Each accepted connection has TCP_NODELAY (else every response after the first on a kept-alive connection waits
    for the client's delayed ACK, about 40 ms), and the official client's requests reuse one connection."""
    import socket

    import openai
    import uvicorn

    from modeling_safe_llava.serving.app import ServerConfig, create_app
    from modeling_safe_llava.serving.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(_FakeBackend, ServerConfig()), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused", max_retries=50)
        for _ in range(3):
            assert [model.id for model in client.models.list()] == ["fake"]
        connections = list(server.server_state.connections)
        assert len(connections) == 1, "the openai client's kept-alive requests should share one connection"
        accepted = connections[0].transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client.close()
    finally:
        server.should_exit = True
        thread.join(30)


# -- the stream path: hand-overs, SSE chunks, the response, the collector -------------------------------------------


def test_the_outbox_stops_its_timer_after_a_quiet_interval_and_wakes_at_once_after():
    from modeling_safe_llava.serving.local import LoopOutbox

    async def main():
        loop, got = asyncio.get_running_loop(), []
        outbox = LoopOutbox(loop, interval_s=0.05)
        deliver = lambda events: got.append(events)  # noqa: E731
        await loop.run_in_executor(None, outbox.send, [(deliver, [1]), (deliver, [2])])
        await asyncio.sleep(0.01)
        assert got == [[1, 2]] and outbox._ticking  # one call for the hand-over; the timer looks again later
        await asyncio.sleep(0.15)  # an interval with nothing: the timer stops
        assert not outbox._ticking
        sent = loop.time()
        await loop.run_in_executor(None, outbox.send, [(deliver, [3])])
        await asyncio.sleep(0.01)
        assert got == [[1, 2], [3]] and loop.time() - sent < 0.05

    _run(main())


def test_the_stream_inbox_gives_every_waiting_event_in_order_and_waits_for_more():
    from modeling_safe_llava.serving.local import StreamInbox

    async def main():
        inbox = StreamInbox()
        inbox.put([1, 2])
        inbox.put([3])
        assert await inbox.take() == [1, 2, 3]
        waiting = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        inbox.put([4])
        assert await asyncio.wait_for(waiting, 1) == [4]

    _run(main())


def test_a_hand_over_merges_each_jobs_events_into_one_call_in_order():
    from modeling_safe_llava.serving.local import _deliver_all

    first, second = [], []
    _deliver_all([(first.append, [1]), (second.append, ["a"]), (first.append, [2, 3])])
    assert first == [[1, 2, 3]] and second == [["a"]]


def test_the_gone_rows_criterion_reuses_one_false_tensor_until_a_client_leaves():
    import torch

    from modeling_safe_llava.serving.backend import ChatRequest
    from modeling_safe_llava.serving.local import _GoneRows

    requests = [ChatRequest("m", [], [], max_new_tokens=4) for _ in range(2)]
    gone = _GoneRows(requests, [0, 0, 1])
    ids = torch.zeros(3, 5, dtype=torch.long)
    first, again = gone(ids, None), gone(ids, None)
    assert first is again and first.tolist() == [False, False, False] and not gone.seen
    requests[1].client_gone.set()
    assert gone(ids, None).tolist() == [False, False, True] and gone.seen == {1}
    assert gone(torch.zeros(2, 5, dtype=torch.long), None).tolist() == [False, False]  # other rows: all gone?


@pytest.mark.parametrize("text", ["a", " café 😀 naïve", 'q"\\\n\t\r\u2028', "</script>", ""])
def test_a_content_delta_chunk_is_what_json_dumps_of_the_whole_chunk_gives(text):
    import json

    from modeling_safe_llava.serving.app import ChunkFormatter, _chunk
    from modeling_safe_llava.serving.backend import ChatRequest, StreamEvent

    chat = ChatRequest("m", [], [], max_new_tokens=4, request_id="chatcmpl-1")
    formatter = ChunkFormatter(chat, 'served "model"', 1700000000)
    event = StreamEvent(kind="delta", index=2, text=text)
    expected = {"index": 2, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    assert formatter.event(event) == _chunk(chat, 'served "model"', 1700000000, [expected])
    parsed = json.loads(formatter.event(event)[len("data: ") :])
    assert parsed["choices"] == [expected] and parsed["object"] == "chat.completion.chunk"
    assert parsed["id"] == "chatcmpl-1" and parsed["model"] == 'served "model"' and parsed["created"] == 1700000000


class _Connection:
    """A fake ASGI connection: records what is sent; `receive` answers `http.disconnect` once `leave` is set."""

    def __init__(self):
        self.sent, self.leave = [], asyncio.Event()

    async def send(self, message):
        self.sent.append(message)

    async def receive(self):
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_the_event_stream_sends_each_chunk_once_then_ends_and_marks_the_request_done():
    from modeling_safe_llava.serving.app import _EventStream

    async def chunks():
        yield b"data: 1\n\n"
        yield b"data: 2\n\ndata: 3\n\n"

    async def main():
        connection, gone = _Connection(), threading.Event()
        response = _EventStream(chunks(), gone, headers={"Cache-Control": "no-cache"})
        await response({"type": "http"}, connection.receive, connection.send)
        return connection.sent, gone

    sent, gone = _run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream") and headers[b"cache-control"] == b"no-cache"
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\ndata: 3\n\n", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False] and gone.is_set()


def test_the_event_stream_stops_when_the_client_leaves_and_closes_its_chunks():
    from modeling_safe_llava.serving.app import _EventStream

    closed = []

    async def chunks():
        try:
            yield b"data: 1\n\n"
            await asyncio.Event().wait()  # a stream that would never end
        finally:
            closed.append(True)

    async def main():
        connection, gone = _Connection(), threading.Event()
        response = asyncio.ensure_future(_EventStream(chunks(), gone)({"type": "http"}, connection.receive, connection.send))
        await asyncio.sleep(0.05)
        assert not response.done() and not gone.is_set()
        connection.leave.set()
        await asyncio.wait_for(response, 5)
        return connection.sent, gone

    sent, gone = _run(main())
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n"] and gone.is_set() and closed == [True]


def test_the_event_stream_raises_its_chunks_error_and_still_marks_the_request_done():
    from modeling_safe_llava.serving.app import _EventStream

    async def chunks():
        yield b"data: 1\n\n"
        raise RuntimeError("broken")

    gone = threading.Event()

    async def main():
        connection = _Connection()
        await _EventStream(chunks(), gone)({"type": "http"}, connection.receive, connection.send)

    with pytest.raises(RuntimeError, match="broken"):
        _run(main())
    assert gone.is_set()


@pytest.mark.parametrize("freeze", [True, False])
def test_a_loaded_server_freezes_the_collector_only_when_told(freeze):
    import gc

    from modeling_safe_llava.serving.app import ServerConfig, _load, create_app
    from modeling_safe_llava.serving.metrics import ServingMetrics

    app = create_app(_FakeBackend, ServerConfig(freeze_gc=freeze))
    gc.unfreeze()
    try:
        _run(_load(app, _FakeBackend, ServingMetrics(), None))
        assert app.state.status == "ready" and (gc.get_freeze_count() > 0) == freeze
    finally:
        gc.unfreeze()


def test_safe_llava_serve_freezes_the_collector_once_loaded():
    import argparse

    from modeling_safe_llava.serving.server import add_cli_arguments, server_config

    args = add_cli_arguments(argparse.ArgumentParser()).parse_args(["--model", "m"])
    assert server_config(args, []).freeze_gc


def test_an_urgent_hand_over_goes_at_once_while_the_outbox_is_ticking_and_keeps_one_timer():
    from modeling_safe_llava.serving.local import LoopOutbox

    async def main():
        loop, got = asyncio.get_running_loop(), []
        outbox = LoopOutbox(loop, interval_s=0.3)
        deliver = lambda events: got.append((events, loop.time()))  # noqa: E731
        await loop.run_in_executor(None, outbox.send, [(deliver, ["verdict"])])
        await asyncio.sleep(0.01)
        await loop.run_in_executor(None, outbox.send, [(deliver, ["step"])])
        await asyncio.sleep(0.01)
        assert [events for events, _ in got] == [["verdict"]]  # a plain step waits for the timer
        sent = loop.time()
        await loop.run_in_executor(None, lambda: outbox.send([(deliver, ["end"])], at_once=True))
        await asyncio.sleep(0.01)
        assert [events for events, _ in got] == [["verdict"], ["step", "end"]] and got[-1][1] - sent < 0.2
        pending = [handle for handle in loop._scheduled if not handle.cancelled()]
        assert len(pending) == 1  # the urgent hand-over replaced the timer, not added one

    _run(main())


def test_a_stream_hands_its_verdict_first_text_and_end_over_at_once_and_the_steps_between_on_the_timer():
    from conftest import random_image
    from modeling_safe_llava.serving.backend import ChatRequest
    from modeling_safe_llava.serving.local import LocalEngine, StreamJob
    from modeling_safe_llava.tiny import build_tiny_safe_llava

    class Recording:
        def __init__(self):
            self.calls = []

        def send(self, pairs, at_once=False):
            self.calls.append((at_once, [event.kind for _, events in pairs for event in events]))

    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    engine, outbox = LocalEngine(model, processor), Recording()
    content = [{"type": "image"}, {"type": "text", "text": "What?"}]
    request = ChatRequest("m", [{"role": "user", "content": content}], [random_image(0, 32)], max_new_tokens=12,
                          temperature=0.0, stream=True, include_usage=True, safety_threshold=1.0)  # fmt: skip
    engine.stream_batch([StreamJob(request, lambda events: None, outbox)])
    urgent = [kinds for at_once, kinds in outbox.calls if at_once]
    first_text = next(index for index, (_, kinds) in enumerate(outbox.calls) if "delta" in kinds)
    assert urgent[0] == ["verdict"] and outbox.calls[first_text][0] and urgent[-1][-2:] == ["finish", "usage"]
    later = [at_once for at_once, kinds in outbox.calls[first_text + 1 :] if "finish" not in kinds]
    assert later and not any(later)  # the steps between wait for the outbox's timer


@pytest.mark.parametrize("value, ok", [("0", True), ("12.5", True), ("-1", False), ("nan", False)])
def test_the_stream_interval_flag_takes_milliseconds_from_zero_up(value, ok):
    import argparse

    from modeling_safe_llava.serving.server import add_cli_arguments, backend_settings, check_args

    args = add_cli_arguments(argparse.ArgumentParser()).parse_args(["--model", "m", "--stream-interval-ms", value])
    if ok:
        check_args(args, [])
        assert backend_settings(args).stream_interval_ms == float(value)
    else:
        with pytest.raises(ValueError, match="--stream-interval-ms must be at least 0"):
            check_args(args, [])


@pytest.mark.parametrize("stops", [[], ["mat"], ["zzz"]])
def test_a_streamed_rows_pieces_join_to_the_whole_decode_cut_at_a_stop(stops):
    from types import SimpleNamespace

    from modeling_safe_llava.serving.local import _RowText, cut_at_stop
    from modeling_safe_llava.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.encode("A cat sits on a mat, naïve café 😀 and more.", add_special_tokens=False)
    row = _RowText(SimpleNamespace(eos_ids=set(), tokenizer=tokenizer), stops)
    pieces = [row.add([token]) for token in ids] + [row.finish()]
    expected, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops)
    assert "".join(pieces) == expected and row.stopped == stopped
