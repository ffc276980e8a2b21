"""Helpers for the compatibility tests: run a real Myelin node, talk to it with axonclient.

A node is the real binary (`MYELIN_BIN`, default `target/release/myelin`), started in a fresh temp
directory (its working directory too, so no stray `axonserver.properties` / `myelin.toml` is read)
with an `axonserver.properties` written by the test, on free loopback ports. `MyelinNode.stop()`
sends SIGTERM to the supervisor, waits, and falls back to SIGKILL of the whole process group.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

import grpc
from google.protobuf.internal.encoder import _VarintBytes
from axonclient.client import AxonClient
from axonclient.protos import common_pb2, event_pb2, event_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "myelin"
CONTEXT_HEADER = "axoniq-context"
TOKEN_HEADER = "AxonIQ-Access-Token"
ERROR_TRAILER = "axoniq-errorcode"

# Environment variables that would configure the node behind the test's back.
_CONFIG_ENV_PREFIXES = ("AXONIQ_", "MYELIN_", "SERVER_")
_CONFIG_ENV_NAMES = {"RUNTIME_DIRECTORY", "RUST_LOG", "NOTIFY_SOCKET"}


def myelin_bin() -> Path:
    return Path(os.environ.get("MYELIN_BIN", str(DEFAULT_BIN)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeStartError(RuntimeError):
    pass


class MyelinNode:
    """One Myelin node (supervisor + children) on loopback ports, data in a temp dir."""

    def __init__(self, properties: dict[str, str] | None = None, data_root: str | None = None):
        self.properties = dict(properties or {})
        self._own_root = data_root is None
        self.root = Path(data_root or tempfile.mkdtemp(prefix="myc", dir="/tmp"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "node.log"
        self.proc: subprocess.Popen | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.internal_port = 0
        self._log_file = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "MyelinNode":
        binary = myelin_bin()
        if not binary.is_file():
            raise NodeStartError(
                f"Myelin binary not found at {binary}; build it with `cargo build --release` "
                "or point MYELIN_BIN at it"
            )
        last_error = None
        for _attempt in range(3):  # a free port may be taken between probing and binding
            self.grpc_port, self.http_port, self.internal_port = free_port(), free_port(), free_port()
            try:
                self._spawn(binary)
                self._wait_ready(timeout)
                return self
            except NodeStartError as exc:
                last_error = exc
                self.stop(remove=False)
                if "address" not in self.log_tail().lower():
                    break
        raise last_error  # type: ignore[misc]

    def _spawn(self, binary: Path) -> None:
        props = self.root / "axonserver.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in self.properties.items()))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_CONFIG_ENV_PREFIXES) and k not in _CONFIG_ENV_NAMES
        }
        env["RUST_LOG"] = "info,openraft=warn"
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--properties", str(props),
                "--data-dir", str(self.data_dir),
                "--bind-address", "127.0.0.1",
                "--hostname", "127.0.0.1",
                "--port", str(self.grpc_port),
                "--http-port", str(self.http_port),
                "--internal-port", str(self.internal_port),
            ],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,  # own process group: the SIGKILL fallback reaches the children
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeStartError(
                    f"myelin exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                # Ready once the event store serves the contexts and admin's control DB lists them.
                me = self.me()
                names = {c["name"] for c in me.get("contexts", [])}
                wanted = set(self.properties.get("myelin.contexts", "default").split(","))
                if wanted <= names and wanted <= {c["context"] for c in self.admin_get("/v1/public/context")}:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.1)
        raise NodeStartError(f"myelin not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, remove: bool = True) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the supervisor leads its own group
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _kill_group(pgid)
                    proc.wait(timeout=5)
            # children die with the supervisor (PDEATHSIG); make sure of it for this group only
            deadline = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(pgid):
                _kill_group(pgid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if remove and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        self.stop(remove=False)
        self.start()

    # -- access ---------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_token(self) -> str | None:
        """The configured admin token, sent on the harness's own HTTP calls."""
        return self.properties.get("axoniq.axonserver.accesscontrol.admin-token")

    def me(self) -> dict:
        return self.admin_get("/v1/public/me")

    def admin_get(self, path: str):
        """GET on the admin API with the admin token (if any); the decoded JSON."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self.admin_token:
            request.add_header(TOKEN_HEADER, self.admin_token)
        with urllib.request.urlopen(request, timeout=2) as r:
            if r.status != 200:
                raise ValueError(f"status {r.status}")
            return json.loads(r.read())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.uri, options=list(options.items()))

    def client(self, context: str | None = None, token: str | None = None) -> AxonClient:
        """axonclient's high-level AxonClient, optionally bound to a context and carrying an access
        token, both added to every call by an interceptor (axonclient sends neither itself)."""
        client = AxonClient(self.uri)
        headers = ([(CONTEXT_HEADER, context)] if context is not None else []) + (
            [(TOKEN_HEADER.lower(), token)] if token is not None else []
        )
        if headers:
            client.channel = grpc.intercept_channel(client.channel, HeaderInterceptor(headers))
            client.event_store_stub = event_pb2_grpc.EventStoreStub(client.channel)
        return client


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class HeaderInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (e.g. `AxonIQ-Context`, `AxonIQ-Access-Token`) to every call."""

    def __init__(self, headers: list[tuple[str, str]]):
        self.headers = list(headers)

    def _details(self, details):
        metadata = list(details.metadata or []) + self.headers
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# -- messages ------------------------------------------------------------------------------------
def ctx_md(context: str | None) -> list[tuple[str, str]]:
    return [] if context is None else [(CONTEXT_HEADER, context)]


