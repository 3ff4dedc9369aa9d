"""Images in requests: `image_url` values turned into RGB PIL images, safely.

- `data:image/...;base64,...` URLs are always accepted (the default and only form unless told otherwise).
- `http(s)://` URLs only with `--allow-image-urls`. The host's every DNS answer must be a public address (no
  loopback, private, link-local, carrier-grade NAT, multicast, reserved or cloud-metadata address); the connection
  goes to the address that was checked (no second lookup to rebind), redirects are followed by hand and each target
  is checked the same way; the body is read up to a byte cap within a timeout.
- `file:` URLs, local paths and any other scheme are always refused.
- Before decoding, the image's declared size is checked against a pixel cap (decompression bombs); decoding is the
  project's one loader (`load_image`: first frame, EXIF orientation applied, as the processor renders it).

Every problem raises `ServingError` (400) with a message that names it and the accepted forms; image bytes never
appear in a message or a log.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image

from ..fileio import load_image
from .backend import ServingError


ACCEPTED_FORMS = "a data URL (data:image/png;base64,...)"
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_REDIRECTS = 3


@dataclass
class ImagePolicy:
    """
    What image inputs a server accepts.

    Attributes:
        allow_urls (`bool`): fetch http(s) URLs (`--allow-image-urls`); off: data URLs only.
        max_bytes (`int`): encoded size cap of one image (data URL payload or fetched body).
        max_pixels (`int`): width x height cap of one image, checked before decoding.
        fetch_timeout_s (`float`): total time for fetching one URL, redirects included.
        resolve (`Callable[[str, int], list[str]]`): host, port -> addresses (default: the system resolver).
        is_allowed_address (`Callable[[str], bool]`): whether an address may be contacted (default: public only).
    """

    allow_urls: bool = False
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 16_000_000
    fetch_timeout_s: float = 10.0
    resolve: Callable[[str, int], list[str]] | None = None
    is_allowed_address: Callable[[str], bool] | None = None

    def accepted_forms(self) -> str:
        return ACCEPTED_FORMS + (" or an http(s) URL of a public host" if self.allow_urls else "")


def image_error(message: str, param: str, code: str = "invalid_image") -> ServingError:
    return ServingError(message, status=400, param=param, code=code)


def decode_image_url(url, policy: ImagePolicy, param: str) -> Image.Image:
    """The image an `image_url` names, as RGB (see the module docstring). Blocking: call it off the event loop."""
    if not isinstance(url, str) or not url:
        raise image_error(f"{param} must be a non-empty string: {policy.accepted_forms()}.", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image_bytes(_data_url_bytes(url, policy, param), policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            raise image_error(
                f"{param}: image URLs are turned off on this server; send {ACCEPTED_FORMS} (the server's operator "
                "can allow http(s) URLs with --allow-image-urls).", param, code="image_url_not_allowed",
            )
        return decode_image_bytes(fetch_image(url, policy, param), policy, param)
    raise image_error(
        f"{param}: {'file: URLs' if scheme == 'file' else 'local paths and other schemes'} are never accepted; send "
        f"{policy.accepted_forms()}.", param, code="image_url_not_allowed",
    )


def _data_url_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise image_error(f"{param}: a data URL must look like data:image/<format>;base64,<data>.", param)
    if len(payload) > (policy.max_bytes * 4) // 3 + 4:
        raise image_error(f"{param}: the image is larger than {policy.max_bytes} bytes.", param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise image_error(f"{param}: the data URL's payload is not valid base64.", param) from None


def decode_image_bytes(data: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    """Checks the format and the declared size before decoding, then decodes with the project's loader."""
    if len(data) > policy.max_bytes:
        raise image_error(f"{param}: the image is larger than {policy.max_bytes} bytes.", param, code="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            image_format, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError:
        raise image_error(
            f"{param}: the image declares more pixels than this server's cap of {policy.max_pixels} (a decompression "
            "bomb?).", param, code="image_too_large",
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise image_error(f"{param}: the bytes are not an image Pillow can read ({', '.join(ALLOWED_FORMATS)}).", param) from None
    if image_format not in ALLOWED_FORMATS:
        raise image_error(f"{param}: {image_format} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}.", param)
    if width * height > policy.max_pixels:
        raise image_error(
            f"{param}: the image is {width}x{height} pixels, more than this server's cap of {policy.max_pixels}.",
            param, code="image_too_large",
        )
    try:
        return load_image(data)
    except ValueError:
        raise image_error(f"{param}: the image could not be decoded (corrupt or truncated).", param) from None


# ------------------------------------------------------------------------------------------------------------------
# http(s) fetching, with SSRF protection
# ------------------------------------------------------------------------------------------------------------------


def is_public_address(address: str) -> bool:
    """True only for a globally routable unicast address (an IPv4-mapped IPv6 address is judged as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved)


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def fetch_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The body at `url`, following at most `MAX_REDIRECTS` redirects, each target checked before it is contacted."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _fetch_once(url, policy, param, deadline)
        if location is None:
            if status != 200:
                raise image_error(f"{param}: fetching the image failed with HTTP status {status}.", param, code="image_fetch_failed")
            return body
        url = urljoin(url, location)
    raise image_error(f"{param}: more than {MAX_REDIRECTS} redirects.", param, code="image_fetch_failed")


def _checked_target(url: str, policy: ImagePolicy, param: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, address): the URL's parts and the one address that will be contacted."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise image_error(f"{param}: only http(s) URLs with a host can be fetched (a redirect went elsewhere).", param, code="image_url_not_allowed")
    if parts.username or parts.password:
        raise image_error(f"{param}: URLs with credentials are not fetched.", param, code="image_url_not_allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise image_error(f"{param}: the URL's port is not valid.", param, code="image_url_not_allowed") from None
    resolve = policy.resolve or system_resolve
    allowed = policy.is_allowed_address or is_public_address
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError):
        raise image_error(f"{param}: the image's host could not be resolved.", param, code="image_fetch_failed") from None
    if not addresses or not all(allowed(address) for address in addresses):
        raise image_error(
            f"{param}: the image's host resolves to a loopback, private, link-local or otherwise non-public address; "
            "only public hosts are fetched.", param, code="image_url_not_allowed",
        )
    return parts.scheme, parts.hostname, port, addresses[0]


def _fetch_once(url, policy, param, deadline) -> tuple[int, str | None, bytes]:
    scheme, host, port, address = _checked_target(url, policy, param)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise image_error(f"{param}: fetching the image took longer than {policy.fetch_timeout_s} s.", param, code="image_fetch_failed")
    connection = _PinnedConnection(scheme, host, port, address, timeout=remaining)
    path = urlsplit(url)._replace(scheme="", netloc="").geturl() or "/"
    try:
        connection.request("GET", path, headers={"Host": host if port in (80, 443) else f"{host}:{port}", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            return response.status, response.getheader("Location"), b""
        return response.status, None, _read_capped(response, policy, param, deadline)
    except (OSError, http.client.HTTPException):
        raise image_error(f"{param}: the image could not be fetched (connection failed or timed out).", param, code="image_fetch_failed") from None
    finally:
        connection.close()


def _read_capped(response, policy, param, deadline) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise image_error(f"{param}: the image is larger than {policy.max_bytes} bytes.", param, code="image_too_large")
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise image_error(f"{param}: fetching the image took longer than {policy.fetch_timeout_s} s.", param, code="image_fetch_failed")
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise image_error(f"{param}: the image is larger than {policy.max_bytes} bytes.", param, code="image_too_large")
        chunks.append(chunk)


class _PinnedConnection(http.client.HTTPSConnection):
    """An HTTP(S) connection to one checked address, with the URL's host for the Host header, SNI and the
    certificate check (so DNS is asked once, and its checked answer is the one contacted)."""

    def __init__(self, scheme, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._scheme, self._address = scheme, address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._scheme == "https":
            sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


__all__ = ["ImagePolicy", "decode_image_url", "decode_image_bytes", "fetch_image", "is_public_address"]
