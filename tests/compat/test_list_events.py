"""ListEvents: tracking stream with permit flow control, blacklist, live tailing, half-close, errors."""

from __future__ import annotations

import time

import grpc
from axonclient.client import AxonEvent
from axonclient.protos import event_pb2

from myelin_harness import agg_events, error_code, event, tokens, unique


def test_permits_bound_the_stream_exactly(fresh):
    agg = unique("permits")
    fresh.append(agg_events(agg, 0, 10))
    with fresh.tracker(0, permits=3) as stream:
        assert tokens(stream.take(3)) == [0, 1, 2]
        stream.assert_quiet(1.0)  # no 4th event without a permit
        stream.permits(2)
        got = stream.take(2)
        assert tokens(got) == [3, 4]
        assert [e.event.aggregate_sequence_number for e in got] == [3, 4]
        stream.assert_quiet(1.0)
        stream.permits(100)
        assert tokens(stream.take(5)) == [5, 6, 7, 8, 9]
        stream.assert_quiet(0.5)
        assert stream.error is None


def test_live_tail_and_permits_for_new_events(fresh):
    agg = unique("live")
    fresh.append(agg_events(agg, 0, 2))
    with fresh.tracker(0, permits=4) as stream:
        assert tokens(stream.take(2)) == [0, 1]
        stream.assert_quiet(0.5)
        fresh.append(agg_events(agg, 2, 3))  # 3 new events, 2 permits left
        got = stream.take(2, timeout=5)
        assert tokens(got) == [2, 3]
        assert [e.event.aggregate_sequence_number for e in got] == [2, 3]
        stream.assert_quiet(1.0)
        stream.permits(10)
        assert tokens(stream.take(1, timeout=5)) == [4]
        fresh.append([event(unique("other"), 0)])
        assert tokens(stream.take(1, timeout=5)) == [5]


def test_start_token_is_inclusive_and_may_be_beyond_head(fresh):
    agg = unique("head")
    fresh.append(agg_events(agg, 0, 3))
    with fresh.tracker(2, permits=10) as stream:
        assert tokens(stream.take(1)) == [2]
        stream.assert_quiet(0.5)
    with fresh.tracker(5, permits=10) as stream:  # head is 3: waits for tokens 5+
        stream.assert_quiet(0.5)
        fresh.append(agg_events(agg, 3, 4))  # tokens 3..6
        assert tokens(stream.take(2, timeout=5)) == [5, 6]
        stream.assert_quiet(0.5)


def test_blacklist_in_first_request_skips_without_consuming_permits(fresh):
    agg = unique("bl")
    types = ["A", "B", "A", "B", "A", "B", "A"]
    fresh.append([event(agg, i, payload_type=t, revision="1") for i, t in enumerate(types)])
    with fresh.tracker(0, permits=3, blacklist=[("B", "1")]) as stream:
        got = stream.take(3)
        assert tokens(got) == [0, 2, 4]
        assert {e.event.payload.type for e in got} == {"A"}
        stream.assert_quiet(1.0)
        stream.permits(1)
        assert tokens(stream.take(1)) == [6]


def test_blacklist_added_later_and_matched_on_revision(fresh):
    agg = unique("bl2")
    evs = [
        event(agg, 0, payload_type="A", revision="1"),
        event(agg, 1, payload_type="B", revision="1"),
        event(agg, 2, payload_type="A", revision="1"),
        event(agg, 3, payload_type="B", revision="2"),  # other revision: not blacklisted
        event(agg, 4, payload_type="B", revision="1"),
        event(agg, 5, payload_type="A", revision="1"),
    ]
    fresh.append(evs)
    with fresh.tracker(0, permits=1) as stream:
        assert tokens(stream.take(1)) == [0]
        stream.assert_quiet(0.5)
        stream.permits(3, blacklist=[("B", "1")])
        got = stream.take(3)
        assert tokens(got) == [2, 3, 5]
        assert [(e.event.payload.type, e.event.payload.revision) for e in got] == [("A", "1"), ("B", "2"), ("A", "1")]
        stream.assert_quiet(0.5)


