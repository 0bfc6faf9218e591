"""A loopback Hugging Face Hub: just the routes huggingface_hub uses to create a repo, commit files, and download them.

Start it in a thread, point `HF_ENDPOINT` at `hub.url`, and the real `create_repo`, `upload_folder`,
`hf_hub_download`, `ModelCard.load` and `AutoPeftModel.from_pretrained(repo_id)` run against it. Files are kept in
memory; every commit gets a new sha. Only 127.0.0.1 is bound.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"sha": str, "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        # -- helpers ---------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
            data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self, code: str):
            self._send(404, {"error": code}, headers={"X-Error-Code": code, "X-Error-Message": code})

        def _repo(self, repo_id: str):
            return hub.repos.get(repo_id)

        # -- routes ----------------------------------------------------------------------------------------
        def do_POST(self):  # noqa: N802
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = {"sha": "0" * 40, "files": {}}
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if path.startswith("/api/models/") and "/preupload/" in path:
                files = json.loads(body)["files"]
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if path.startswith("/api/models/") and "/commit/" in path:
                repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
                repo = self._repo(repo_id)
                if repo is None:
                    return self._not_found("RepoNotFound")
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        repo["files"][value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(item["value"]["path"], None)
                digest = hashlib.sha1(repr(sorted((k, v) for k, v in repo["files"].items())).encode()).hexdigest()
                repo["sha"] = digest
                return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{digest}", "commitOid": digest,
                                        "pullRequestUrl": None})
            return self._send(404, {"error": f"no route {path}"})

        def do_GET(self):  # noqa: N802
            self._get_or_head()

        def do_HEAD(self):  # noqa: N802
            self._get_or_head()

        def _get_or_head(self):
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path))
            if path.startswith("/api/models/"):
                repo_id = path.removeprefix("/api/models/").split("/revision/")[0]
                repo = self._repo(repo_id)
                if repo is None:
                    return self._not_found("RepoNotFound")
                return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                                        "siblings": [{"rfilename": name} for name in sorted(repo["files"])],
                                        "tags": [], "downloads": 0, "likes": 0})
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                _, _, filename = rest.partition("/")
                repo = self._repo(repo_id)
                if repo is None:
                    return self._not_found("RepoNotFound")
                if filename not in repo["files"]:
                    return self._not_found("EntryNotFound")
                data = repo["files"][filename]
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                return self._send(200, raw=data, headers={"X-Repo-Commit": repo["sha"], "ETag": etag})
            return self._send(404, {"error": f"no route {path}"})

    return Handler
