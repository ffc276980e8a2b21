"""Helpers for the compatibility tests: run a real Myelin node, talk to it with axonclient.

A node is the real binary (`MYELIN_BIN`, default `target/release/myelin`), started in a fresh temp
directory (its working directory too, so no stray `axonserver.properties` / `myelin.toml` is read)
with an `axonserver.properties` written by the test, on free loopback ports. `MyelinNode.stop()`
sends SIGTERM to the supervisor, waits, and falls back to SIGKILL of the whole process group.

`MyelinCluster` is three such nodes on their own loopback addresses (127.0.0.1-3) that form a
cluster by themselves (`autocluster`), every context replicated on all three; `follower()` is a
node that does not lead `default`, the one the tests talk to when `MYELIN_COMPAT_CLUSTER=3`.
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeStartError(RuntimeError):
    pass


class MyelinNode:
    """One Myelin node (supervisor + children) on loopback ports, data in a temp dir."""

    def __init__(
        self,
        properties: dict[str, str] | None = None,
        data_root: str | None = None,
        host: str = "127.0.0.1",
        fixed_ports: bool = False,
    ):
        self.properties = dict(properties or {})
        self._own_root = data_root is None
        self.root = Path(data_root or tempfile.mkdtemp(prefix="myc", dir="/tmp"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "node.log"
        self.proc: subprocess.Popen | None = None
        # The loopback address the node listens on (every port) and tells clients and peers.
        self.host = host
        # A cluster member keeps its ports for life (its peers know its internal address): they
        # are chosen here, once; a standalone node chooses new ones at every start.
        self.fixed_ports = fixed_ports
        self.grpc_port = self.http_port = self.internal_port = 0
        if fixed_ports:
            self._choose_ports()
        self.cluster: "MyelinCluster | None" = None  # the cluster it is a member of, if any
        self._log_file = None

    def _choose_ports(self) -> None:
        self.grpc_port, self.http_port, self.internal_port = (free_port(self.host) for _ in range(3))

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "MyelinNode":
        binary = myelin_bin()
        if not binary.is_file():
            raise NodeStartError(
                f"Myelin binary not found at {binary}; build it with `cargo build --release` "
                "or point MYELIN_BIN at it"
            )
        last_error = None
        # a free port may be taken between probing and binding: a standalone node tries others
        for _attempt in range(1 if self.fixed_ports else 3):
            if not self.fixed_ports:
                self._choose_ports()
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
                "--bind-address", self.host,
                "--hostname", self.host,
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
        if self.cluster is not None:
            # A member serves once it is back in every group (its leader known): until then its
            # reads answer "no leader" (AXONIQ-2100), as while the cluster formed.
            self.cluster.wait_formed(60)

    # -- access ---------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        """The admin API's base URL."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def admin_token(self) -> str | None:
        """The configured admin token, sent on the harness's own HTTP calls."""
        return self.properties.get("axoniq.axonserver.accesscontrol.admin-token")

    def me(self) -> dict:
        return self.admin_get("/v1/public/me")

    def admin_get(self, path: str):
        """GET on the admin API with the admin token (if any); the decoded JSON."""
        request = urllib.request.Request(f"{self.http_base}{path}")
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


# -- a cluster -----------------------------------------------------------------------------------
CLUSTER_ENV = "MYELIN_COMPAT_CLUSTER"


def cluster_size() -> int:
    """How many nodes the tests' node is one of: `MYELIN_COMPAT_CLUSTER` (unset or 1: standalone)."""
    value = os.environ.get(CLUSTER_ENV, "").strip() or "1"
    if not value.isdigit() or not 1 <= int(value) <= 9:
        raise ValueError(f"{CLUSTER_ENV}={value!r}: expected a node count from 1 to 9")
    return int(value)


