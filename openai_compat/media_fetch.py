"""Images at `http(s)` URLs, fetched for chat messages only where the server's operator allows.

Off by default: `--allowed-media-domains` names the hosts whose images may be fetched (a host
matches an entry equal to it or a parent domain of it: `example.com` covers `img.example.com`;
`*` allows any host, for servers that only trusted clients reach). Each fetch is bounded: at most
`--max-image-bytes` bytes read (a larger body is cut off and refused, whatever its
Content-Length says), `--media-fetch-timeout` seconds in all, and at most `MAX_REDIRECTS`
redirects, each of which must lead to an allowed host again. A fetch that fails is a 400 naming
the content part, never a 500.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from openai_compat.errors import OpenAIError

MAX_REDIRECTS = 3


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """Which image URLs the server fetches, and the bounds of each fetch."""

    allowed_domains: tuple[str, ...] = ()
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024

    @property
    def fetches(self) -> bool:
        return bool(self.allowed_domains)

    def allows(self, url: str) -> bool:
        """Whether `url` is http(s) and its host is allowed."""
        if not valid_url(url):
            return False
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        if parts.scheme not in ("http", "https") or not host:
            return False
        for entry in self.allowed_domains:
            domain = entry.strip().lstrip(".").rstrip(".").lower()
            if domain == "*" or host == domain or host.endswith("." + domain):
                return True
        return False


def valid_url(url: str) -> bool:
    """Whether `url` parses as a URL that can be requested (a port that is a number in range, an
    IPv6 host closed, no control characters)."""
    try:
        _ = urlsplit(url).port  # (ValueError for a bad one)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        return False
    return True


async def fetch_image(client: httpx.AsyncClient, url: str, policy: MediaPolicy, param: str) -> bytes:
    """The body at `url` (redirects followed to allowed hosts only); a 400 naming `param` when the
    host is not allowed, the fetch fails or times out, or the body is larger than allowed."""
    try:
        return await asyncio.wait_for(_fetch(client, url, policy, param), timeout=policy.timeout_s)
    except TimeoutError:
        raise OpenAIError(
            f"The image at {url} could not be fetched within {policy.timeout_s:g} s (--media-fetch-timeout).",
            param=param,
        ) from None
    except httpx.HTTPError as e:
        raise OpenAIError(f"The image at {url} could not be fetched: {type(e).__name__}.", param=param) from None


async def _fetch(client: httpx.AsyncClient, url: str, policy: MediaPolicy, param: str) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        if not valid_url(url):  # (a redirect's)
            raise OpenAIError(f"The image URL {url!r} is not a valid URL.", param=param)
        if not policy.allows(url):
            raise OpenAIError(
                f"Images are fetched only from the hosts this server allows (--allowed-media-domains); "
                f"{urlsplit(url).hostname or url!r} is not one of them.", param=param, code="unsupported_parameter",
            )
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.is_redirect and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise OpenAIError(f"Fetching the image at {url} gave HTTP status {response.status_code}.", param=param)
            return await _read_bounded(response, policy.max_bytes, url, param)
    raise OpenAIError(f"The image at {url} redirects more than {MAX_REDIRECTS} times.", param=param)


async def _read_bounded(response: httpx.Response, max_bytes: int, url: str, param: str) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise OpenAIError(
                f"The image at {url} is larger than this server's {max_bytes} bytes (--max-image-bytes).", param=param
            )
    return bytes(body)
