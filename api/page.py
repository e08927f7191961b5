"""The status page a person opens at ``GET /``: a static page (its HTML,
style and script ship in ``api/page_assets``; nothing is fetched from
elsewhere) that reads ``/api/ps``, ``/api/activity`` and ``/api/errors``
every two seconds and calls ``/api/load``, ``/unload``, ``/pin`` and
``/unpin`` as the API does, under the same guard.

The page itself holds no data, so it is served without an API key; with
keys configured it asks for one and sends it with each call, keeping it in
the tab's ``sessionStorage`` only. Its Content-Security-Policy lets it run
its own script and reach this server and nothing else, and it may not be
framed (its buttons must not be clicked through another site's page)."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, abort

ASSETS = Path(__file__).with_name("page_assets")
TYPES = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_page(path: str) -> bool:
    """Whether ``path`` is the page or one of its files (served without a key)."""
    return path == "/" or path.startswith("/page/")


def blueprint() -> Blueprint:
    bp = Blueprint("page", __name__)
    files = {name: (ASSETS / name).read_bytes() for name in TYPES}

    def served(name: str) -> Response:
        return Response(files[name], content_type=TYPES[name], headers=HEADERS)

    @bp.get("/")
    async def index() -> Response:
        return served("index.html")

    @bp.get("/page/<name>")
    async def page_file(name: str) -> Response:
        if name not in files or name == "index.html":
            abort(404)  # the one error map answers it (``api/errors.py``)
        return served(name)

    return bp