class MyelinCluster:
    """`size` real nodes, n1.. on 127.0.0.1.., each with its own temp dir and ports, that form a
    cluster by themselves: every node is given `autocluster.first` (n1's internal address) and
    `autocluster.contexts`; n1 starts with the contexts, the others join it and become members of
    every one. `start()` returns once every node sees every node and every context with the same
    leader, all nodes its voters (as each node's event store reports), and the follower serves
    every context to clients."""

    def __init__(self, size: int, properties: dict[str, str], contexts: Sequence[str]):
        if size < 2:
            raise ValueError("a cluster has at least two nodes")
        self.contexts = list(contexts)
        self.names = [f"n{i + 1}" for i in range(size)]
        self.nodes = [MyelinNode(host=f"127.0.0.{i + 1}", fixed_ports=True) for i in range(size)]
        shared = {k: v for k, v in properties.items() if k != "myelin.contexts"}
        if shared.get("axoniq.axonserver.accesscontrol.enabled") == "true":
            # node-to-node calls carry it; the same on every node
            shared.setdefault("axoniq.axonserver.accesscontrol.internal-token", f"compat-internal-{time.time_ns()}")
        first = self.nodes[0]
        shared["axoniq.axonserver.autocluster.first"] = f"{first.host}:{first.internal_port}"
        shared["axoniq.axonserver.autocluster.contexts"] = ",".join(self.contexts)
        for name, node in zip(self.names, self.nodes):
            node.properties = {**shared, "axoniq.axonserver.name": name}
        # n1 holds the contexts before anyone joins (its start waits for them); a joiner's own
        # contexts are given up when it joins, so it is started with the default only.
        first.properties["myelin.contexts"] = ",".join(self.contexts)
        self.follower_index: int | None = None

    def start(self, timeout: float = 120.0) -> "MyelinCluster":
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.start()
        self.wait_formed(deadline - time.monotonic())
        return self

    def stop(self) -> None:
        """Stops every node at once (each SIGTERM, then SIGKILL of its group) and removes their
        temp dirs."""
        threads = [threading.Thread(target=node.stop) for node in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def follower(self) -> MyelinNode:
        """The node chosen at `start()`: not the leader of `default`, and of the others the one
        that leads the fewest contexts."""
        assert self.follower_index is not None, "cluster not started"
        return self.nodes[self.follower_index]

    def leaders(self, i: int) -> dict[str, str | None]:
        """Each context's leader as node `i`'s admin API reports it."""
        return {c["context"]: c.get("leader") for c in self.nodes[i].admin_get("/v1/public/context")}

    def wait_formed(self, timeout: float) -> None:
        """Returns once the cluster is formed (see the class), or raises NodeStartError."""
        deadline = time.monotonic() + max(timeout, 1.0)
        problem = "not checked yet"
        while time.monotonic() < deadline:
            for name, node in zip(self.names, self.nodes):
                if node.proc is None or node.proc.poll() is not None:
                    raise NodeStartError(f"{name} exited while the cluster formed:\n{node.log_tail()}")
            try:
                problem, leaders = self._formation()
            except (urllib.error.URLError, ConnectionError, OSError, ValueError, grpc.RpcError) as exc:
                problem, leaders = f"{type(exc).__name__}: {exc}", None
            if problem is None and leaders is not None:
                self._choose_follower(leaders)
                problem = self._follower_serves()
                if problem is None:
                    return
            time.sleep(0.2)
        logs = "\n".join(f"--- {name} ({node.host}):\n{node.log_tail(30)}" for name, node in zip(self.names, self.nodes))
        raise NodeStartError(f"cluster not formed within {timeout:.0f}s: {problem}\n{logs}")

    def _formation(self) -> tuple[str | None, dict[str, str] | None]:
        """(what is still missing, or None; each context's agreed leader)."""
        everyone = sorted(self.names)
        agreed: dict[str, str] = {}
        for name, node in zip(self.names, self.nodes):
            nodes = sorted(n["name"] for n in node.admin_get("/v1/cluster"))
            if nodes != everyone:
                return f"{name} sees nodes {nodes}", None
            listed = {c["context"]: c for c in node.admin_get("/v1/public/context")}
            # `_admin` (the configuration) as well: its voters are not asked, only its leader
            for context in ["_admin"] + self.contexts:
                entry = listed.get(context)
                if entry is None:
                    return f"{name} does not list {context}", None
                members = sorted(r["node"] for r in entry.get("roles", []))
                if members != everyone:
                    return f"{name}: {context} has members {members}", None
                leader = entry.get("leader")
                if leader is None or agreed.setdefault(context, leader) != leader:
                    return f"{name}: {context} led by {leader}, others say {agreed.get(context)}", None
                if context == "_admin":
                    continue
                status = group_status(node, context)
                if status["leader"] != leader or status["voters"] != everyone:
                    return f"{name}'s event store: {context} {status}, admin says leader {leader}", None
        return None, agreed

    def _choose_follower(self, leaders: dict[str, str]) -> None:
        if self.follower_index is not None:
            return
        led = {name: sum(1 for leader in leaders.values() if leader == name) for name in self.names}
        candidates = [i for i, name in enumerate(self.names) if name != leaders["default"]]
        self.follower_index = min(candidates, key=lambda i: (led[self.names[i]], i))

    def _follower_serves(self) -> str | None:
        """None once the follower answers GetLastToken in every context through its client port."""
        node = self.follower()
        channel = node.channel()
        stub = event_pb2_grpc.EventStoreStub(channel)
        try:
            for context in self.contexts:
                md = ctx_md(context)
                if node.admin_token:
                    md.append((TOKEN_HEADER.lower(), node.admin_token))
                try:
                    stub.GetLastToken(event_pb2.GetLastTokenRequest(), metadata=md, timeout=5)
                except grpc.RpcError as exc:
                    return f"follower {node.host}: GetLastToken in {context}: {exc.code()} {exc.details()}"
        finally:
            channel.close()
        return None


def wait_handler(
    node: MyelinNode, kind: str, name: str, context: str | None = None, client_id: str | None = None, timeout: float = 15
) -> None:
    """Returns once `node` lists a `kind` ("command" or "query") handler of `name` in `context`
    (that of `client_id`, if given):
    on a cluster a handler connected to another node reaches the others' routing within a few
    seconds (its node sends its handler set on each change and every 2 s)."""
    path = "/v1/handlers" + (f"?context={context}" if context else "")
    deadline = time.monotonic() + timeout
    while True:
        listed = node.admin_get(path)
        if any(h["kind"] == kind and h["name"] == name and client_id in (None, h["clientId"]) for h in listed):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.host} does not list the {kind} handler of {name} after {timeout}s: {listed}")
        time.sleep(0.05)


