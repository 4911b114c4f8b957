"""Fetching remote images safely (httpx): no private addresses, bounded size and time.

Every hop of a redirect chain is checked: scheme http/https, an optional host allow list, and
every address the host resolves to must be public (not loopback, private, link-local, multicast,
reserved or unspecified). A remaining risk is DNS rebinding between the check and httpx's own
resolution; deployments that need more should fetch through an egress proxy.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from guardrail.errors import InvalidImageError


class ImageFetchError(InvalidImageError):
    """A remote image could not be fetched, or its address or answer is not allowed."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
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


class RemoteImageFetcher:
    """Fetches image bytes from http(s) URLs under the rules above.

    ``allow_hosts`` (exact host names) restricts where images may come from; ``allow_networks``
    opts specific non-public networks back in (for example an internal CDN, or tests).
    """

    def __init__(
        self,
        *,
        allow_hosts: Sequence[str] | None = None,
        allow_networks: Sequence[str] = (),
        max_bytes: int = 10_000_000,
        timeout_s: float = 5.0,
        max_redirects: int = 3,
    ) -> None:
        self.allow_hosts = None if allow_hosts is None else {h.lower() for h in allow_hosts}
        self.allow_networks: list[Network] = [ipaddress.ip_network(n) for n in allow_networks]
        self.max_bytes, self.timeout_s, self.max_redirects = max_bytes, timeout_s, max_redirects

    def _check_url(self, url: str) -> None:
        parts = _parse(url)
        if parts.scheme not in ("http", "https"):
            raise ImageFetchError(f"image URL scheme {parts.scheme!r} is not allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise ImageFetchError("image URL has no host")
        if self.allow_hosts is not None and host not in self.allow_hosts:
            raise ImageFetchError(f"image host {host!r} is not in the allow list")
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ImageFetchError(f"cannot resolve image host {host!r}: {e}") from e
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global and not any(address in n for n in self.allow_networks):
                raise ImageFetchError(f"image host {host!r} resolves to non-public {address}")

    def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, or :class:`ImageFetchError`."""
        timeout = httpx.Timeout(self.timeout_s)
        with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            for _ in range(self.max_redirects + 1):
                self._check_url(url)
                try:
                    with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        return self._read(response)
                except httpx.TimeoutException as e:
                    raise ImageFetchError(f"timed out fetching image: {e}") from e
                except httpx.HTTPError as e:
                    raise ImageFetchError(f"could not fetch image: {e}") from e
        raise ImageFetchError(f"more than {self.max_redirects} redirects")

    def _read(self, response: httpx.Response) -> bytes:
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
        return bytes(body)
