"""AppendEvent transactions, aggregate sequence validation, ListAggregateEvents, ReadHighestSequenceNr.

Driven through axonclient's AxonClient where it covers the case, through its generated
EventStoreStub (with context header and error trailers) for the rest.
"""

from __future__ import annotations

import grpc
import pytest
from axonclient.client import AxonEvent
from axonclient.exceptions import OutOfRangeError
from axonclient.protos import common_pb2, event_pb2

from myelin_harness import agg_events, error_code, event, rpc_error, unique


def seqs(events) -> list[int]:
    return [e.aggregate_sequence_number for e in events]


# -- axonclient high-level API -------------------------------------------------------------------
def test_axonclient_append_and_list_aggregate_events(node):
    client = node.client()
    agg = unique("order")
    before = client.get_last_token()
    events = [
        AxonEvent(agg, i, "Order", message_identifier=f"m{i}-{agg}", payload_type="OrderPlaced",
                  payload_revision="2", payload_data=f"data{i}".encode(), timestamp=1_700_000_000_000 + i)
        for i in range(3)
    ]
    client.append_event(events)
    got = client.list_aggregate_events(agg, 0, False)
    assert [e.aggregate_sequence_number for e in got] == [0, 1, 2]
    for sent, back in zip(events, got):
        assert back.message_identifier == sent.message_identifier
        assert back.aggregate_identifier == agg
        assert back.aggregate_type == "Order"
        assert back.payload_type == "OrderPlaced"
        assert back.payload_revision == "2"
        assert back.payload_data == sent.payload_data
        assert back.timestamp == sent.timestamp
        assert back.snapshot is False
    assert client.get_last_token() == before + 3
    assert client.get_first_token() == 0
    # initial_sequence skips earlier events
    assert [e.aggregate_sequence_number for e in client.list_aggregate_events(agg, 2, False)] == [2]
    client.close_connection()


def test_axonclient_append_single_event_then_continue(node):
    client = node.client()
    agg = unique("single")
    client.append_event(AxonEvent(agg, 0, "Order", payload_type="A"))
    client.append_event(AxonEvent(agg, 1, "Order", payload_type="B"))
    assert [e.payload_type for e in client.list_aggregate_events(agg, 0, False)] == ["A", "B"]
    client.close_connection()


def test_axonclient_sequence_conflict_raises_out_of_range(node):
    client = node.client()
    agg = unique("conflict")
    client.append_event(AxonEvent(agg, 0, "Order"))
    before = client.get_last_token()
    with pytest.raises(OutOfRangeError) as info:
        client.append_event(AxonEvent(agg, 0, "Order"))
    assert f"[AXONIQ-2000] Invalid sequence number 0 for aggregate {agg}, expected 1" in str(info.value)
    assert client.get_last_token() == before
    assert len(client.list_aggregate_events(agg, 0, False)) == 1
    client.close_connection()


# -- byte-identical round trip ------------------------------------------------------------------------
def full_metadata() -> dict:
    return {
        "text": common_pb2.MetaDataValue(text_value="héllo wörld ✓"),
        "empty-text": common_pb2.MetaDataValue(text_value=""),
        "number": common_pb2.MetaDataValue(number_value=-9_223_372_036_854_775_807),
        "zero": common_pb2.MetaDataValue(number_value=0),
        "bool-true": common_pb2.MetaDataValue(boolean_value=True),
        "bool-false": common_pb2.MetaDataValue(boolean_value=False),
        "double": common_pb2.MetaDataValue(double_value=-3.141592653589793e-300),
        "bytes": common_pb2.MetaDataValue(
            bytes_value=common_pb2.SerializedObject(type="com.example.Meta", revision="7", data=b"\x00\xff\x01")
        ),
        "traceId": common_pb2.MetaDataValue(text_value="0af7651916cd43dd8448eb211c80319c"),
    }


