"""Fetching remote images safely (httpx): no private addresses, bounded size and time.

Every hop of a redirect chain is checked: scheme http/https, no credentials, an optional host
allow list, and every address the host resolves to must be public (not loopback, private,
link-local, multicast, reserved or unspecified, nor an IPv6 form that embeds such an IPv4
address: IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64). The connection then goes to the
address that was checked (the Host header and the TLS server name stay the URL's host), so a
DNS answer that changes between check and connect (rebinding) cannot redirect it. One
wall-clock deadline bounds the whole fetch, from the DNS lookup to the last byte: a slow
resolver, a status line or headers dripped byte by byte, redirects and a dripping body all end
when it passes (the connection is shut down from a timer as soon as it exists). Query strings
are kept out of httpx's request log lines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from guardrail.errors import InvalidImageError


class ImageFetchError(InvalidImageError):
    """A remote image could not be fetched, or its address or answer is not allowed."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
MAX_URL_LENGTH = 8192


def _parse(url: object) -> SplitResult:
    """Split a URL, refusing anything that is not a plain, well-formed one."""
    if not isinstance(url, str):
        raise ImageFetchError(f"image URL must be text, not {type(url).__name__}")
    if len(url) > MAX_URL_LENGTH:
        raise ImageFetchError(f"image URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ImageFetchError("image URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as e:
        raise ImageFetchError(f"malformed image URL: {e}") from e
    return parts


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if any(address in n for n in _NAT64) or address.packed[:12] == bytes(12):
        return ipaddress.IPv4Address(address.packed[-4:])
    return None


class _RedactQuery(logging.Filter):
    """Drops query strings and user info from the URLs in httpx's request log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                httpx.URL(scheme=a.scheme, host=a.host, port=a.port, path=a.path)
                if isinstance(a, httpx.URL)
                else a
                for a in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_RedactQuery())


_RESOLVER = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="image-dns")


class _Deadline:
    """One deadline for a whole fetch: when it passes, the connection being read is shut down,
    which ends a read blocked on a server that drips its answer (status line, headers or body).
    The connection is known from httpcore's trace as soon as it is open."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self._socket: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: remember each connection's socket once it is open."""
        if event.endswith("connect_tcp.complete") or event.endswith("start_tls.complete"):
            stream = info.get("return_value")
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            if self.passed:
                self._cut()

    def resolve(self, host: str, port: int) -> list[Any]:
        """``getaddrinfo`` within the deadline (a resolver that stalls does not hold the
        fetch; its lookup finishes in the background)."""
        future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            return future.result(timeout=max(0.0, self.at - time.monotonic()))
        except concurrent.futures.TimeoutError as e:
            raise ImageFetchError("timed out fetching image: deadline passed in DNS") from e

    def _cut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class RemoteImageFetcher:
    """Fetches image bytes from http(s) URLs under the rules above.

    ``allow_hosts`` (exact host names) restricts where images may come from; ``allow_networks``
    opts specific non-public networks back in (for example an internal CDN, or tests).
    ``timeout_s`` is the deadline of the whole fetch.
    """

    def __init__(
        self,
        *,
        allow_hosts: Sequence[str] | None = None,
        allow_networks: Sequence[str] = (),
        max_bytes: int = 10_000_000,
        timeout_s: float = 5.0,
        max_redirects: int = 3,
        reuse_s: float = 300.0,
        reuse_bytes: int = 64_000_000,
    ) -> None:
        self.allow_hosts = None if allow_hosts is None else {h.lower() for h in allow_hosts}
        self.allow_networks: list[Network] = [ipaddress.ip_network(n) for n in allow_networks]
        self.max_bytes, self.timeout_s, self.max_redirects = max_bytes, timeout_s, max_redirects
        # Recently fetched images, so that a conversation's history is not fetched every turn.
        self.reuse_s, self.reuse_bytes = reuse_s, reuse_bytes
        self._recent: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._until: float | None = None  # a caller's overall deadline (time.monotonic())

    def until(self, at: float) -> RemoteImageFetcher:
        """This fetcher (same rules, same reuse cache) with every fetch also ending by ``at``
        (``time.monotonic()``): a request's deadline bounds all of its images together."""
        bounded = copy.copy(self)
        bounded._until = at if self._until is None else min(at, self._until)
        return bounded

    def _allowed(self, address: Address) -> bool:
        if any(address in n for n in self.allow_networks):
            return True
        embedded = _embedded_ipv4(address)
        if embedded is not None and not self._allowed(embedded):
            return False
        return address.is_global

    def _checked_address(self, parts: SplitResult, deadline: _Deadline) -> Address:
        """The address to connect to: every address of the host must be allowed."""
        if parts.scheme not in ("http", "https"):
            raise ImageFetchError(f"image URL scheme {parts.scheme!r} is not allowed")
        if parts.username is not None or parts.password is not None:
            raise ImageFetchError("image URLs with credentials are not allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise ImageFetchError("image URL has no host")
        if self.allow_hosts is not None and host not in self.allow_hosts:
            raise ImageFetchError(f"image host {host!r} is not in the allow list")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = deadline.resolve(host, port)
        except (socket.gaierror, UnicodeError) as e:
            raise ImageFetchError(f"cannot resolve image host {host!r}: {e}") from e
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if not self._allowed(address):
                raise ImageFetchError(f"image host {host!r} resolves to non-public {address}")
        return addresses[0]

    def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, or :class:`ImageFetchError`. An image fetched from the
        same URL within ``reuse_s`` seconds is reused (at most ``reuse_bytes`` are kept)."""
        now = time.monotonic()
        with self._recent_lock:
            found = self._recent.get(url)
            if found is not None and now - found[0] < self.reuse_s:
                self._recent.move_to_end(url)
                return found[1]
        data = self._fetch(url)
        with self._recent_lock:
            self._recent[url] = (now, data)
            while sum(len(d) for _, d in self._recent.values()) > self.reuse_bytes:
                self._recent.popitem(last=False)
        return data

    def _fetch(self, url: str) -> bytes:
        seconds = self.timeout_s
        if self._until is not None:
            seconds = min(seconds, self._until - time.monotonic())
            if seconds <= 0:
                raise ImageFetchError("timed out fetching image: the request's deadline passed")
        deadline = _Deadline(seconds)
        try:
            with httpx.Client(follow_redirects=False, trust_env=False) as client:
                return self._follow(client, url, deadline)
        except httpx.HTTPError as e:
            if deadline.passed or isinstance(e, httpx.TimeoutException):
                raise ImageFetchError(f"timed out fetching image: deadline passed ({e})") from e
            raise ImageFetchError(f"could not fetch image: {e}") from e
        finally:
            deadline.cancel()

    def _follow(self, client: httpx.Client, url: str, deadline: _Deadline) -> bytes:
        for _ in range(self.max_redirects + 1):
            parts = _parse(url)
            address = self._checked_address(parts, deadline)
            with client.stream(**self._pinned(parts, address, deadline)) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                return self._read(response, deadline.at)
        raise ImageFetchError(f"more than {self.max_redirects} redirects")

    @staticmethod
    def _pinned(parts: SplitResult, address: Address, deadline: _Deadline) -> dict[str, Any]:
        """Request arguments that connect to ``address`` while speaking to the URL's host."""
        remaining = deadline.at - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError("timed out fetching image: deadline passed")
        host = parts.hostname or ""
        target = httpx.URL(parts.geturl()).copy_with(host=str(address))
        extensions: dict[str, Any] = {"trace": deadline.trace}
        if parts.scheme == "https":
            extensions["sni_hostname"] = host
        return {
            "method": "GET",
            "url": target,
            "headers": {"Host": parts.netloc},
            "timeout": httpx.Timeout(remaining),
            "extensions": extensions,
        }

    def _read(self, response: httpx.Response, deadline: float) -> bytes:
        if response.status_code != 200:
            raise ImageFetchError(f"image URL answered HTTP {response.status_code}")
        content_type = response.headers.get("content-type", "")
        if not content_type.lower().startswith("image/"):
            raise ImageFetchError(f"image URL answered content type {content_type!r}")
        declared = int(response.headers.get("content-length") or 0)
        if declared > self.max_bytes:
            raise ImageFetchError(f"image of {declared} bytes exceeds {self.max_bytes}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise ImageFetchError(f"image exceeds {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise ImageFetchError("timed out fetching image: deadline passed mid-body")
        return bytes(body)
