"""AppendSnapshot validation, ListAggregateSnapshots, ListAggregateEvents with allow_snapshots."""

from __future__ import annotations

import grpc
from axonclient.client import AxonEvent
from axonclient.protos import common_pb2, event_pb2

from myelin_harness import agg_events, error_code, event, rpc_error, unique


def seqs(events) -> list[int]:
    return [e.aggregate_sequence_number for e in events]


def snapshot(agg: str, seq: int, **kw) -> event_pb2.Event:
    return event(agg, seq, payload_type="OrderSnapshot", data=f"snap{seq}".encode(), **kw)


def with_events_and_snapshots(store, n_events: int, snap_seqs: list[int]) -> str:
    agg = unique("snap")
    store.append(agg_events(agg, 0, n_events))
    for s in snap_seqs:
        assert store.append_snapshot(snapshot(agg, s)).success is True
    return agg


def test_snapshot_beyond_highest_event_rejected(store):
    agg = unique("snapbad")
    store.append(agg_events(agg, 0, 3))
    exc = rpc_error(store.append_snapshot, snapshot(agg, 3))
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE
    assert exc.details() == (
        f"[AXONIQ-2000] Invalid sequence number while storing snapshot. Highest aggregate {agg} "
        "sequence number: 2, snapshot sequence 3."
    )
    assert error_code(exc) == "AXONIQ-2000"
    assert store.snapshots(agg) == []


def test_snapshot_without_events_rejected(store):
    agg = unique("snapnone")
    exc = rpc_error(store.append_snapshot, snapshot(agg, 0))
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE
    assert exc.details() == (
        f"[AXONIQ-2000] Invalid sequence number while storing snapshot. Highest aggregate {agg} "
        "sequence number: -1, snapshot sequence 0."
    )
    assert error_code(exc) == "AXONIQ-2000"


def test_snapshot_at_or_below_highest_accepted_and_round_trips(store):
    agg = unique("snapok")
    store.append(agg_events(agg, 0, 3))
    sent = event_pb2.Event(
        message_identifier="snap-msg-1",
        aggregate_identifier=agg,
        aggregate_sequence_number=2,
        aggregate_type="Order",
        timestamp=1_600_000_000_001,
        payload=common_pb2.SerializedObject(type="OrderSnapshot", revision="9", data=b"\x00state\xff"),
        meta_data={"k": common_pb2.MetaDataValue(number_value=42), "t": common_pb2.MetaDataValue(text_value="v")},
    )
    minimal = event_pb2.Event(aggregate_identifier=agg, aggregate_sequence_number=1, aggregate_type="Order")
    assert store.append_snapshot(minimal).success
    assert store.append_snapshot(sent).success  # equal to the highest event seq: accepted
    back = store.snapshots(agg)
    expected = []
    for e in (sent, minimal):
        copy = event_pb2.Event()
        copy.CopyFrom(e)
        copy.snapshot = True
        expected.append(copy)
    assert back == expected  # newest first, every field as stored, snapshot=true


def test_snapshots_do_not_touch_the_event_stream(store):
    agg = unique("snapiso")
    store.append(agg_events(agg, 0, 2))
    last = store.last_token()
    store.append_snapshot(snapshot(agg, 1))
    assert store.last_token() == last
    assert store.highest_seq(agg) == 1
    assert seqs(store.aggregate(agg)) == [0, 1]
    # the next event of the aggregate is still seq 2
    store.append([event(agg, 2)])
    assert store.last_token() == last + 1
    assert all(not t.event.snapshot for t in store.read_all(last - 1))


def test_list_aggregate_snapshots_bounds(store):
    agg = with_events_and_snapshots(store, 6, [1, 3, 5])
    assert seqs(store.snapshots(agg)) == [5, 3, 1]  # max_sequence 0: unbounded
    assert seqs(store.snapshots(agg, max_seq=-1)) == [5, 3, 1]
    assert seqs(store.snapshots(agg, max_seq=5)) == [3, 1]  # upper bound exclusive
    assert seqs(store.snapshots(agg, max_seq=6)) == [5, 3, 1]
    assert seqs(store.snapshots(agg, initial=2)) == [5, 3]
    assert seqs(store.snapshots(agg, initial=3, max_seq=4)) == [3]
    assert seqs(store.snapshots(agg, max_results=1)) == [5]
    assert seqs(store.snapshots(agg, max_results=2, max_seq=5)) == [3, 1]
    assert seqs(store.snapshots(agg, max_results=-1)) == [5, 3, 1]
    assert all(s.snapshot for s in store.snapshots(agg))
    assert [s.payload.data for s in store.snapshots(agg)] == [b"snap5", b"snap3", b"snap1"]
    assert store.snapshots(unique("nosnap")) == []


def test_axonclient_snapshot_api(node):
    client = node.client()
    agg = unique("acsnap")
    client.append_event([AxonEvent(agg, i, "Order", payload_type="E") for i in range(4)])
    client.append_snapshot(AxonEvent(agg, 1, "Order", payload_type="S", payload_data=b"s1", snapshot=True))
    client.append_snapshot(AxonEvent(agg, 3, "Order", payload_type="S", payload_data=b"s3", snapshot=True))
    snaps = client.list_snapshot_events(agg)
    assert [(s.aggregate_sequence_number, s.payload_data, s.snapshot) for s in snaps] == [
        (3, b"s3", True),
        (1, b"s1", True),
    ]
    assert [s.aggregate_sequence_number for s in client.list_snapshot_events(agg, max_results=1)] == [3]
    with_snap = client.list_aggregate_events(agg, 0, True)
    assert [(e.aggregate_sequence_number, e.snapshot) for e in with_snap] == [(3, True)]
    without = client.list_aggregate_events(agg, 0, False)
    assert [(e.aggregate_sequence_number, e.snapshot) for e in without] == [(i, False) for i in range(4)]
    client.close_connection()


def test_list_aggregate_events_with_snapshots(store):
    agg = with_events_and_snapshots(store, 6, [1, 3])
    got = store.aggregate(agg, snapshots=True)
    assert [(e.aggregate_sequence_number, e.snapshot) for e in got] == [(3, True), (4, False), (5, False)]
    assert got[0].payload.data == b"snap3"
    assert [e.payload.data for e in got[1:]] == [f"{agg}:4".encode(), f"{agg}:5".encode()]
    # a newer snapshot, appended later, replaces it
    store.append_snapshot(snapshot(agg, 5))
    got = store.aggregate(agg, snapshots=True)
    assert [(e.aggregate_sequence_number, e.snapshot) for e in got] == [(5, True)]
    # without allow_snapshots: plain events only
    assert [(e.aggregate_sequence_number, e.snapshot) for e in store.aggregate(agg)] == [(i, False) for i in range(6)]