def test_event_fields_and_metadata_round_trip_byte_identical(store):
    agg = unique("bytes")
    blob = bytes(range(256)) * 40  # 10 KiB of every byte value
    sent = [
        event_pb2.Event(
            message_identifier="3f0b7d0e-8d3c-4b5e-9d51-5a1f4c2f0e9a",
            aggregate_identifier=agg,
            aggregate_sequence_number=0,
            aggregate_type="com.example.Order",
            timestamp=1_234_567_890_123,
            payload=common_pb2.SerializedObject(type="com.example.OrderPlaced", revision="3.1", data=blob),
            meta_data=full_metadata(),
        ),
        # minimal: no message id, empty payload, no metadata, timestamp 0
        event_pb2.Event(aggregate_identifier=agg, aggregate_sequence_number=1, aggregate_type="com.example.Order"),
    ]
    start = store.last_token() + 1
    assert store.append(sent).success is True
    back = store.aggregate(agg)
    assert back == sent  # protobuf equality: every field, every map entry
    assert [b.SerializeToString(deterministic=True) for b in back] == [
        s.SerializeToString(deterministic=True) for s in sent
    ]
    tracked = store.read_all(start)
    assert [t.event for t in tracked] == sent
    assert [t.token for t in tracked] == [start, start + 1]


def test_events_without_aggregate_type_are_not_validated_nor_indexed(store):
    agg = unique("untyped")
    start = store.last_token() + 1
    # any sequence numbers, duplicates, on an id that later gets real events
    untyped = [event(agg, 7, aggregate_type=""), event(agg, 7, aggregate_type=""), event("", 0, aggregate_type="")]
    assert store.append(untyped).success
    assert store.aggregate(agg) == []
    assert store.highest_seq(agg) == -1
    # the typed stream of the same id starts at 0 regardless
    store.append(agg_events(agg, 0, 2))
    assert seqs(store.aggregate(agg)) == [0, 1]
    tracked = store.read_all(start)
    assert [t.event for t in tracked[:3]] == untyped
    assert len(tracked) == 5


def test_empty_append_call_succeeds_and_stores_nothing(store):
    before = store.last_token()
    assert store.append([]).success is True
    assert store.last_token() == before


# -- one transaction per call ------------------------------------------------------------------------
def test_transaction_with_interleaved_aggregates(store):
    a, b = unique("ia"), unique("ib")
    before = store.last_token()
    tx = [event(a, 0), event(b, 0), event(a, 1), event(b, 1), event(a, 2)]
    assert store.append(tx).success
    assert seqs(store.aggregate(a)) == [0, 1, 2]
    assert seqs(store.aggregate(b)) == [0, 1]
    after = store.last_token()
    assert after == before + 5
    tracked = store.read_all(before + 1)
    assert [(t.event.aggregate_identifier, t.event.aggregate_sequence_number) for t in tracked] == [
        (e.aggregate_identifier, e.aggregate_sequence_number) for e in tx
    ]


def assert_rejected(store, events, message: str, untouched: dict[str, int]):
    before = store.last_token()
    exc = rpc_error(store.append, events)
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE, exc
    assert exc.details() == message
    assert error_code(exc) == "AXONIQ-2000"
    assert store.last_token() == before
    for agg, count in untouched.items():
        assert seqs(store.aggregate(agg)) == list(range(count)), agg
        assert store.highest_seq(agg) == count - 1


def test_new_aggregate_must_start_at_zero(store):
    agg = unique("new")
    assert_rejected(store, [event(agg, 1)], f"[AXONIQ-2000] Invalid sequence number 1 for aggregate {agg}, expected 0", {agg: 0})


def test_gap_across_transactions_rejected(store):
    agg = unique("gap")
    store.append(agg_events(agg, 0, 2))
    assert_rejected(
        store, agg_events(agg, 5, 2), f"[AXONIQ-2000] Invalid sequence number 5 for aggregate {agg}, expected 2", {agg: 2}
    )


def test_duplicate_first_event_rejected(store):
    agg = unique("dup")
    store.append(agg_events(agg, 0, 1))
    assert_rejected(
        store, agg_events(agg, 0, 1), f"[AXONIQ-2000] Invalid sequence number 0 for aggregate {agg}, expected 1", {agg: 1}
    )


def test_gap_inside_transaction_rejects_whole_transaction(store):
    agg, other = unique("ingap"), unique("bystander")
    store.append(agg_events(agg, 0, 1))
    tx = [event(other, 0), event(agg, 1), event(agg, 2), event(agg, 4), event(other, 1)]
    assert_rejected(
        store, tx, f"[AXONIQ-2000] Invalid sequence number 4 for aggregate {agg}, expected 3", {agg: 1, other: 0}
    )