def test_half_close_completes_the_stream_ok(fresh):
    agg = unique("hc")
    fresh.append(agg_events(agg, 0, 2))
    stream = fresh.tracker(0, permits=10)
    try:
        assert tokens(stream.take(2)) == [0, 1]
        stream.half_close()
        stream.wait_end(5)
        assert stream.error is None, stream.error
        assert stream.call.code() == grpc.StatusCode.OK
    finally:
        stream.close()


def test_token_before_start_of_event_store(store):
    stream = store.tracker(-5, permits=10)
    try:
        stream.wait_end(5)
        exc = stream.error
        assert exc is not None, "expected an error for token -5"
        assert exc.code() == grpc.StatusCode.CANCELLED
        assert exc.details() == "[AXONIQ-0001] default: token -5 before start of event store"
        assert error_code(exc) == "AXONIQ-0001"
    finally:
        stream.close()


def test_cancelled_tracker_does_not_disturb_the_node(fresh):
    agg = unique("cancel")
    fresh.append(agg_events(agg, 0, 3))
    stream = fresh.tracker(0, permits=1)
    assert tokens(stream.take(1)) == [0]
    stream.call.cancel()
    stream.wait_end(5)
    assert stream.call.code() == grpc.StatusCode.CANCELLED
    stream.close()
    fresh.append(agg_events(agg, 3, 1))
    assert tokens(fresh.read_all(0)) == [0, 1, 2, 3]


def test_axonclient_list_events_and_iter_events(node, fresh):
    """axonclient half-closes its request stream ~1 s after opening it and expects the stream to end."""
    client = node.client(context=fresh.context)  # AxonClient bound to a context only this test uses
    agg = unique("acl")
    client.append_event([AxonEvent(agg, i, "Order", payload_type="E", payload_data=bytes([i])) for i in range(4)])
    client.append_event(AxonEvent(agg, 4, "Order", payload_type="F", payload_revision="1"))
    started = time.monotonic()
    listed = client.list_events()
    assert time.monotonic() - started < 10
    assert [t for t, _ in listed] == [0, 1, 2, 3, 4]
    assert [(e.aggregate_identifier, e.aggregate_sequence_number, e.payload_data) for _, e in listed[:4]] == [
        (agg, i, bytes([i])) for i in range(4)
    ]
    assert [t for t, _ in client.iter_events(tracking_token=2)] == [2, 3, 4]
    assert [t for t, _ in client.list_events(number_of_permits=2)] == [0, 1]
    blacklisted = client.list_events(blacklist=[event_pb2.PayloadDescription(type="E", revision="")])
    assert [(t, e.payload_type) for t, e in blacklisted] == [(4, "F")]
    client.close_connection()


def test_zero_initial_permits_sends_nothing(fresh):
    fresh.append(agg_events(unique("zero"), 0, 2))
    with fresh.tracker(0, permits=0) as stream:
        stream.assert_quiet(1.0)
        stream.permits(1)
        assert tokens(stream.take(1)) == [0]
        stream.assert_quiet(0.5)


def test_huge_permit_grants_do_not_overflow(fresh):
    int32_max = 2**31 - 1
    with fresh.tracker(0, permits=int32_max) as stream:
        stream.permits(int32_max)
        stream.permits(int32_max)
        time.sleep(0.3)
        fresh.append(agg_events(unique("ovf"), 0, 3))
        assert tokens(stream.take(3, timeout=5)) == [0, 1, 2]
        assert stream.error is None


def test_blacklisted_run_sends_one_event_after_1000_skips(fresh):
    """Axon sends one blacklisted event after 1000 consecutive skips so the client's token advances."""
    fresh.append([event("", 0, aggregate_type="", payload_type="Noise", revision="1") for _ in range(1005)])
    with fresh.tracker(0, permits=10, blacklist=[("Noise", "1")]) as stream:
        got = stream.take(1, timeout=5)
        assert tokens(got) == [1000]
        assert got[0].event.payload.type == "Noise"
        stream.assert_quiet(0.5)