def event(
    aggregate_id: str = "",
    seq: int = 0,
    aggregate_type: str = "Order",
    payload_type: str = "OrderEvent",
    revision: str = "1",
    data: bytes = b"",
    timestamp: int | None = None,
    message_id: str | None = None,
    meta: dict | None = None,
) -> event_pb2.Event:
    return event_pb2.Event(
        message_identifier=message_id if message_id is not None else f"msg-{aggregate_id}-{seq}-{time.monotonic_ns()}",
        aggregate_identifier=aggregate_id,
        aggregate_sequence_number=seq,
        aggregate_type=aggregate_type,
        timestamp=timestamp if timestamp is not None else int(time.time() * 1000),
        payload=common_pb2.SerializedObject(type=payload_type, revision=revision, data=data),
        meta_data=meta or {},
    )


def agg_events(aggregate_id: str, start: int, count: int, **kw) -> list[event_pb2.Event]:
    return [event(aggregate_id, s, data=f"{aggregate_id}:{s}".encode(), **kw) for s in range(start, start + count)]


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


class EventStore:
    """Thin wrapper over axonclient's generated EventStoreStub with a context header."""

    def __init__(self, channel: grpc.Channel, context: str | None = None):
        self.stub = event_pb2_grpc.EventStoreStub(channel)
        self.context = context
        self.md = ctx_md(context)

    def append(self, events: Iterable[event_pb2.Event], timeout: float = 10):
        return self.stub.AppendEvent(iter(list(events)), metadata=self.md, timeout=timeout)

    def append_snapshot(self, ev: event_pb2.Event, timeout: float = 10):
        return self.stub.AppendSnapshot(ev, metadata=self.md, timeout=timeout)

    def aggregate(self, aggregate_id: str, initial: int = 0, max_seq: int = 0, snapshots: bool = False):
        req = event_pb2.GetAggregateEventsRequest(
            aggregate_id=aggregate_id, initial_sequence=initial, allow_snapshots=snapshots
        )
        if max_seq:
            # axonclient's (older) proto has no `max_sequence` (field 4, int64): send it as the
            # field it is on the wire in AxonIQ's current proto.
            req = with_varint_field(req, 4, max_seq)
        return list(self.stub.ListAggregateEvents(req, metadata=self.md, timeout=10))

    def snapshots(self, aggregate_id: str, initial: int = 0, max_seq: int = 0, max_results: int = 0):
        req = event_pb2.GetAggregateSnapshotsRequest(
            aggregate_id=aggregate_id, initial_sequence=initial, max_sequence=max_seq, max_results=max_results
        )
        return list(self.stub.ListAggregateSnapshots(req, metadata=self.md, timeout=10))

    def last_token(self) -> int:
        return self.stub.GetLastToken(event_pb2.GetLastTokenRequest(), metadata=self.md, timeout=10).token

    def first_token(self) -> int:
        return self.stub.GetFirstToken(event_pb2.GetFirstTokenRequest(), metadata=self.md, timeout=10).token

    def token_at(self, instant: int) -> int:
        return self.stub.GetTokenAt(event_pb2.GetTokenAtRequest(instant=instant), metadata=self.md, timeout=10).token

    def highest_seq(self, aggregate_id: str) -> int:
        req = event_pb2.ReadHighestSequenceNrRequest(aggregate_id=aggregate_id)
        return self.stub.ReadHighestSequenceNr(req, metadata=self.md, timeout=10).to_sequence_nr

    def read_all(self, start: int = 0, timeout: float = 10) -> list[event_pb2.EventWithToken]:
        """Every event from `start` up to the current last token, through ListEvents."""
        last = self.last_token()
        if last < start:
            return []
        with EventStream(self, start, permits=last - start + 1) as stream:
            return stream.take(last - start + 1, timeout=timeout)

    def tracker(self, start: int, permits: int, blacklist: Sequence[tuple[str, str]] = (), **kw) -> "EventStream":
        return EventStream(self, start, permits, blacklist, **kw)


