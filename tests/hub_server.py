"""A local stand-in for the Hugging Face Hub, enough for `snapshot_download`, `upload_folder`
and deploying a Space.

`start_hub()` runs a threaded `http.server` on 127.0.0.1 (a free port) that keeps dataset,
Space and model repos in memory and answers the endpoints huggingface_hub (1.x and 2.x) calls:

    GET  /api/datasets/{repo}[/revision/{rev}]          repo info: sha, siblings
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]       file listing (?recursive=true)
    HEAD/GET /datasets/{repo}/resolve/{rev}/{path}      file bytes; ETag, X-Repo-Commit, Content-Length
    POST /api/repos/create                              new repo (409 if it exists)
    POST /api/validate-yaml                             README front matter check
    POST /api/datasets/{repo}/preupload/{rev}           every file is "regular" (no LFS / Xet upload)
    POST /api/datasets/{repo}/commit/{rev}              NDJSON commit with base64 inline files
    POST /api/datasets/{repo}/branch/{branch}           new branch from main

    GET  /api/spaces/{repo}[/revision/{rev}]            Space info (also sdk, private)
    GET  /api/spaces/{repo}/tree/{rev}[/{path}]         as for datasets
    POST /api/spaces/{repo}/preupload/{rev}, /commit/{rev}   as for datasets
    GET / POST / DELETE /api/spaces/{repo}/variables    the Space's variables ({key: {value, ...}})
    POST /api/spaces/{repo}/hardware                    hardware request; flavors outside
                                                        `store.grantable_hardware` answer 403
    PUT  /api/spaces/{repo}/settings                    visibility
    GET  /api/models/{repo}[/revision/{rev}]            model info (tests seed model repos)

Writes to a Space (create, commit, variables, hardware, settings) need `Authorization:
Bearer <store.token>` when `store.token` is set, as on the Hub; without it they answer 401.

Errors carry the `X-Error-Code` header the client turns into its exception classes
(`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`). A private repo answers
`RepoNotFound` unless the request carries `Authorization: Bearer <store.token>`, like the
Hub does. Every request is logged in `store.requests`; anything the server does not know
lands in `store.unhandled` so a test can assert the client asked for nothing else.

Point the client at it by patching `huggingface_hub.constants.ENDPOINT` and
`HUGGINGFACE_CO_URL_TEMPLATE` (both read when huggingface_hub is imported) — see
`patch_client`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)              # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)              # commit sha -> summary
    sdk: str | None = None                                              # Spaces only, as below
    variables: dict[str, str] = field(default_factory=dict)
    hardware_requests: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        return None

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{self.repo_id}\n{branch}\n{len(self.commits)}\n{message}".encode()
                           + b"".join(git_blob_sha1(v).encode() + k.encode() for k, v in sorted(files.items()))
                           ).hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        self.branches[branch] = sha
        return sha


@dataclass
class HubStore:
    """What the server holds; tests read and seed it directly."""
    url: str = ""
    token: str | None = None          # the token that opens private repos
    repos: dict[str, Repo] = field(default_factory=dict)    # dataset repos
    spaces: dict[str, Repo] = field(default_factory=dict)
    models: dict[str, Repo] = field(default_factory=dict)
    grantable_hardware: set[str] = field(default_factory=lambda: {"cpu-basic", "zero-a10g"})
    requests: list[tuple[str, str]] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kind(self, repo_type: str) -> dict[str, Repo]:
        """The repos of one type: "dataset", "space" or "model"."""
        return {"dataset": self.repos, "space": self.spaces, "model": self.models}[repo_type]

    def create(self, repo_id: str, *, private: bool = False, repo_type: str = "dataset",
               sdk: str | None = None) -> Repo:
        repo = Repo(repo_id, private=private, sdk=sdk)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.kind(repo_type)[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset") -> dict[str, bytes]:
        repo = self.kind(repo_type)[repo_id]
        return repo.commits[repo.resolve(revision)]


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    """`[ns, name, *rest]` -> ("ns/name", rest)."""
    if len(parts) < 2:
        raise HubError(404, "RepoNotFound", "Repository not found")
    return f"{parts[0]}/{parts[1]}", parts[2:]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: HubStore   # set on the subclass made by `start_hub`

    def log_message(self, format, *args):  # quiet: pytest shows failures, not access logs
        pass

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self, repo: Repo) -> bool:
        if not repo.private:
            return True
        return self.store.token is not None and self.headers.get("Authorization") == f"Bearer {self.store.token}"

    def _repo(self, repo_id: str, kind: str = "dataset") -> Repo:
        repo = self.store.kind(kind).get(repo_id)
        if repo is None or not self._authorised(repo):
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _writable(self, repo_id: str, kind: str) -> Repo:
        """A repo the request may change: Spaces need the store's token when one is set."""
        if kind == "space":
            self._check_token()
        return self._repo(repo_id, kind)

    def _check_token(self) -> None:
        if self.store.token is not None and self.headers.get("Authorization") != f"Bearer {self.store.token}":
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _commit_of(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with self.store.lock:
            self.store.requests.append((self.command, self.path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            with self.store.lock:
                handled = self._route(parts, query)
            if not handled:
                with self.store.lock:
                    self.store.unhandled.append((self.command, self.path))
                self._json(404, {"error": f"no route for {self.command} {path}"})
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routes -------------------------------------------------------------------------

    def _route(self, parts: list[str], query: dict) -> bool:
        method = self.command
        kinds = {"datasets": "dataset", "spaces": "space", "models": "model"}
        if len(parts) >= 2 and parts[0] == "api" and parts[1] in kinds:
            kind = kinds[parts[1]]
            repo_id, rest = _split_repo(parts[2:])
            if method == "GET" and not rest:
                return self._info(repo_id, "main", kind)
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1], kind)
            if kind == "model":     # model repos are only looked at
                return False
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, kind)
            if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1], kind)
            if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit(repo_id, rest[1], kind)
            if kind == "dataset" and method == "POST" and rest[0] == "branch" and len(rest) == 2:
                return self._branch(repo_id, rest[1])
            if kind == "space" and rest == ["variables"] and method in ("GET", "POST", "DELETE"):
                return self._variables(repo_id)
            if kind == "space" and rest == ["hardware"] and method == "POST":
                return self._hardware(repo_id)
            if kind == "space" and rest == ["settings"] and method == "PUT":
                return self._settings(repo_id)
            return False
        if parts[:1] == ["datasets"] and method in ("GET", "HEAD"):
            repo_id, rest = _split_repo(parts[1:])
            if len(rest) >= 3 and rest[0] == "resolve":
                return self._resolve(repo_id, rest[1], "/".join(rest[2:]))
            return False
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create()
        if parts == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        return False

    def _info(self, repo_id: str, revision: str, kind: str = "dataset") -> bool:
        repo = self._repo(repo_id, kind)
        sha = self._commit_of(repo, revision)
        files = repo.commits[sha]
        info = {"id": repo_id, "sha": sha, "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(files)]}
        if kind == "space":
            info["sdk"] = repo.sdk
        self._json(200, info)
        return True

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict, kind: str = "dataset") -> bool:
        repo = self._repo(repo_id, kind)
        files = repo.commits[self._commit_of(repo, revision)]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):].split("/")
            for depth in range(1, len(rel)):   # the folders on the way
                if depth > 1 and not recursive:
                    break
                folder_path = prefix + "/".join(rel[:depth])
                entries.setdefault(folder_path, {"type": "directory", "path": folder_path,
                                                 "oid": hashlib.sha1(folder_path.encode()).hexdigest()})
            if recursive or len(rel) == 1:
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist at {revision}")
        self._json(200, list(entries.values()))
        return True

    def _resolve(self, repo_id: str, revision: str, filename: str) -> bool:
        repo = self._repo(repo_id)
        sha = self._commit_of(repo, revision)
        data = repo.commits[sha].get(filename)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{filename} not found at {revision}")
        self._send(200, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha},
                   content_type="application/octet-stream")
        return True

    def _create(self) -> bool:
        payload = json.loads(self._body() or b"{}")
        kind = payload.get("type")
        if kind not in ("dataset", "space"):
            raise HubError(400, None, f"this test hub creates dataset and Space repos, not {kind!r}")
        if kind == "space":
            self._check_token()
            if payload.get("sdk") not in ("gradio", "docker", "static"):
                raise HubError(400, None, f"a Space needs an sdk (gradio, docker, static), not {payload.get('sdk')!r}")
        if not payload.get("organization"):
            raise HubError(400, None, "give the repo id as 'org/name'")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.store.url}/{kind}s/{repo_id}"
        if repo_id in self.store.kind(kind):   # the Hub answers 409 with the url, and the client reads it
            self._json(409, {"error": f"You already created this {kind} repo", "url": url},
                       {"X-Error-Message": f"You already created this {kind} repo"})
            return True
        self.store.create(repo_id, private=payload.get("visibility") == "private", repo_type=kind,
                          sdk=payload.get("sdk"))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})
        return True

    def _variables(self, repo_id: str) -> bool:
        repo = self._writable(repo_id, "space")
        if self.command == "POST":
            payload = json.loads(self._body())
            if not isinstance(payload.get("key"), str) or not isinstance(payload.get("value"), str):
                raise HubError(400, None, "a variable needs a string key and a string value")
            repo.variables[payload["key"]] = payload["value"]
        elif self.command == "DELETE":
            key = json.loads(self._body())["key"]
            if key not in repo.variables:
                raise HubError(404, None, f"no variable {key!r} in this Space")
            del repo.variables[key]
        self._json(200, {k: {"value": v} for k, v in repo.variables.items()})
        return True

    def _hardware(self, repo_id: str) -> bool:
        repo = self._writable(repo_id, "space")
        flavor = json.loads(self._body())["flavor"]
        if flavor not in self.store.grantable_hardware:
            raise HubError(403, None, f"You are not allowed to request {flavor} for this Space")
        repo.hardware_requests.append(flavor)
        self._json(200, {"stage": "BUILDING", "hardware": {"current": None, "requested": flavor}})
        return True

    def _settings(self, repo_id: str) -> bool:
        repo = self._writable(repo_id, "space")
        payload = json.loads(self._body())
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        self._json(200, {})
        return True

    def _validate_yaml(self) -> bool:
        content = json.loads(self._body())["content"]
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "front matter is not closed with '---'"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if not isinstance(meta, dict):
                        errors.append({"message": "front matter is not a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []},
                   {"X-Error-Code": "BadRequest"} if errors else None)
        return True

    def _preupload(self, repo_id: str, revision: str, kind: str = "dataset") -> bool:
        repo = self._writable(repo_id, kind)
        files = repo.commits[self._commit_of(repo, unquote(revision))]
        payload = json.loads(self._body())
        answer = []
        for f in payload["files"]:
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in files:
                entry["oid"] = git_blob_sha1(files[f["path"]])
            answer.append(entry)
        self._json(200, {"files": answer})
        return True

    def _commit(self, repo_id: str, revision: str, kind: str = "dataset") -> bool:
        repo = self._writable(repo_id, kind)
        if revision not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (not a branch)")
        files = dict(repo.commits[repo.branches[revision]])
        summary = ""
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.branches[revision]:
                    raise HubError(412, None, f"parent commit {parent} is not the head of {revision}")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, None, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            else:   # lfsFile: the preupload answer never asks for LFS
                raise HubError(400, None, f"this test hub takes inline files only, not {key!r}")
        sha = repo.commit(revision, files, summary)
        self._json(200, {"success": True, "commitOid": sha,
                         "commitUrl": f"{self.store.url}/{kind}s/{repo_id}/commit/{sha}"})
        return True

    def _branch(self, repo_id: str, branch: str) -> bool:
        repo = self._repo(repo_id)
        payload = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            raise HubError(409, None, f"branch {branch} already exists")
        repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        self._json(200, {})
        return True


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that `stop()` can cut keep-alive ones too: closing only the
    listening socket would leave the client's pooled connections answering."""
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def get_request(self):
        conn, addr = super().get_request()
        with self.connections_lock:
            self.connections.add(conn)
        return conn, addr

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.connections_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:   # already closed by the peer
                pass
            conn.close()


def start_hub() -> tuple[str, HubStore, Callable[[], None]]:
    """Start the server; returns (base url, store, stop). `stop()` is idempotent and closes
    every connection, so afterwards the client gets connection errors."""
    store = HubStore()
    handler = type("Handler", (_Handler,), {"store": store})
    server = _Server(("127.0.0.1", 0), handler)
    host, port = server.server_address[:2]
    store.url = f"http://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, name="test-hub", daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            server.shutdown()
            server.server_close()
            server.cut_connections()
            thread.join(timeout=5)
    return store.url, store, stop


def patch_client(monkeypatch, url: str, *, tmp_home) -> None:
    """Point huggingface_hub at `url` for one test, online, with no token and no telemetry.

    `ENDPOINT` and the resolve-URL template are module constants computed at import time,
    so setting `HF_ENDPOINT` now would be too late; `HF_HUB_OFFLINE` is read through
    `constants.is_offline_mode()` on every request. Building request headers looks for an
    AI-agent registry at `{ENDPOINT}/api/agent-harnesses` unless telemetry is disabled,
    and reads a token from `HF_TOKEN` or the token file: both are switched off here.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_home / "hub"))
    try:   # huggingface_hub 2.x only
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    # hf_xet (used by upload_folder when installed) logs under HF_HOME when its session starts.
    monkeypatch.setenv("HF_HOME", str(tmp_home))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_home / "xet"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