def test_repeat_inside_transaction_rejected(store):
    agg = unique("inrep")
    tx = [event(agg, 0), event(agg, 1), event(agg, 1)]
    assert_rejected(store, tx, f"[AXONIQ-2000] Invalid sequence number 1 for aggregate {agg}, expected 2", {agg: 0})


def test_one_bad_aggregate_rejects_the_others_in_the_transaction(store):
    good, bad = unique("good"), unique("bad")
    store.append(agg_events(bad, 0, 3))
    tx = agg_events(good, 0, 3) + [event(bad, 1)]
    assert_rejected(
        store, tx, f"[AXONIQ-2000] Invalid sequence number 1 for aggregate {bad}, expected 3", {good: 0, bad: 3}
    )
    # and the aggregate still accepts the right next event afterwards
    store.append([event(bad, 3)])
    assert seqs(store.aggregate(bad)) == [0, 1, 2, 3]


def test_empty_aggregate_id_with_type_is_invalid_argument(store):
    before = store.last_token()
    keep = unique("keep")
    exc = rpc_error(store.append, [event(keep, 0), event("", 0, aggregate_type="Order")])
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    assert store.last_token() == before
    assert store.aggregate(keep) == []


# -- ListAggregateEvents / ReadHighestSequenceNr ----------------------------------------------------
def test_list_aggregate_events_ranges(store):
    agg = unique("range")
    store.append(agg_events(agg, 0, 4))
    store.append(agg_events(agg, 4, 2))
    assert seqs(store.aggregate(agg)) == [0, 1, 2, 3, 4, 5]
    assert seqs(store.aggregate(agg, initial=3)) == [3, 4, 5]
    assert seqs(store.aggregate(agg, initial=2, max_seq=4)) == [2, 3, 4]  # max_sequence inclusive
    assert seqs(store.aggregate(agg, initial=0, max_seq=1)) == [0, 1]
    assert seqs(store.aggregate(agg, initial=5, max_seq=5)) == [5]
    assert seqs(store.aggregate(agg, initial=6)) == []
    assert seqs(store.aggregate(agg, initial=4, max_seq=100)) == [4, 5]
    assert [e.payload.data for e in store.aggregate(agg)] == [f"{agg}:{i}".encode() for i in range(6)]
    assert all(not e.snapshot for e in store.aggregate(agg, snapshots=True))  # no snapshot stored


def test_unknown_aggregate_is_empty_and_ok(store, node):
    assert store.aggregate(unique("nobody")) == []
    assert node.client().list_aggregate_events(unique("nobody"), 0, True) == []


def test_read_highest_sequence_nr(store):
    agg = unique("hsn")
    assert store.highest_seq(agg) == -1
    store.append(agg_events(agg, 0, 3))
    assert store.highest_seq(agg) == 2
    store.append(agg_events(agg, 3, 1))
    assert store.highest_seq(agg) == 3


def test_many_events_in_one_transaction(store):
    agg = unique("bulk")
    before = store.last_token()
    store.append(agg_events(agg, 0, 500))
    assert store.last_token() == before + 500
    got = store.aggregate(agg)
    assert seqs(got) == list(range(500))
    assert store.highest_seq(agg) == 499


# -- cases where an early build deviated from Axon Server --------------------------------------------
def test_negative_sequence_number_message(store):
    agg = unique("neg")
    assert_rejected(store, [event(agg, -1)], f"[AXONIQ-2000] Invalid sequence number -1 for aggregate {agg}, expected 0", {agg: 0})
    store.append(agg_events(agg, 0, 2))
    assert_rejected(store, [event(agg, -1)], f"[AXONIQ-2000] Invalid sequence number -1 for aggregate {agg}, expected 2", {agg: 2})


def test_untyped_events_accept_any_sequence_number(store):
    before = store.last_token()
    untyped = [
        event("", 5, aggregate_type=""),
        event(unique("untyped-neg"), -1, aggregate_type=""),
    ]
    rejected = []
    for e in untyped:
        try:
            store.append([e])
        except grpc.RpcError as exc:
            rejected.append(
                f"untyped event (id={e.aggregate_identifier!r}, seq={e.aggregate_sequence_number}) rejected: "
                f"{exc.code()} {exc.details()!r}"
            )
    assert not rejected, "\n".join(rejected)
    assert [t.event for t in store.read_all(before + 1)] == untyped
