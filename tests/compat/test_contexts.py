"""Contexts: the AxonIQ-Context header, unknown contexts, and full separation between contexts."""

from __future__ import annotations

import grpc
import pytest
from axonclient.protos import event_pb2

from myelin_harness import EventStore, agg_events, error_code, event, rpc_error, tokens, unique


def test_missing_header_means_default(channel, store):
    bare = EventStore(channel, None)  # sends no AxonIQ-Context header
    other = EventStore(channel, "other")
    agg = unique("nohdr")
    before_default, before_other = store.last_token(), other.last_token()
    bare.append(agg_events(agg, 0, 2))
    assert [e.aggregate_sequence_number for e in store.aggregate(agg)] == [0, 1]
    assert store.last_token() == before_default + 2
    assert bare.last_token() == store.last_token()
    assert other.aggregate(agg) == []
    assert other.last_token() == before_other
    assert bare.highest_seq(agg) == 1


def test_axonclient_without_header_uses_default(node, store):
    client = node.client()  # axonclient never sends a context header
    agg = unique("acdef")
    store.append(agg_events(agg, 0, 1))
    assert [e.aggregate_sequence_number for e in client.list_aggregate_events(agg, 0, False)] == [0]
    assert client.get_last_token() == store.last_token()
    client.close_connection()


UNKNOWN = "no-such-ctx"


def assert_context_not_found(exc: grpc.RpcError, context: str = UNKNOWN):
    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
    assert exc.details() == f"[AXONIQ-1302] {context}: context not found"
    assert error_code(exc) == "AXONIQ-1302"


@pytest.mark.parametrize(
    "call",
    [
        "GetLastToken",
        "GetFirstToken",
        "GetTokenAt",
        "ReadHighestSequenceNr",
        "AppendEvent",
        "AppendSnapshot",
        "ListAggregateEvents",
        "ListAggregateSnapshots",
        "ListEvents",
    ],
)
def test_unknown_context_is_not_found(channel, call):
    s = EventStore(channel, UNKNOWN)
    agg = unique("nf")
    calls = {
        "GetLastToken": lambda: s.stub.GetLastToken(event_pb2.GetLastTokenRequest(), metadata=s.md, timeout=5),
        "GetFirstToken": lambda: s.stub.GetFirstToken(event_pb2.GetFirstTokenRequest(), metadata=s.md, timeout=5),
        "GetTokenAt": lambda: s.stub.GetTokenAt(event_pb2.GetTokenAtRequest(instant=1), metadata=s.md, timeout=5),
        "ReadHighestSequenceNr": lambda: s.highest_seq(agg),
        "AppendEvent": lambda: s.append([event(agg, 0)], timeout=5),
        "AppendSnapshot": lambda: s.append_snapshot(event(agg, 0), timeout=5),
        "ListAggregateEvents": lambda: s.aggregate(agg),
        "ListAggregateSnapshots": lambda: s.snapshots(agg),
        "ListEvents": lambda: s.stub.ListEvents(
            iter([event_pb2.GetEventsRequest(tracking_token=0, number_of_permits=5)]), metadata=s.md, timeout=5
        ),
    }
    assert_context_not_found(rpc_error(calls[call]))


def test_contexts_are_separate(channel, fresh, spare_contexts):
    a = fresh
    b = EventStore(channel, spare_contexts.pop(0))
    agg = unique("shared-id")  # the same aggregate id in both contexts
    a.append([event(agg, 0, data=b"a0"), event(agg, 1, data=b"a1"), event(agg, 2, data=b"a2")])
    b.append([event(agg, 0, data=b"b0")])
    # independent sequences: b continues at 1, a at 3
    b.append([event(agg, 1, data=b"b1")])
    exc = rpc_error(b.append, [event(agg, 3)])
    assert exc.details() == f"[AXONIQ-2000] Invalid sequence number 3 for aggregate {agg}, expected 2"
    assert [e.payload.data for e in a.aggregate(agg)] == [b"a0", b"a1", b"a2"]
    assert [e.payload.data for e in b.aggregate(agg)] == [b"b0", b"b1"]
    assert (a.highest_seq(agg), b.highest_seq(agg)) == (2, 1)
    # independent token spaces, both dense from 0
    assert (a.last_token(), b.last_token()) == (2, 1)
    assert tokens(a.read_all(0)) == [0, 1, 2]
    assert [e.event.payload.data for e in b.read_all(0)] == [b"b0", b"b1"]
    # snapshots too
    a.append_snapshot(event(agg, 2, data=b"snap-a"))
    assert b.snapshots(agg) == []
    assert [s.payload.data for s in a.snapshots(agg)] == [b"snap-a"]
    assert [e.snapshot for e in b.aggregate(agg, snapshots=True)] == [False, False]
    # a live tracker on b sees nothing of a's new events
    with b.tracker(2, permits=10) as stream:
        a.append([event(agg, 3)])
        stream.assert_quiet(0.5)
        b.append([event(agg, 2, data=b"b2")])
        got = stream.take(1, timeout=5)
        assert [(t.token, t.event.payload.data) for t in got] == [(2, b"b2")]


def test_admin_me_reports_context_tokens(node, channel, fresh):
    fresh.append(agg_events(unique("me"), 0, 3))
    contexts = {c["name"]: c for c in node.me()["contexts"]}
    assert {"default", "other", fresh.context} <= set(contexts)
    assert contexts[fresh.context]["firstToken"] == 0
    assert contexts[fresh.context]["lastToken"] == 2
    assert contexts["default"]["lastToken"] == EventStore(channel, "default").last_token()
