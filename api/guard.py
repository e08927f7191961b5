"""What keeps a web page from driving mlxd, and the API key check.

Any page a user visits can send requests to 127.0.0.1, and through DNS
rebinding (a name of the attacker's that resolves to 127.0.0.1) read the
answers too. So, before any route runs:

- the Host header, if there is one, must name this server: a loopback name
  or address, the listen address, or one of ``allowed_hosts`` (when
  listening on every interface with no ``allowed_hosts``, any name does):
  403 otherwise;
- a request with an Origin header (browsers send one on cross-origin
  requests and on every POST) must come from one of ``cors_origins`` or from
  this server itself: 403 otherwise. A listed origin gets CORS headers, and
  its preflight (OPTIONS) an answer;
- a POST body must be ``application/json`` (415 otherwise): a page may send
  text or a form anywhere without asking, but JSON only after a preflight,
  which an unlisted origin fails;
- with API keys configured, every request but ``/health`` and the status
  page's own files (``api/page.py``: they hold no data) needs one
  (``Authorization: Bearer KEY``, or Anthropic's ``x-api-key: KEY``), and
  keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

import attrs
from quart import Request, Response

from api.openai.store import owner_of
from api.page import is_page
from config.settings import Settings
from scheduler.errors import Forbidden, Unauthorized, UnsupportedMediaType

log = logging.getLogger("mlxd")

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
PREFLIGHT_MAX_AGE_S = 600
ALLOWED_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version"


def _origin(value: str) -> str:
    """An origin as the config lists it: lower case, no trailing slash."""
    return value.rstrip("/").lower()


def presented_key(request: Request) -> str | None:
    """The API key a request presents: OpenAI's ``Authorization: Bearer``,
    or Anthropic's ``x-api-key``."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get("x-api-key") or None


def host_name(value: str) -> str:
    """The name in a Host header (or an origin's netloc), without its port:
    ``[::1]:8642`` is ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@attrs.frozen
class Guard:
    hosts: frozenset[str] | None  # None: any
    origins: frozenset[str]
    keys: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        allowed = {host_name(h) for h in settings.allowed_hosts}
        hosts = None
        if settings.host not in EVERY_INTERFACE or allowed:
            hosts = LOOPBACK | {host_name(settings.host)} | allowed
        origins = frozenset(_origin(o) for o in settings.cors_origins)
        keys = (*settings.api_keys, *(c.key for c in settings.clients if c.key is not None))
        if hosts is None and not keys:
            log.warning(
                "listening on every interface with no api_keys and no allowed_hosts: anyone "
                "who can reach this machine can use its models, by any host name (set "
                'api_keys, or allowed_hosts, or host = "127.0.0.1")'
            )
        return cls(hosts, origins, tuple(k.encode() for k in keys))

    def admit(self, request: Request) -> Response | None:
        """Raise if ``request`` may not be served; the answer to a CORS
        preflight from a listed origin; else None."""
        host = request.headers.get("Host", "")
        # No Host at all is an HTTP/1.0 tool's request; browsers always send one.
        if self.hosts is not None and host and host_name(host) not in self.hosts:
            raise Forbidden(f"this server does not serve the host {host!r}")
        origin = request.headers.get("Origin")
        if origin is not None and not self._same_server(origin, host):
            if _origin(origin) not in self.origins:
                raise Forbidden(
                    f"requests from web pages at {origin} are not allowed "
                    "(list the origin in cors_origins to allow them)"
                )
            if request.method == "OPTIONS":
                return self.cors(Response("", status=204), origin, preflight=True)
        if request.method == "POST" and request.mimetype != "application/json":
            raise UnsupportedMediaType(
                "the request body must be JSON, sent as Content-Type: application/json"
            )
        keyless = request.path == "/health" or (request.method == "GET" and is_page(request.path))
        if self.keys and not keyless:
            given = (presented_key(request) or "").encode()
            # Every key is compared, whether or not an earlier one matched.
            if not any([hmac.compare_digest(given, k) for k in self.keys]):
                raise Unauthorized(
                    "a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY)"
                )
        return None

    def owner(self, request: Request) -> str:
        """Whose the request's stored responses are (``api/openai/store.py``): its
        key's, where keys are configured; everyone's alike where they are not
        (any key is accepted then, so none sets anything apart)."""
        return owner_of(presented_key(request)) if self.keys else ""

    def cors(self, response: Response, origin: str | None, preflight: bool = False) -> Response:
        """``response`` with the CORS headers a listed ``origin`` gets."""
        if origin is None or _origin(origin) not in self.origins:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        if preflight:
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, x-api-key, anthropic-version"
            )
            response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        else:
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
        return response

    @staticmethod
    def _same_server(origin: str, host: str) -> bool:
        return urlsplit(origin).netloc.lower() == host.strip().lower()
