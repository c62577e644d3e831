"""A loopback LangSmith stand-in that records the runs a `langsmith.Client` sends.

It answers the few endpoints the tracing client uses: `GET /info`, `POST /runs/multipart`
(plain or zstd-compressed), `POST /runs/batch`, `POST /runs` and `PATCH /runs/{id}`. Posts and
patches of one run are merged into one record, so a test reads each run as LangSmith shows it.
Standard library only (`http.server` in a thread); `zstandard` is used when it is installed.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# `post.<run id>` or `post.<run id>.<field>`; feedback and attachments are ignored.
_PART_RE = re.compile(r"^(post|patch)\.([0-9a-fA-F-]{36})(?:\.(\w+))?$")
_RUN_PATH_RE = re.compile(r"^/runs/([0-9a-fA-F-]{36})$")


@dataclass
class RecordedRun:
    """One run as received: the fields of its post merged with those of its patches."""

    id: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.fields.get("name", ""))

    @property
    def run_type(self) -> str:
        return str(self.fields.get("run_type", ""))

    @property
    def parent_run_id(self) -> str | None:
        parent = self.fields.get("parent_run_id")
        return str(parent) if parent else None

    @property
    def tags(self) -> list[str]:
        return list(self.fields.get("tags") or [])

    @property
    def metadata(self) -> dict[str, Any]:
        return dict((self.fields.get("extra") or {}).get("metadata") or {})


class LangSmithRecorder:
    """Records LangSmith runs on `http://127.0.0.1:<port>`; use `url` as the client's api_url.

    Args:
        zstd: Advertise `zstd_compression_enabled` in `/info` (the client then sends
            compressed multipart bodies, as it does to a real LangSmith).
    """

    def __init__(self, *, zstd: bool = False) -> None:
        self.zstd = zstd
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._runs: dict[str, RecordedRun] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "recorder not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def runs(self) -> list[RecordedRun]:
        """A snapshot of the runs received so far."""
        with self._lock:
            return [RecordedRun(r.id, dict(r.fields)) for r in self._runs.values()]

    def start(self) -> None:
        """Listen on a free loopback port, serving from a daemon thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="langsmith-recorder",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def info(self) -> dict[str, Any]:
        # No `batch_ingest_config`: a partial one makes the client misbehave; without it the
        # client uses its defaults (multipart first).
        return {"version": "0.10.0", "instance_flags": {"zstd_compression_enabled": self.zstd}}

    def record(self, operation: str, run_id: str, values: dict[str, Any]) -> None:
        """Merge one post or patch of a run."""
        with self._lock:
            run = self._runs.setdefault(run_id, RecordedRun(run_id))
            # A post may arrive after its patch (separate batches): patched values win.
            older, newer = (values, run.fields) if operation == "post" else (run.fields, values)
            merged = {**older, **newer}
            if isinstance(older.get("extra"), dict) and isinstance(newer.get("extra"), dict):
                merged["extra"] = {**older["extra"], **newer["extra"]}
            run.fields = merged

    def record_multipart(self, content_type: str, body: bytes) -> None:
        """Split a multipart/form-data body into per-run posts and patches."""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
        )
        if not message.is_multipart():
            raise ValueError(f"not a multipart body: {content_type}")
        grouped: dict[tuple[str, str], dict[str, Any]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            match = _PART_RE.match(str(name or ""))
            if match is None:
                continue
            operation, run_id, key = match.groups()
            raw = part.get_payload(decode=True)
            value = json.loads(raw) if isinstance(raw, bytes) and raw else None
            values = grouped.setdefault((operation, run_id), {})
            if key is None:
                values.update(value or {})
            else:
                values[key] = value
        for (operation, run_id), values in grouped.items():
            self.record(operation, run_id, values)


def _handler_for(recorder: LangSmithRecorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                data = b"".join(chunks)
            else:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding", "").lower() == "zstd":
                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                    data = reader.read()
            return data

        def _handle(self, method: str) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            recorder.requests.append((method, path))
            try:
                body = self._body() if method != "GET" else b""
                if method == "GET" and path == "/info":
                    return self._reply(200, recorder.info())
                if method == "POST" and path == "/runs/multipart":
                    recorder.record_multipart(self.headers.get("Content-Type", ""), body)
                    return self._reply(202, {})
                if method == "POST" and path == "/runs/batch":
                    batch = json.loads(body or b"{}")
                    for operation in ("post", "patch"):
                        for run in batch.get(operation) or []:
                            recorder.record(operation, str(run["id"]), run)
                    return self._reply(202, {})
                if method == "POST" and path == "/runs":
                    run = json.loads(body)
                    recorder.record("post", str(run["id"]), run)
                    return self._reply(202, {})
                match = _RUN_PATH_RE.match(path)
                if method == "PATCH" and match:
                    recorder.record("patch", match.group(1), json.loads(body))
                    return self._reply(202, {})
                return self._reply(404, {"detail": f"not recorded: {method} {path}"})
            except Exception as exc:  # a parse error must show up in the test, not vanish
                recorder.errors.append(f"{method} {path}: {exc!r}")
                return self._reply(500, {"detail": repr(exc)})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PATCH(self) -> None:
            self._handle("PATCH")

    return Handler


@contextmanager
def running_recorder(*, zstd: bool = False) -> Iterator[LangSmithRecorder]:
    """A started recorder, stopped on exit."""
    recorder = LangSmithRecorder(zstd=zstd)
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.stop()
