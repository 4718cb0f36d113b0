"""A loopback Hugging Face Hub for tests: the routes the real huggingface_hub 2.4.0 client calls.

Runs a threaded `http.server` on 127.0.0.1 (ephemeral port); repositories are git-like in memory
(branches -> commits -> {path: blob}), LFS objects live in a temp dir keyed by sha256. Served:

- POST /api/repos/create                         {name, organization, type, visibility}
- POST /api/validate-yaml                        {content, repoType} -> {errors, warnings}
- GET  /api/models/{repo}[/revision/{rev}]       repo info (needs `sha`, `private`)
- GET  /api/models/{repo}/tree/{rev}[/{path}]    listing, paginated with `Link: <...>; rel="next"`
- POST /api/models/{repo}/preupload/{rev}        uploadMode lfs|regular, shouldIgnore, oid
- POST /{repo}.git/info/lfs/objects/batch        git-lfs batch (basic transfer); `verify` action
- PUT  /lfs-upload/{oid}                         the "storage" upload (no auth, like a signed URL)
- POST /api/models/{repo}/commit/{rev}           NDJSON header/file/lfsFile/deletedFile/deletedFolder
- POST /api/models/{repo}/branch/{branch}        {startingPoint}
- POST /api/models/{repo}/discussions            pull requests (refs/pr/N), GET .../discussions/{num}
- HEAD/GET /{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag, Content-Length, Range

- GET  /api/models/{repo}/xet-write-token/{rev}  xet CAS url + short-lived token (headers and JSON)
- xet CAS on the same port: POST /v1/xorbs/{prefix}/{hash} (stored), POST /v1/shards (parsed: each
  file is rebuilt from its xorb chunk ranges, LZ4-frame / byte-grouped chunks decoded, checked
  against the shard's sha256 and stored like an LFS object), POST /v1/telemetry; global dedup
  lookups, xorb grants and /v2/shards answer 404 so the client takes its fallbacks.
- xet downloads (only when `xet_downloads` is True): resolve adds `X-Xet-Hash` and
  `X-Xet-Refresh-Route` for files uploaded through xet; GET /v1/reconstructions/{file_id}
  (terms + fetch_info; /v2 answers 404) and GET /xorb-data/{hash} (ranged xorb reads, no Hub token).

Errors use the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound) so the
client raises its typed exceptions. Auth: one valid token for user `user` (plus `orgs`); writes
need it and a namespace the user owns (403 otherwise); private repos are invisible without it.
Otherwise downloads are plain HTTP, whichever way a file was uploaded. The `hub` fixture switches
xet off on the client (LFS path); `xet_hub` switches it on.

Instrumentation for tests: `requests` (method, path) log, `lfs_puts` (oids stored by PUT),
`fail_lfs_puts` (the next N PUTs answer 403, like an expired signed URL: a simulated interruption),
`truncate_downloads` (the next N file GETs send half the body, then drop the connection),
`range_requests` (paths downloaded with a `Range` header, i.e. resumed), `xorb_uploads` /
`shard_uploads`, `fail_xorb_uploads` (the next N xorb uploads answer 403) and `xorb_range_gets`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores bigger files in LFS whatever their name
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
VALID_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# -- xet storage formats (read side only: enough to rebuild uploaded files) ---------------------------------
def lz4_block_decompress(src: bytes, out: bytearray) -> None:
    """Append the LZ4 *block* `src` to `out` (the window of earlier output serves as dictionary)."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        out += src[i : i + lit]
        i += lit
        if i >= n:  # the last sequence has literals only
            return
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        match = token & 15
        if match == 15:
            while True:
                b = src[i]
                i += 1
                match += b
                if b != 255:
                    break
        match += 4
        start = len(out) - offset
        if offset >= match:
            out += out[start : start + match]
        else:  # overlapping copy repeats the last `offset` bytes
            for k in range(match):
                out.append(out[start + k])


def lz4_frame_decompress(data: bytes) -> bytes:
    """Decode one LZ4 frame (magic 0x184D2204): header, blocks, end mark, optional checksums."""
    if data[:4] != b"\x04\x22\x4d\x18":
        raise ValueError("not an LZ4 frame")
    flg = data[4]
    i = 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1  # FLG, BD, [size], [dict id], HC
    block_checksum = bool(flg & 0x10)
    out = bytearray()
    while True:
        size = int.from_bytes(data[i : i + 4], "little")
        i += 4
        if size == 0:
            return bytes(out)
        raw, size = bool(size & 0x80000000), size & 0x7FFFFFFF
        block = data[i : i + size]
        i += size + (4 if block_checksum else 0)
        if raw:
            out += block
        else:
            lz4_block_decompress(block, out)