def group_status(node: MyelinNode, context: str) -> dict:
    """`context`'s Raft group as `node`'s event store sees it, asked over the node's own Unix
    socket (StorageControl.GetGroupStatus, Myelin's internal API): the leader's and the voters'
    node names."""
    request_class, status_class = _group_status_messages()
    socket_path = node.data_dir / "run" / "eventstore.sock"
    # (the default authority of a `unix:` target, the path, is no valid HTTP/2 authority)
    with grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.default_authority", "localhost")]) as channel:
        call = channel.unary_unary(
            "/myelin.internal.StorageControl/GetGroupStatus",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=status_class.FromString,
        )
        status = call(request_class(context=context), timeout=5)
    by_id = {m.id: m.node for m in status.members}
    return {
        "leader": by_id.get(status.leader) if status.HasField("leader") else None,
        "voters": sorted(m.node for m in status.members if m.voter),
    }


_GROUP_STATUS_MESSAGES = None


def _group_status_messages():
    """The request and answer of GetGroupStatus, declared field for field as in
    proto/protos/internal/internal.proto (as proto2 optionals: the wire is the same, and
    `leader` keeps its presence)."""
    global _GROUP_STATUS_MESSAGES
    if _GROUP_STATUS_MESSAGES is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        file = descriptor_pb2.FileDescriptorProto(
            name="compat_group_status.proto", package="myelin.internal", syntax="proto2"
        )

        def message(name, fields):
            m = file.message_type.add(name=name)
            for field_name, number, kind, *element in fields:
                field = m.field.add(name=field_name, number=number, type=kind, label=F.LABEL_OPTIONAL)
                if element:  # a repeated message field
                    field.label, field.type_name = F.LABEL_REPEATED, element[0]

        message("GroupStatusRequest", [("context", 1, F.TYPE_STRING)])
        message("GroupMember", [("id", 1, F.TYPE_UINT64), ("node", 2, F.TYPE_STRING), ("voter", 3, F.TYPE_BOOL)])
        message(
            "GroupStatus",
            [
                ("context", 1, F.TYPE_STRING),
                ("member_id", 2, F.TYPE_UINT64),
                ("leader", 3, F.TYPE_UINT64),
                ("members", 7, F.TYPE_MESSAGE, ".myelin.internal.GroupMember"),
            ],
        )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        _GROUP_STATUS_MESSAGES = tuple(
            message_factory.GetMessageClass(pool.FindMessageTypeByName(f"myelin.internal.{name}"))
            for name in ("GroupStatusRequest", "GroupStatus")
        )
    return _GROUP_STATUS_MESSAGES


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
