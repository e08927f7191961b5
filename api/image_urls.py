"""Images given by an ``http(s)`` URL, fetched only where the config allows.

mlxd is shared by every tool on the machine, and a URL in a request makes
the daemon reach out on the sender's behalf; so it fetches none unless the
setting ``image_url_hosts`` lists hosts (``"*"`` for any, ``"*.example.com"``
for a domain's hosts). A fetch follows at most a few redirects, each to a
listed host, reads at most ``max_image_size`` bytes and ends after
``image_url_timeout``; anything else it meets is the sender's 400, saying
what went wrong and which setting governs it. No scheme but ``http`` and
``https`` is ever read (``api.images.from_url`` refuses them).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx
import trio

from api.images import Limits, Remote
from scheduler.errors import InvalidRequest

MAX_REDIRECTS = 5


def allows(hosts: Sequence[str], host: str) -> bool:
    """Whether ``host`` is one of ``hosts`` (``*``: any; ``*.example.com``:
    that domain's hosts)."""
    host = host.lower().rstrip(".")
    for pattern in (h.lower() for h in hosts):
        if pattern in ("*", host) or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


async def fetched(images: Sequence[str | Remote], limits: Limits) -> tuple[str, ...]:
    """``images`` with every URL replaced by the file it holds, in base64
    (fetched one after another: a request seldom names more than one)."""
    if any(isinstance(i, Remote) for i in images) and not limits.url_hosts:
        raise InvalidRequest(
            "mlxd fetches no image URLs unless its config lists their hosts "
            "(image_url_hosts): send the image in the request, as a data: URI "
            "(data:image/png;base64,...)",
            param=next(i.param for i in images if isinstance(i, Remote)),
        )
    files = [i if isinstance(i, str) else await fetch(i, limits) for i in images]
    return tuple(f if isinstance(f, str) else base64.b64encode(f).decode() for f in files)


async def fetch(image: Remote, limits: Limits) -> bytes:
    """The file at ``image.url``, within the limits' hosts, time and size."""
    with trio.move_on_after(limits.url_timeout_s):
        async with httpx.AsyncClient(trust_env=False, timeout=None, follow_redirects=False) as http:
            url = image.url
            for _ in range(MAX_REDIRECTS + 1):
                _allowed(url, limits.url_hosts, image.param)
                try:
                    async with http.stream("GET", url) as reply:
                        if reply.is_redirect and "location" in reply.headers:
                            url = str(reply.url.join(reply.headers["location"]))
                            continue
                        if reply.status_code != 200:
                            raise InvalidRequest(
                                f"the image at {url} could not be fetched: its server answered "
                                f"{reply.status_code}",
                                param=image.param,
                            )
                        return await _read(reply, limits.bytes, image.param)
                except httpx.HTTPError as e:
                    raise InvalidRequest(
                        f"the image at {url} could not be fetched ({type(e).__name__}: {e})",
                        param=image.param,
                    ) from None
            raise InvalidRequest(
                f"the image at {image.url} redirects more than {MAX_REDIRECTS} times",
                param=image.param,
            )
    raise InvalidRequest(
        f"the image at {image.url} was not fetched within {limits.url_timeout_s:g} s "
        "(image_url_timeout)",
        param=image.param,
    )


def _allowed(url: str, hosts: Sequence[str], param: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"an image URL must be http(s) with a host, not {url!r}", param)
    if not allows(hosts, parts.hostname):
        raise InvalidRequest(
            f"mlxd fetches images only from the hosts its config lists (image_url_hosts), "
            f"and {parts.hostname!r} is not one of them",
            param,
        )


async def _read(reply: httpx.Response, limit: int, param: str) -> bytes:
    too_big = InvalidRequest(
        f"the image at {reply.url} is larger than {limit:,} bytes (max_image_size)", param
    )
    declared = reply.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    data = bytearray()
    async for chunk in reply.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise too_big
    return bytes(data)