def bg4_ungroup(data: bytes) -> bytes:
    """Undo xet's byte grouping: 4 planes (byte 0 of every 4-byte group, then byte 1, ...) back to rows."""
    n = len(data)
    sizes = [n // 4 + (1 if k < n % 4 else 0) for k in range(4)]
    out = bytearray(n)
    pos = 0
    for k, size in enumerate(sizes):
        out[k::4] = data[pos : pos + size]
        pos += size
    return bytes(out)


def xorb_chunks(xorb: bytes) -> list[bytes]:
    """The uncompressed chunks of a serialized xorb (8-byte header + data per chunk; stops at the footer)."""
    chunks, i = [], 0
    while i + 8 <= len(xorb):
        version, comp_size, scheme, raw_size = (
            xorb[i],
            int.from_bytes(xorb[i + 1 : i + 4], "little"),
            xorb[i + 4],
            int.from_bytes(xorb[i + 5 : i + 8], "little"),
        )
        if version != 0 or scheme > 2 or raw_size == 0:
            break  # not a chunk header: the xorb's trailing metadata
        data = xorb[i + 8 : i + 8 + comp_size]
        i += 8 + comp_size
        if scheme == 0:
            chunk = data
        else:
            chunk = lz4_frame_decompress(data)
            if scheme == 2:
                chunk = bg4_ungroup(chunk)
        if len(chunk) != raw_size:
            raise ValueError(f"chunk decoded to {len(chunk)} bytes, header says {raw_size}")
        chunks.append(chunk)
    return chunks


def xorb_chunk_offsets(xorb: bytes) -> list[int]:
    """Byte offset where each chunk's header starts, plus the end of the last chunk."""
    offsets, i = [], 0
    while i + 8 <= len(xorb) and xorb[i] == 0 and xorb[i + 4] <= 2 and int.from_bytes(xorb[i + 5 : i + 8], "little"):
        offsets.append(i)
        i += 8 + int.from_bytes(xorb[i + 1 : i + 4], "little")
    return offsets + [i]


def xet_hash_names(raw: bytes) -> tuple[str, str]:
    """A 32-byte xet hash as text: plain hex, and xet's form (each little-endian u64 printed as a number)."""
    words = "".join(f"{int.from_bytes(raw[k : k + 8], 'little'):016x}" for k in range(0, 32, 8))
    return raw.hex(), words


@dataclass
class ShardFile:
    file_hash: str  # xet's text form, as in `X-Xet-Hash` and /v1/reconstructions/{file_id}
    sha256: str | None
    segments: list[tuple[bytes, int, int]]  # (xorb hash, first chunk, end chunk)


def parse_shard_files(shard: bytes) -> list[ShardFile]:
    """The file reconstructions of an uploaded shard (header 48 bytes, then file blocks up to a bookend)."""
    if int.from_bytes(shard[32:40], "little") != 2:
        raise ValueError("unsupported shard header version")
    files, i = [], 48
    while True:
        file_hash, flags, n = (
            shard[i : i + 32],
            int.from_bytes(shard[i + 32 : i + 36], "little"),
            int.from_bytes(shard[i + 36 : i + 40], "little"),
        )
        i += 48
        if file_hash == b"\xff" * 32:
            return files
        segments = []
        for _ in range(n):
            e = shard[i : i + 48]
            segments.append((e[:32], int.from_bytes(e[40:44], "little"), int.from_bytes(e[44:48], "little")))
            i += 48
        if flags & (1 << 31):  # verification entries, one per segment
            i += 48 * n
        sha256 = None
        if flags & (1 << 30):  # metadata extension: the file's sha256, stored like xet hashes (u64 words)
            sha256 = xet_hash_names(shard[i : i + 32])[1]
            i += 48
        files.append(ShardFile(xet_hash_names(file_hash)[1], sha256, segments))


@dataclass(frozen=True)
class Blob:
    size: int
    content: bytes | None = None  # regular files
    sha256: str | None = None  # LFS files (content in the LFS store)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(lfs_pointer(self.sha256, self.size) if self.is_lfs else self.content)

    @property
    def preupload_oid(self) -> str:
        # What the client compares with its local oid to skip unchanged files: sha256 for LFS, git sha1 otherwise.
        return self.sha256 if self.is_lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0
    pr_titles: dict[int, str] = field(default_factory=dict)


class Reply(Exception):
    """An error reply: raised anywhere in a handler, sent with the Hub's X-Error-Code / X-Error-Message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The server and its state; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        token: str = "hf_loopbackTESTtoken0123456789",
        user: str = "tester",
        orgs: tuple[str, ...] = ("test-org",),
        tree_page_size: int = 1000,
    ):
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="hub-server-")
        self.root = Path(root or self._tmp.name)
        self.lfs_dir = self.root / "lfs"
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        self.token, self.user, self.orgs = token, user, set(orgs)
        self.tree_page_size = tree_page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lfs_puts: list[str] = []
        self.range_requests: list[str] = []
        self.xorbs: dict[str, bytes] = {}  # xet storage, by the hash in the upload URL
        self.xorb_uploads: list[str] = []
        self.fail_xorb_uploads = 0
        self.shard_uploads = 0
        self.shards: list[bytes] = []
        self.xet_downloads = False  # when True, resolve advertises X-Xet-Hash for files uploaded through xet
        self.xet_files: dict[str, ShardFile] = {}  # by sha256
        self.xorb_range_gets: list[str] = []
        self.xet_token = "xet-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
        self.fail_lfs_puts = 0
        self.truncate_downloads = 0
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests ----------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Full content of every file at a revision (LFS files read back from the store)."""
        repo = self.repo(repo_id)
        commit = repo.commits[self._resolve(repo, revision)]
        return {p: self._blob_bytes(b) for p, b in commit.files.items()}

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for m, p in self.requests if m == method and rx.search(p))

    # -- state ------------------------------------------------------------------------------------------
    def _blob_bytes(self, blob: Blob) -> bytes:
        return (self.lfs_dir / blob.sha256).read_bytes() if blob.is_lfs else blob.content

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{next(self._counter)}".encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].git_oid}\0".encode())
        commit = Commit(h.hexdigest(), parent, message, dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def authenticated(self, headers) -> bool:
        auth = headers.get("Authorization") or ""
        if not auth:
            return False
        if auth != f"Bearer {self.token}":
            raise Reply(401, "Invalid credentials in Authorization header")
        return True

    def get_repo(self, repo_type: str, repo_id: str, headers, *, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        authed = self.authenticated(headers)
        if repo is None or (repo.private and not authed):
            # The Hub answers 401 + RepoNotFound for both, so private repos cannot be probed.
            raise Reply(401 if not authed else 404, "Repository not found", "RepoNotFound")
        if write:
            if not authed:
                raise Reply(401, "You must be authenticated to write")
            if repo_id.split("/")[0] not in {self.user, *self.orgs}:
                raise Reply(403, f"You don't have the rights to write to {repo_id}")
        return repo


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing ---------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict | None = None,
            content_type: str = "application/json",
            head_only: bool = False,
            length: int | None = None,
        ):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body and not head_only:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            with server.lock:
                server.requests.append((method, path))
            try:
                body = self._body() if method in ("POST", "PUT") else b""
                self._route(method, path, query, body)
            except Reply as e:
                headers = dict(e.headers)
                if e.code:
                    headers["X-Error-Code"] = e.code
                headers["X-Error-Message"] = e.message
                self._json(e.status, {"error": e.message}, headers)

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # -- routes -------------------------------------------------------------------------------------
        def _route(self, method: str, path: str, query: dict, body: bytes):
            m = None

            def match(pattern: str) -> bool:
                nonlocal m
                m = re.fullmatch(pattern, path)
                return m is not None

            repo = r"(?P<repo>[^/]+/[^/]+?)"
            if method == "POST" and match(r"/api/repos/create"):
                return self.create_repo(json.loads(body))
            if method == "POST" and match(r"/api/validate-yaml"):
                return self.validate_yaml(json.loads(body))
            if method == "GET" and match(rf"/api/models/{repo}(?:/revision/(?P<rev>[^/]+))?"):
                return self.repo_info(m["repo"], unquote(m["rev"] or "main"))
            if method == "GET" and match(rf"/api/models/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?"):
                return self.tree(m["repo"], unquote(m["rev"]), unquote(m["sub"] or ""), query)
            if method == "POST" and match(rf"/api/models/{repo}/preupload/(?P<rev>[^/]+)"):
                return self.preupload(m["repo"], unquote(m["rev"]), json.loads(body), query)
            if method == "POST" and match(rf"/api/models/{repo}/commit/(?P<rev>[^/]+)"):
                return self.commit(m["repo"], unquote(m["rev"]), body, query)
            if method == "POST" and match(rf"/api/models/{repo}/branch/(?P<branch>[^/]+)"):
                return self.create_branch(m["repo"], unquote(m["branch"]), json.loads(body or b"{}"))
            if method == "POST" and match(rf"/{repo}\.git/info/lfs/objects/batch"):
                return self.lfs_batch(m["repo"], json.loads(body))
            if method == "POST" and match(rf"/{repo}\.git/info/lfs/objects/verify"):
                return self.lfs_verify(json.loads(body))
            if method == "PUT" and match(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"):
                return self.lfs_put(m["oid"], body)
            if method in ("GET", "HEAD") and match(rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)"):
                return self.resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]), head_only=method == "HEAD")
            if method == "POST" and match(rf"/api/models/{repo}/discussions"):
                return self.open_pull_request(m["repo"], json.loads(body))
            if method == "GET" and match(rf"/api/models/{repo}/discussions/(?P<num>\d+)"):
                return self.discussion(m["repo"], int(m["num"]))
            if method == "GET" and match(rf"/api/models/{repo}/xet-(?P<kind>read|write)-token/(?P<rev>[^/]+)"):
                return self.xet_token(m["repo"], m["kind"])
            if path.startswith("/v1/") or path.startswith("/v2/"):
                return self.cas(method, path, body)
            if method == "GET" and match(r"/xorb-data/(?P<h>[0-9a-f]{64})"):
                return self.xorb_data(m["h"])
            raise Reply(404, f"No route for {method} {path} on this test server")

        def create_repo(self, payload: dict):
            if not server.authenticated(self.headers):
                raise Reply(401, "You must be authenticated to create a repository")
            name, org = payload.get("name"), payload.get("organization") or server.user
            repo_type = payload.get("type") or "model"
            visibility = payload.get("visibility", "public")
            if visibility not in ("public", "private", "protected"):
                raise Reply(400, f"Invalid visibility: {visibility!r}")
            if org not in {server.user, *server.orgs}:
                raise Reply(403, f"You don't have the rights to create a model under the namespace {org}")
            repo_id = f"{org}/{name}"
            url = f"{server.url}/{repo_id}"
            with server.lock:
                if (repo_type, repo_id) in server.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                repo = Repo(repo_id, repo_type, private=visibility == "private")
                first = server._new_commit(
                    repo, None, "initial commit", {".gitattributes": Blob(len(GITATTRIBUTES), GITATTRIBUTES)}
                )
                repo.branches["main"] = first.oid
                server.repos[(repo_type, repo_id)] = repo
            self._json(200, {"url": url, "name": repo_id, "id": first.oid})

        def validate_yaml(self, payload: dict):
            content = payload.get("content", "")
            errors = []
            m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
            if m:
                try:
                    meta = yaml.safe_load(m.group(1)) or {}
                except yaml.YAMLError as exc:
                    meta, errors = {}, [{"message": f"YAML parse error: {exc}"}]
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
                else:
                    tags = meta.get("tags", [])
                    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                        errors.append({"message": '"tags" must be a list of strings'})
                    rel = meta.get("base_model_relation")
                    if rel is not None and rel not in VALID_BASE_MODEL_RELATIONS:
                        errors.append(
                            {"message": f'"base_model_relation" must be one of {sorted(VALID_BASE_MODEL_RELATIONS)}'}
                        )
                    if rel is not None and not meta.get("base_model"):
                        errors.append({"message": '"base_model_relation" needs "base_model"'})
            self._json(400 if errors else 200, {"errors": errors, "warnings": []})

        def repo_info(self, repo_id: str, rev: str):
            repo = server.get_repo("model", repo_id, self.headers)
            sha = server._resolve(repo, rev)
            files = repo.commits[sha].files
            self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                    "tags": [],
                },
            )

        def tree(self, repo_id: str, rev: str, sub: str, query: dict):
            repo = server.get_repo("model", repo_id, self.headers)
            commit = repo.commits[server._resolve(repo, rev)]
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{sub.strip('/')}/" if sub else ""
            entries, dirs = [], set()
            for p in sorted(commit.files):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :]
                parts = rest.split("/")
                for i in range(1, len(parts)):  # folders on the way
                    d = prefix + "/".join(parts[:i])
                    if (recursive or i == 1) and d not in dirs:
                        dirs.add(d)
                        entries.append(
                            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                        )
                if len(parts) > 1 and not recursive:
                    continue
                blob = commit.files[p]
                entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": p}
                if blob.is_lfs:
                    entry["lfs"] = {
                        "oid": blob.sha256,
                        "size": blob.size,
                        "pointerSize": len(lfs_pointer(blob.sha256, blob.size)),
                    }
                entries.append(entry)
            if sub and not entries:
                raise Reply(404, f"{sub} does not exist", "EntryNotFound")
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start : start + server.tree_page_size]
            headers = {}
            if start + server.tree_page_size < len(entries):
                cursor = start + server.tree_page_size
                nxt = f"{server.url}{urlsplit(self.path).path}?recursive={recursive}&expand=False&cursor={cursor}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            self._json(200, page, headers)

        def preupload(self, repo_id: str, rev: str, payload: dict, query: dict):
            repo = server.get_repo("model", repo_id, self.headers, write=True)
            files = repo.commits[server._resolve(repo, "main" if query.get("create_pr") else rev)].files
            out = []
            for f in payload["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                existing = files.get(f["path"])
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": existing.preupload_oid if existing else None,
                    }
                )
            self._json(200, {"files": out})

        def lfs_batch(self, repo_id: str, payload: dict):
            server.get_repo("model", repo_id, self.headers, write=True)
            if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                raise Reply(400, "only basic uploads are served")
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if (server.lfs_dir / oid).is_file():
                    objects.append({"oid": oid, "size": size})  # already stored: no actions, client skips it
                else:
                    objects.append(
                        {
                            "oid": oid,
                            "size": size,
                            "authenticated": True,
                            "actions": {
                                "upload": {"href": f"{server.url}/lfs-upload/{oid}", "expires_in": 900},
                                "verify": {"href": f"{server.url}/{repo_id}.git/info/lfs/objects/verify"},
                            },
                        }
                    )
            self._send(
                200,
                json.dumps({"transfer": "basic", "objects": objects}).encode(),
                content_type="application/vnd.git-lfs+json",
            )

        def lfs_put(self, oid: str, body: bytes):
            with server.lock:
                if server.fail_lfs_puts > 0:
                    server.fail_lfs_puts -= 1
                    raise Reply(403, "Request has expired")
            if hashlib.sha256(body).hexdigest() != oid:
                raise Reply(400, "sha256 of the uploaded content does not match the oid")
            tmp = server.lfs_dir / f".{oid}.{threading.get_ident()}.tmp"
            tmp.write_bytes(body)
            os.replace(tmp, server.lfs_dir / oid)
            with server.lock:
                server.lfs_puts.append(oid)
            self._send(200)

        def lfs_verify(self, payload: dict):
            path = server.lfs_dir / payload["oid"]
            if not path.is_file() or path.stat().st_size != payload["size"]:
                raise Reply(404, "object not found")
            self._json(200, {})

        def commit(self, repo_id: str, rev: str, body: bytes, query: dict):
            repo = server.get_repo("model", repo_id, self.headers, write=True)
            if not self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                raise Reply(400, "commit payload must be application/x-ndjson")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                raise Reply(400, "first NDJSON line must be the header")
            header = lines[0]["value"]
            create_pr = bool(query.get("create_pr"))
            with server.lock:
                base = server._resolve(repo, "main" if create_pr else rev)
                if rev not in repo.branches and not create_pr:
                    raise Reply(400, f"Cannot commit to {rev}: not a branch", "RevisionNotFound")
                if header.get("parentCommit") and header["parentCommit"] != base:
                    raise Reply(412, "A commit has happened since. Please refresh and try again.")
                files = dict(repo.commits[base].files)
                for line in lines[1:]:
                    key, v = line["key"], line["value"]
                    if key == "file":
                        data = base64.b64decode(v["content"])
                        files[v["path"]] = Blob(len(data), content=data)
                    elif key == "lfsFile":
                        stored = server.lfs_dir / v["oid"]
                        if not stored.is_file():
                            raise Reply(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                        files[v["path"]] = Blob(stored.stat().st_size, sha256=v["oid"])
                    elif key == "deletedFile":
                        if v["path"] not in files:
                            raise Reply(404, "A file with this name doesn't exist", "EntryNotFound")
                        del files[v["path"]]
                    elif key == "deletedFolder":
                        prefix = v["path"].rstrip("/") + "/"
                        files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                    else:
                        raise Reply(400, f"unknown commit operation {key!r}")
                commit = server._new_commit(repo, base, header["summary"], files)
                reply = {
                    "commitUrl": f"{server.url}/{repo_id}/commit/{commit.oid}",
                    "commitOid": commit.oid,
                    "success": True,
                    "pullRequestUrl": None,
                }
                if create_pr:
                    repo.pr_count += 1
                    repo.pr_titles[repo.pr_count] = header["summary"]
                    repo.branches[f"refs/pr/{repo.pr_count}"] = commit.oid
                    reply["pullRequestUrl"] = f"{server.url}/{repo_id}/discussions/{repo.pr_count}"
                else:
                    repo.branches[rev] = commit.oid
            self._json(200, reply)

        def create_branch(self, repo_id: str, branch: str, payload: dict):
            repo = server.get_repo("model", repo_id, self.headers, write=True)
            with server.lock:
                if branch in repo.branches:
                    raise Reply(409, f"Reference refs/heads/{branch} already exists")
                repo.branches[branch] = server._resolve(repo, payload.get("startingPoint") or "main")
            self._json(200, {})

        def resolve(self, repo_id: str, rev: str, file: str, head_only: bool):
            repo = server.get_repo("model", repo_id, self.headers)
            sha = server._resolve(repo, rev)
            blob = repo.commits[sha].files.get(file)
            if blob is None:
                raise Reply(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            etag = blob.sha256 if blob.is_lfs else blob.git_oid
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            xet_file = server.xet_files.get(blob.sha256) if blob.is_lfs and server.xet_downloads else None
            if xet_file is not None:  # the client then downloads through the CAS reconstruction API
                headers["X-Xet-Hash"] = xet_file.file_hash
                headers["X-Xet-Refresh-Route"] = f"{server.url}/api/models/{repo_id}/xet-read-token/{sha}"
            data = b"" if head_only else server._blob_bytes(blob)
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if not head_only and not rng and blob.size > 1:
                with server.lock:
                    truncate = server.truncate_downloads > 0
                    server.truncate_downloads -= truncate
                if truncate:  # a connection that drops mid-file
                    self.send_response(200)
                    for k, v in {
                        **headers,
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(blob.size),
                    }.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[: blob.size // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
            if rng and not head_only:
                with server.lock:
                    server.range_requests.append(file)
                start = int(rng[1])
                end = int(rng[2]) if rng[2] else blob.size - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
                return self._send(206, data[start : end + 1], headers, content_type="application/octet-stream")
            self._send(
                200, data, headers, content_type="application/octet-stream", head_only=head_only, length=blob.size
            )

        def open_pull_request(self, repo_id: str, payload: dict):
            # What the xet uploader calls for create_pr: a PR (ref refs/pr/N at main's head), then commits to it.
            repo = server.get_repo("model", repo_id, self.headers, write=True)
            if not payload.get("pullRequest"):
                raise Reply(400, "only pull requests are served")
            with server.lock:
                repo.pr_count += 1
                repo.branches[f"refs/pr/{repo.pr_count}"] = repo.branches["main"]
                repo.pr_titles[repo.pr_count] = payload.get("title", "")
            self._json(200, {"num": repo.pr_count})

        def discussion(self, repo_id: str, num: int):
            repo = server.get_repo("model", repo_id, self.headers)
            if num not in repo.pr_titles:
                raise Reply(404, "Discussion not found")
            self._json(
                200,
                {
                    "num": num,
                    "title": repo.pr_titles[num],
                    "author": {"name": server.user},
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "status": "draft",
                    "isPullRequest": True,
                    "repo": {"name": repo_id, "type": "model"},
                    "events": [],
                    "filesWithConflicts": [],
                    "changes": {"base": "refs/heads/main"},
                    "diff": "",
                },
            )

        # -- xet (CAS) ----------------------------------------------------------------------------------------
        def xet_token(self, repo_id: str, kind: str):
            server.get_repo("model", repo_id, self.headers, write=kind == "write")
            exp = int(time.time()) + 3600
            headers = {
                "X-Xet-Cas-Url": server.url,
                "X-Xet-Access-Token": server.xet_token,
                "X-Xet-Token-Expiration": str(exp),
            }
            self._json(200, {"accessToken": server.xet_token, "exp": exp, "casUrl": server.url}, headers)

        def cas(self, method: str, path: str, body: bytes):
            if path == "/v1/telemetry":
                return self._json(200, {})
            if self.headers.get("Authorization") != f"Bearer {server.xet_token}":
                raise Reply(401, "invalid or missing xet token")
            m = re.fullmatch(r"/v1/xorbs/[^/]+/(?P<h>[0-9a-f]{64})", path)
            if method == "POST" and m:
                with server.lock:
                    if server.fail_xorb_uploads > 0:
                        server.fail_xorb_uploads -= 1
                        raise Reply(403, "simulated storage failure")
                    inserted = m["h"] not in server.xorbs
                    server.xorbs[m["h"]] = body
                    server.xorb_uploads.append(m["h"])
                return self._json(200, {"was_inserted": inserted})
            if method == "POST" and path == "/v1/shards":
                with server.lock:
                    server.shards.append(body)
                for f in parse_shard_files(body):
                    data = b"".join(self._xorb_range(*seg) for seg in f.segments)
                    sha = hashlib.sha256(data).hexdigest()
                    if f.sha256 and f.sha256 != sha:
                        raise Reply(400, "shard sha256 does not match the reconstructed file")
                    tmp = server.lfs_dir / f".{sha}.{threading.get_ident()}.tmp"
                    tmp.write_bytes(data)
                    os.replace(tmp, server.lfs_dir / sha)
                    with server.lock:
                        server.xet_files[sha] = f
                with server.lock:
                    server.shard_uploads += 1
                return self._json(200, {"result": 1})
            m = re.fullmatch(r"/v1/reconstructions?/(?P<id>[0-9a-f]{64})", path)
            if method == "GET" and m:
                return self._json(200, self._reconstruction(m["id"]))
            # Global dedup lookups, xorb grants, v2 shards and reconstructions: not served (the client falls back).
            raise Reply(404, f"{method} {path} is not served by this test CAS")

        def xorb_data(self, name: str):
            # The "transfer" service behind a reconstruction's fetch_info URLs: like a presigned URL, no
            # Hub token, and only the byte range the reconstruction named.
            rng = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
            if name not in server.xorbs or not rng:
                raise Reply(404 if rng else 416, "unknown xorb or missing Range")
            with server.lock:
                server.xorb_range_gets.append(name)
            self._send(206, server.xorbs[name][int(rng[1]) : int(rng[2]) + 1], content_type="application/octet-stream")

        def _reconstruction(self, file_id: str) -> dict:
            f = next((f for f in server.xet_files.values() if f.file_hash == file_id), None)
            if f is None:
                raise Reply(404, "file not found")
            terms, fetch_info = [], {}
            for raw, start, end in f.segments:
                name = next(n for n in xet_hash_names(raw) if n in server.xorbs)
                xorb = server.xorbs[name]
                offsets = xorb_chunk_offsets(xorb)
                terms.append(
                    {
                        "hash": name,
                        "range": {"start": start, "end": end},
                        "unpacked_length": len(b"".join(xorb_chunks(xorb)[start:end])),
                    }
                )
                fetch_info.setdefault(name, []).append(
                    {
                        "range": {"start": start, "end": end},
                        "url": f"{server.url}/xorb-data/{name}",
                        "url_range": {"start": offsets[start], "end": offsets[end] - 1},
                    }
                )
            return {"offset_into_first_range": 0, "terms": terms, "fetch_info": fetch_info}

        def _xorb_range(self, raw_hash: bytes, start: int, end: int) -> bytes:
            for name in xet_hash_names(raw_hash):
                if name in server.xorbs:
                    return b"".join(xorb_chunks(server.xorbs[name])[start:end])
            raise Reply(400, f"shard references unknown xorb {raw_hash.hex()}")

    return Handler


# the one token the loopback Hub accepts; the `hub` fixture (tests/conftest.py) sets HF_TOKEN to it
TOKEN = "hf_loopbackSECRETtoken5f3a9c1e7b2d"