END = object()
"""Put on a request queue, ends the request stream of a call fed by `queue_requests`."""
_END = END


def queue_requests(requests: queue.Queue):
    """The request side of a streaming call: yields what is put on `requests` until `END`."""
    while True:
        item = requests.get()
        if item is END:
            return
        yield item


class EventStream:
    """A raw ListEvents call whose request stream the test drives message by message.

    Responses are read on a background thread into a queue, so a test can wait for exactly N
    events, or assert that none arrives within a time window.
    """

    def __init__(self, store: EventStore, start: int, permits: int, blacklist=(), client_id="compat-test"):
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.completed = threading.Event()
        self._requests.put(
            event_pb2.GetEventsRequest(
                tracking_token=start,
                number_of_permits=permits,
                client_id=client_id,
                component_name="compat",
                processor="compat-processor",
                blacklist=[event_pb2.PayloadDescription(type=t, revision=r) for t, r in blacklist],
            )
        )
        self.call = store.stub.ListEvents(queue_requests(self._requests), metadata=store.md)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


    def _read(self):
        try:
            for ewt in self.call:
                self._responses.put(ewt)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.completed.set()
            self._responses.put(_END)

    def permits(self, n: int, blacklist: Sequence[tuple[str, str]] = ()) -> None:
        self._requests.put(
            event_pb2.GetEventsRequest(
                number_of_permits=n,
                blacklist=[event_pb2.PayloadDescription(type=t, revision=r) for t, r in blacklist],
            )
        )

    def half_close(self) -> None:
        self._requests.put(_END)

    def take(self, n: int, timeout: float = 10) -> list[event_pb2.EventWithToken]:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            remaining = deadline - time.monotonic()
            try:
                item = self._responses.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(f"expected {n} events within {timeout}s, got {len(got)}: {tokens(got)}")
            if item is _END:
                self._responses.put(_END)
                raise AssertionError(
                    f"stream ended after {len(got)} of {n} events: {tokens(got)}; error={self.error!r}"
                )
            got.append(item)
        return got

    def assert_quiet(self, seconds: float = 1.0) -> None:
        try:
            item = self._responses.get(timeout=seconds)
        except queue.Empty:
            return
        if item is _END:
            self._responses.put(_END)
            raise AssertionError(f"stream ended unexpectedly; error={self.error!r}")
        raise AssertionError(f"unexpected event beyond the granted permits: token {item.token}")

    def wait_end(self, timeout: float = 10) -> None:
        if not self.completed.wait(timeout):
            raise AssertionError(f"ListEvents did not complete within {timeout}s")

    def close(self) -> None:
        self.half_close()
        self.call.cancel()
        self._reader.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def with_varint_field(message, number: int, value: int):
    """A copy of `message` carrying an extra varint field unknown to its (older) descriptor."""
    raw = message.SerializeToString() + _VarintBytes(number << 3) + _VarintBytes(value & 0xFFFFFFFFFFFFFFFF)
    copy = type(message).FromString(raw)
    assert copy.SerializeToString() == raw, "protobuf runtime dropped the unknown field"
    return copy


def tokens(ewts) -> list[int]:
    return [e.token for e in ewts]


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """Call fn expecting a gRPC error; return it (fails the test if the call succeeds)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"expected a gRPC error from {getattr(fn, '__name__', fn)}, call succeeded")


def error_code(exc: grpc.RpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key.lower() == ERROR_TRAILER:
            return value
    return None
