"""A tiny stand-in for the Hugging Face Hub, enough for ``huggingface_hub.snapshot_download``.

It serves one directory as the model repo ``repo_id`` at a single commit, ``FakeHub.commit``.
The endpoints (as huggingface_hub 2.x calls them) are:

- ``GET /api/models/{repo_id}/revision/{revision}``: the repo's info (``HfApi.repo_info``);
  what matters is ``sha``, the commit that ``revision`` resolves to.
- ``GET /api/models/{repo_id}/tree/{revision}``: the list of files (``HfApi.list_repo_tree``),
  each with its size and git blob id, plus LFS metadata for ``*.safetensors`` files. One page,
  so no ``Link`` header; folders are not listed (snapshot_download only uses files).
- ``HEAD`` and ``GET /{repo_id}/resolve/{revision}/{path}``: a file's metadata, then its bytes
  (``hf_hub_download``). The headers it needs: ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag``
  and ``X-Linked-Size`` for LFS files, which the client prefers) and ``Content-Length``. The
  real Hub redirects LFS files to a CDN; here every file is served directly, with no
  ``Location``. No ``X-Xet-*`` headers and no ``xetHash`` in the tree, so the client falls back
  to plain HTTP downloads instead of Xet.

``revision`` may be ``main`` or the commit. Anything else answers 404 with the ``X-Error-Code``
the client maps to its exceptions (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serve ``root`` as the model repo ``repo_id``; use as a context manager."""

    def __init__(self, root: Path, repo_id: str = "org/name", commit: str = COMMIT) -> None:
        self.repo_id = repo_id
        self.commit = commit
        self.files = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }
        self.requests: list[str] = []  # "METHOD path" of every request, for tests to inspect
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, *, body: bool) -> None:
        self.requests.append(f"{req.command} {req.path}")
        parts = [unquote(p) for p in urlsplit(req.path).path.split("/")[1:]]
        api = parts[:2] == ["api", "models"]
        repo_parts = parts[2:4] if api else parts[0:2]
        action, rest = (parts[4:5], parts[5:]) if api else (parts[2:3], parts[3:])
        if "/".join(repo_parts) != self.repo_id or not action or not rest:
            return self._error(req, "RepoNotFound", "Repository not found")
        revision, path = rest[0], "/".join(rest[1:])
        if revision not in ("main", self.commit):
            return self._error(req, "RevisionNotFound", f"Invalid rev id: {revision}")
        if api and action == ["revision"] and not path:
            return self._json(req, self._info(), body=body)
        if api and action == ["tree"] and not path:
            return self._json(req, self._tree(), body=body)
        if not api and action == ["resolve"] and path in self.files:
            return self._file(req, path, body=body)
        return self._error(req, "EntryNotFound", f"{path} does not exist")

    def _info(self) -> dict[str, object]:
        return {
            "id": self.repo_id,
            "sha": self.commit,
            "private": False,
            "siblings": [{"rfilename": name} for name in sorted(self.files)],
        }

    def _tree(self) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        for name, data in sorted(self.files.items()):
            entry: dict[str, object] = {
                "type": "file",
                "path": name,
                "size": len(data),
                "oid": _git_blob_id(data),
            }
            if _is_lfs(name):
                sha256 = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _file(self, req: BaseHTTPRequestHandler, name: str, *, body: bool) -> None:
        data = self.files[name]
        req.send_response(200)
        req.send_header("X-Repo-Commit", self.commit)
        req.send_header("ETag", f'"{_git_blob_id(data)}"')
        if _is_lfs(name):  # the real Hub names LFS blobs by their sha256
            req.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            req.send_header("X-Linked-Size", str(len(data)))
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _json(self, req: BaseHTTPRequestHandler, value: object, *, body: bool) -> None:
        data = json.dumps(value).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    def _error(self, req: BaseHTTPRequestHandler, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        req.send_response(404)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)


def _is_lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def _git_blob_id(data: bytes) -> str:
    """The id git gives a file's contents, which the Hub uses as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
