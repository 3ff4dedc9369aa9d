"""`safe-llava serve`: flags, checks, and running the app on uvicorn.

The command binds its socket first (a busy port fails at once), then starts the server; the model loads in a worker
thread while `/health` answers `loading`. A model that cannot be served (missing, untrained, gate mode on a model with
LLM safety tokens, ...) stops the server with one line on stderr and exit code 2. On SIGTERM (or Ctrl-C) the server
stops accepting connections, finishes the requests in flight and drains its queues, then exits with code 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
from pathlib import Path

from .backend import BackendSettings


API_KEY_ENV = "SAFE_LLAVA_API_KEY"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_cli_arguments(parser):
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="Folder of a saved SafeLlava (or a Hub id).")
    model.add_argument("--served-model-name", default=None, help="The `model` requests name (default: the folder's name).")
    model.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available).")
    model.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights' dtype (default: the checkpoint's).")
    net = parser.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only).")
    net.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000; 0: any free port).")
    net.add_argument("--api-key-file", default=None, help=f"file of accepted API keys, one per line (also: ${API_KEY_ENV}).")
    net.add_argument("--allow-unauthenticated", action="store_true", help="bind a non-loopback address without an API key.")
    net.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs of public hosts (default: data URLs only).")
    net.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds to fetch one image URL (default: 10).")
    net.add_argument("--max-request-mb", type=float, default=20.0, help="request body cap in MiB (default: 20).")
    net.add_argument("--max-image-mb", type=float, default=10.0, help="encoded size cap of one image in MiB (default: 10).")
    net.add_argument("--max-image-pixels", type=int, default=16_000_000, help="pixel cap of one image (default: 16000000).")
    net.add_argument("--max-images", type=int, default=8, help="images per request at most (default: 8).")
    net.add_argument("--log-requests", action="store_true", help="log prompt texts (never image bytes); off by default.")
    gen = parser.add_argument_group("generation and batching")
    gen.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask (default: 2048).")
    gen.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request names none (default: 256).")
    gen.add_argument("--max-n", type=int, default=8, help="largest n a request may ask (default: 8).")
    gen.add_argument("--max-batch-size", type=int, default=8, help="rows per model call at most (default: 8).")
    gen.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for batch company while more requests are arriving (default: 5).")
    gen.add_argument("--max-queue", type=int, default=64, help="waiting requests at most; more get 429 (default: 64).")
    gen.add_argument("--stream-interval-ms", type=float, default=20.0, help="streaming: decoding steps faster than this reach the HTTP layer together, each still its own chunk; 0: every step at once (default: 20).")
    gen.add_argument("--shutdown-timeout", type=float, default=120.0, help="seconds to finish in-flight requests on SIGTERM (default: 120).")
    gate = parser.add_argument_group("gate mode (a head-only SafeLlava in front of an OpenAI-compatible engine)")
    gate.add_argument("--upstream", default=None, help="base URL of the engine serving the stock LLaVA, e.g. http://127.0.0.1:8001/v1.")
    gate.add_argument("--upstream-model", default=None, help="the model name the upstream serves.")
    gate.add_argument("--upstream-api-key-env", default=None, help="environment variable that holds the upstream's API key.")
    gate.add_argument("--upstream-timeout", type=float, default=600.0, help="seconds to wait for the upstream (default: 600).")
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------------------------


def read_api_keys(api_key_file: str | None) -> list[str]:
    """Keys from `--api-key-file` (one per line; blank lines and `#` comments skipped) and `$SAFE_LLAVA_API_KEY`."""
    keys = []
    if api_key_file is not None:
        lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {api_key_file} holds no key (one key per line).")
    if os.environ.get(API_KEY_ENV, "").strip():
        keys.append(os.environ[API_KEY_ENV].strip())
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args, api_keys: list[str]):
    """Raises ValueError for flags that cannot work together, before anything is bound or loaded."""
    if not api_keys and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve on {args.host} without an API key: give --api-key-file or ${API_KEY_ENV}, bind "
            "127.0.0.1, or pass --allow-unauthenticated."
        )
    if not Path(args.model).is_dir() and not HUB_ID.match(args.model):
        raise ValueError(f"--model must be a folder written by save_pretrained or a Hub id, got {args.model!r}.")
    for name in ("max_batch_size", "max_queue", "max_tokens_limit", "default_max_tokens", "max_n", "max_images", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if not args.stream_interval_ms >= 0:
        raise ValueError(f"--stream-interval-ms must be at least 0, got {args.stream_interval_ms}.")
    if (args.upstream is None) != (args.upstream_model is None):
        raise ValueError("gate mode needs both --upstream URL and --upstream-model NAME.")
    if args.upstream_api_key_env is not None and args.upstream is None:
        raise ValueError("--upstream-api-key-env is for gate mode: give --upstream and --upstream-model too.")
    if args.upstream_api_key_env is not None and not os.environ.get(args.upstream_api_key_env):
        raise ValueError(f"--upstream-api-key-env names {args.upstream_api_key_env}, which is not set.")


def backend_settings(args) -> BackendSettings:
    from .local import default_served_name

    return BackendSettings(
        model=args.model, served_model_name=args.served_model_name or default_served_name(args.model),
        device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, stream_interval_ms=args.stream_interval_ms, max_new_tokens_limit=args.max_tokens_limit,
        upstream=args.upstream,
        upstream_model=args.upstream_model, upstream_timeout_s=args.upstream_timeout,
        upstream_api_key=os.environ.get(args.upstream_api_key_env) if args.upstream_api_key_env else None,
    )


def server_config(args, api_keys: list[str]):
    from .app import ServerConfig
    from .images import ImagePolicy
    from .schemas import RequestLimits

    images = ImagePolicy(
        allow_urls=args.allow_image_urls, max_bytes=int(args.max_image_mb * 1024 * 1024),
        max_pixels=args.max_image_pixels, fetch_timeout_s=args.image_fetch_timeout,
    )
    limits = RequestLimits(
        max_new_tokens=args.max_tokens_limit, default_max_new_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_images=args.max_images, max_n=args.max_n, images=images,
    )
    return ServerConfig(
        api_keys=api_keys, limits=limits, max_body_bytes=int(args.max_request_mb * 1024 * 1024),
        log_requests=args.log_requests, freeze_gc=True,
    )


def backend_loader(settings: BackendSettings):
    """The function that builds the backend (in a worker thread once the server runs)."""
    if settings.upstream is None:
        from .local import build_local_backend

        return lambda: build_local_backend(settings)
    try:
        from .gate import build_gate_backend
    except ImportError as error:
        raise ValueError(f"gate mode is not available in this install ({error}).") from None
    return lambda: build_gate_backend(settings)


# ------------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening TCP socket, bound now so that a busy port fails at once.

    It is created with protocol `IPPROTO_TCP`: asyncio sets `TCP_NODELAY` on accepted connections only for such a
    socket. Without it, Nagle's algorithm holds each response's body until the client's delayed ACK (about 40 ms on
    every response after the first on a kept-alive connection, which is how the `openai` client connects).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def run_from_args(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise ValueError(f"safe-llava serve needs the serve extra: pip install 'safe-llava[serve]' ({error}).") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # stderr stays for warnings and the one-line error
    api_keys = read_api_keys(args.api_key_file)
    check_args(args, api_keys)
    settings = backend_settings(args)
    loader = backend_loader(settings)
    sock = bind_socket(args.host, args.port)
    holder = {}
    app = create_app(loader, server_config(args, api_keys), on_load_error=lambda error: holder["server"].handle_exit(signal.SIGTERM, None))
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    config = uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=False, timeout_graceful_shutdown=args.shutdown_timeout,
        lifespan="on",
    )
    server = holder["server"] = uvicorn.Server(config)
    _log_address(sock)
    with _quiet_signal_reraise():
        server.run(sockets=[sock])
    if app.state.load_error is not None:
        error = app.state.load_error
        raise error if isinstance(error, (ValueError, OSError)) else ValueError(f"cannot serve {args.model}: {error}")
    return 0


def _log_address(sock):
    host, port = sock.getsockname()[:2]
    logging.getLogger("modeling_safe_llava.serving").info("listening on http://%s:%d", host, port)


class _quiet_signal_reraise:
    """uvicorn re-raises the SIGTERM / SIGINT it handled once it has shut down gracefully; a no-op handler for
    SIGTERM during the run makes that re-raise harmless, so a graceful stop exits with code 0."""

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


__all__ = ["add_cli_arguments", "run_from_args", "read_api_keys", "is_loopback"]
