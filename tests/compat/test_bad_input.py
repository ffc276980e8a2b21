"""Bad or broken input: oversized messages, broken/cancelled client streams, garbage bytes,
concurrent writers; and PlatformService.GetPlatformServer. The node here has a small
max-message-size (64 KB) so oversized messages are cheap."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from axonclient.protos import control_pb2, control_pb2_grpc

from conftest import start_node
from myelin_harness import END, EventStore, agg_events, error_code, event, queue_requests, rpc_error, unique

MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def node(request):
    return start_node(request, **{"axoniq.axonserver.max-message-size": "64KB"})


def assert_still_serving(store: EventStore):
    agg = unique("alive")
    before = store.last_token()
    assert store.append(agg_events(agg, 0, 2)).success
    assert store.last_token() == before + 2
    assert [e.aggregate_sequence_number for e in store.aggregate(agg)] == [0, 1]


def test_oversized_event_rejected_and_node_keeps_serving(store):
    agg = unique("big")
    before = store.last_token()
    small = event(agg, 0, data=b"s" * 100)
    huge = event(agg, 1, data=b"h" * (MAX_MESSAGE + 1024))
    exc = rpc_error(store.append, [small, huge])
    assert exc.code() != grpc.StatusCode.OK
    assert store.last_token() == before
    assert store.aggregate(agg) == []
    assert_still_serving(store)
    # the aggregate is untouched: seq 0 is still the next one
    assert store.append([event(agg, 0)]).success


def test_oversized_message_status_is_resource_exhausted(node, store):
    agg = unique("bigcode")
    exc = rpc_error(store.append, [event(agg, 0, data=b"h" * (MAX_MESSAGE + 1024))])
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details(), error_code(exc))
    store.append(agg_events(agg, 0, 1))
    snap = rpc_error(store.append_snapshot, event(agg, 0, data=b"h" * (MAX_MESSAGE + 1024)))
    assert snap.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (snap.code(), snap.details())
    # what an axonclient user sees: not a sequence conflict
    from axonclient.client import AxonEvent
    from axonclient.exceptions import OutOfRangeError

    client = node.client()
    try:
        with pytest.raises(grpc.RpcError):
            client.append_event(AxonEvent(unique("bigac"), 0, "Order", payload_data=b"h" * (MAX_MESSAGE + 1024)))
    except OutOfRangeError as wrong:
        raise AssertionError(f"oversized event reported as a sequence conflict: {wrong}") from None
    finally:
        client.close_connection()


def test_event_under_the_transaction_limit_accepted(store):
    agg = unique("fits")
    data = b"f" * (MAX_MESSAGE - 10_000 - 1024)  # max transaction = max-message-size - 10 000 bytes
    assert store.append([event(agg, 0, data=data)]).success
    assert [e.payload.data for e in store.aggregate(agg)] == [data]


def test_transaction_over_the_limit_rejected_as_payload_too_large(store):
    """Every message fits, the transaction as a whole does not (Axon: max-message-size - 10 000)."""
    agg = unique("bigtx")
    before = store.last_token()
    part = b"p" * (MAX_MESSAGE // 4)
    exc = rpc_error(store.append, [event(agg, i, data=part) for i in range(4)])
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    assert exc.details().startswith("[AXONIQ-2001] ")
    assert error_code(exc) == "AXONIQ-2001"
    assert store.last_token() == before
    assert store.aggregate(agg) == []
    assert_still_serving(store)


def test_oversized_snapshot_rejected(store):
    agg = unique("bigsnap")
    store.append(agg_events(agg, 0, 1))
    exc = rpc_error(store.append_snapshot, event(agg, 0, data=b"h" * (MAX_MESSAGE + 1024)))
    assert exc.code() != grpc.StatusCode.OK
    assert store.snapshots(agg) == []
    assert_still_serving(store)


def test_client_stream_breaking_mid_transaction_stores_nothing(store):
    agg = unique("broken")
    before = store.last_token()

    def events_then_failure():
        yield event(agg, 0)
        yield event(agg, 1)
        time.sleep(0.3)  # let the server receive them
        raise RuntimeError("client crashed mid-transaction")

    exc = rpc_error(store.stub.AppendEvent, events_then_failure(), metadata=store.md, timeout=10)
    assert exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED), exc
    time.sleep(0.5)  # a wrongly committing server would have done so by now
    assert store.last_token() == before
    assert store.aggregate(agg) == []
    assert store.highest_seq(agg) == -1
    # no sequence numbers stay reserved by the dead transaction
    assert store.append(agg_events(agg, 0, 1)).success
    assert store.highest_seq(agg) == 0


def test_cancelled_append_stores_nothing(store):
    agg = unique("cancelled")
    before = store.last_token()
    requests: queue.Queue = queue.Queue()

    future = store.stub.AppendEvent.future(queue_requests(requests), metadata=store.md, timeout=10)
    for e in agg_events(agg, 0, 3):
        requests.put(e)
    time.sleep(0.5)
    assert not future.done()  # not committed before half-close
    assert store.last_token() == before
    future.cancel()
    requests.put(END)
    time.sleep(0.5)
    assert store.last_token() == before
    assert store.aggregate(agg) == []
    assert store.append(agg_events(agg, 0, 2)).success
    assert store.highest_seq(agg) == 1


def test_garbage_bytes_rejected_and_node_keeps_serving(channel, store):
    before = store.last_token()
    raw_append = channel.stream_unary(
        "/io.axoniq.axonserver.grpc.event.EventStore/AppendEvent",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    exc = rpc_error(raw_append, iter([b"\xff\xff\xff\xff\x0f"]), metadata=store.md, timeout=5)
    assert exc.code() != grpc.StatusCode.OK
    assert store.last_token() == before
    raw_token = channel.unary_unary(
        "/io.axoniq.axonserver.grpc.event.EventStore/GetLastToken",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    assert rpc_error(raw_token, b"\x0a\xff", metadata=store.md, timeout=5).code() != grpc.StatusCode.OK
    assert_still_serving(store)


def test_concurrent_writers_to_one_aggregate(channel, store):
    """Two transactions racing for the same next sequence number: exactly one wins each round."""
    for round_ in range(10):
        agg = unique(f"race{round_}")
        barrier = threading.Barrier(2)
        results: list = []

        def writer(tag: str):
            barrier.wait()
            try:
                store.append([event(agg, 0, data=tag.encode()), event(agg, 1, data=tag.encode())])
                results.append(("ok", tag))
            except grpc.RpcError as exc:
                results.append((exc.code(), error_code(exc)))

        threads = [threading.Thread(target=writer, args=(t,)) for t in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        oks = [r for r in results if r[0] == "ok"]
        fails = [r for r in results if r[0] != "ok"]
        assert len(oks) == 1 and fails == [(grpc.StatusCode.OUT_OF_RANGE, "AXONIQ-2000")], results
        stored = store.aggregate(agg)
        assert [e.aggregate_sequence_number for e in stored] == [0, 1]
        assert {e.payload.data for e in stored} == {oks[0][1].encode()}


def test_get_platform_server(node, channel):
    stub = control_pb2_grpc.PlatformServiceStub(channel)
    info = stub.GetPlatformServer(
        control_pb2.ClientIdentification(client_id="compat-1", component_name="compat-tests", version="4.6.0"),
        timeout=5,
    )
    assert info.same_connection is True
    assert info.primary.host_name == node.host
    assert info.primary.grpc_port == node.grpc_port
    assert info.primary.http_port == node.http_port
    assert info.primary.node_name
    assert info.primary.node_name == node.me()["name"]
    # with a context header too
    info2 = stub.GetPlatformServer(
        control_pb2.ClientIdentification(client_id="compat-2", component_name="compat-tests"),
        metadata=[("axoniq-context", "other")],
        timeout=5,
    )
    assert info2.same_connection is True
    assert info2.primary.grpc_port == node.grpc_port
