"""A local stand-in for the Hugging Face Hub endpoints that huggingface_hub 2.x uses to upload and download a
small file: repo create, preupload, commit (NDJSON, "regular" base64 files) and HEAD/GET resolve.

Repos live in memory. `fail_commits` / `fail_downloads` make the next N commits (500) or resolve calls (403)
fail; `requests` records every (method, path, authorization header) received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class HubStandIn:
    """An in-memory Hub on 127.0.0.1 (a free port); use as a context manager, its `url` as the endpoint."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}    # (type, "owner/name") -> {"files", "commits", "private"}
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail_commits = 0
        self.fail_downloads = 0
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):     # quiet
                pass

            def do_POST(self):
                standin._handle(self, "POST")

            def do_GET(self):
                standin._handle(self, "GET")

            def do_HEAD(self):
                standin._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file(self, repo_id: str, path: str, repo_type: str = "dataset") -> bytes | None:
        """The content of `path` at the head of a repo, or None."""
        repo = self.repos.get((repo_type, repo_id))
        return None if repo is None else repo["files"].get(path)

    # ------------------------------------------------------------------ the endpoints

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        with self.lock:
            self.requests.append((method, path, h.headers.get("Authorization")))
            if method == "POST" and path == "/api/repos/create":
                return self._create(h, json.loads(body))
            if method == "POST" and (m := _API.match(path)):
                repo = self.repos.get((m[1][:-1], m[2]))
                if repo is None:
                    return _reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return (self._preupload if m[3] == "preupload" else self._commit)(h, repo, m[2], body)
            if method in ("GET", "HEAD") and (m := _RESOLVE.match(path)):
                return self._resolve(h, method, (m[1] or "models")[:-1], m[2], m[4])
            _reply(h, 404, {"error": f"no such endpoint: {method} {path}"})

    def _create(self, h, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}"
        if (repo_type, repo_id) in self.repos:
            return _reply(h, 409, {"error": "You already created this repo", "url": self._repo_url(repo_type, repo_id)})
        self.repos[(repo_type, repo_id)] = {"files": {}, "commits": [_oid(repo_id.encode())],
                                            "private": payload.get("visibility") == "private"}
        _reply(h, 200, {"url": self._repo_url(repo_type, repo_id)})

    def _preupload(self, h, repo: dict, repo_id: str, body: bytes) -> None:
        files = json.loads(body)["files"]
        _reply(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": _git_oid(repo["files"][f["path"]]) if f["path"] in repo["files"] else None}
                                  for f in files]})

    def _commit(self, h, repo: dict, repo_id: str, body: bytes) -> None:
        if self.fail_commits > 0:
            self.fail_commits -= 1
            return _reply(h, 500, {"error": "Internal Error (stand-in: failing this commit on purpose)"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert lines[0]["key"] == "header", lines[0]
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return _reply(h, 400, {"error": f"stand-in supports only regular base64 files, got {line['key']}"})
            repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = _oid(repo["commits"][-1].encode() + body)
        repo["commits"].append(oid)
        _reply(h, 200, {"commitUrl": f"{self.url}/datasets/{repo_id}/commit/{oid}", "commitOid": oid,
                        "success": True})

    def _resolve(self, h, method: str, repo_type: str, repo_id: str, filename: str) -> None:
        if self.fail_downloads > 0:
            self.fail_downloads -= 1
            return _reply(h, 403, {"error": "Forbidden (stand-in: failing this download on purpose)"},
                          head=method == "HEAD")
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return _reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"},
                          head=method == "HEAD")
        commit = {"X-Repo-Commit": repo["commits"][-1]}
        if filename not in repo["files"]:
            return _reply(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", **commit},
                          head=method == "HEAD")
        content = repo["files"][filename]
        headers = {**commit, "ETag": f'"{_git_oid(content)}"', "Content-Type": "application/octet-stream"}
        _send(h, 200, content, headers, head=method == "HEAD")

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _git_oid(content: bytes) -> str:
    """The git blob id of a file, as the Hub gives for a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _reply(h, status: int, payload: dict, headers: dict | None = None, head: bool = False) -> None:
    _send(h, status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, head)


def _send(h, status: int, body: bytes, headers: dict, head: bool = False) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if not head:
        h.wfile.write(body)
