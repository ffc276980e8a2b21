"""GetFirstToken, GetLastToken, GetTokenAt, dense tokens; across small segments and a restart."""

from __future__ import annotations

import pytest
from axonclient.client import AxonEvent

from myelin_harness import EventStore, agg_events, event, tokens, unique
from conftest import start_node


def test_empty_context_tokens(fresh):
    assert fresh.first_token() == 0
    assert fresh.last_token() == -1
    assert fresh.token_at(0) == -1
    assert fresh.token_at(1_700_000_000_000) == -1
    assert fresh.read_all(0) == []


def test_tokens_dense_from_zero(fresh):
    a, b = unique("ta"), unique("tb")
    fresh.append(agg_events(a, 0, 3))
    fresh.append([event(b, 0), event("", 0, aggregate_type="")])
    fresh.append(agg_events(a, 3, 2))
    assert fresh.first_token() == 0
    assert fresh.last_token() == 6
    got = fresh.read_all(0)
    assert tokens(got) == list(range(7))
    assert [(e.event.aggregate_identifier, e.event.aggregate_sequence_number) for e in got] == [
        (a, 0), (a, 1), (a, 2), (b, 0), ("", 0), (a, 3), (a, 4)
    ]


def test_get_token_at(fresh):
    agg = unique("tat")
    fresh.append([event(agg, 0, timestamp=1000), event(agg, 1, timestamp=2000), event(agg, 2, timestamp=3000)])
    fresh.append([event(agg, 3, timestamp=5000)])
    assert fresh.last_token() == 3
    assert fresh.token_at(0) == 0
    assert fresh.token_at(999) == 0
    assert fresh.token_at(1000) == 0
    assert fresh.token_at(1001) == 1
    assert fresh.token_at(2000) == 1
    assert fresh.token_at(2500) == 2
    assert fresh.token_at(3000) == 2
    assert fresh.token_at(4000) == 3
    assert fresh.token_at(5000) == 3
    assert fresh.token_at(5001) == 4  # all older: next token
    assert fresh.token_at(10**13) == 4


def test_axonclient_token_api(node):
    client = node.client()
    before = client.get_last_token()
    agg = unique("actok")
    client.append_event([AxonEvent(agg, 0, "Order"), AxonEvent(agg, 1, "Order")])
    assert client.get_last_token() == before + 2
    assert client.get_first_token() == 0
    client.close_connection()


# -- a node with tiny segments: many segment files, then a restart ----------------------------------
@pytest.fixture(scope="module")
def small_segments(request):
    return start_node(
        request,
        **{"axoniq.axonserver.event.segment-size": "16KB", "axoniq.axonserver.snapshot.segment-size": "16KB"},
    )


def test_many_segments_and_restart(small_segments):
    node = small_segments
    channel = node.channel()
    store = EventStore(channel, "ctx1")
    aggs = [unique(f"seg{i}") for i in range(4)]
    data = b"x" * 300
    ts = 10_000
    for round_ in range(25):  # 25 tx x 8 events x ~400 bytes ~ 80 KB: several 16 KB segments
        tx = []
        for agg in aggs:
            for k in range(2):
                tx.append(event(agg, round_ * 2 + k, data=data + str(ts).encode(), timestamp=ts))
                ts += 10
        store.append(tx)
    store.append_snapshot(event(aggs[0], 40, payload_type="Snap", data=b"snapshot-40"))
    total = 200

    def check():
        assert store.first_token() == 0
        assert store.last_token() == total - 1
        got = store.read_all(0)
        assert tokens(got) == list(range(total))
        assert [e.event.timestamp for e in got] == list(range(10_000, 10_000 + 10 * total, 10))
        for agg in aggs:
            assert [e.aggregate_sequence_number for e in store.aggregate(agg)] == list(range(50))
            assert [e.aggregate_sequence_number for e in store.aggregate(agg, initial=45)] == list(range(45, 50))
            assert store.highest_seq(agg) == 49
        assert [(e.aggregate_sequence_number, e.snapshot) for e in store.aggregate(aggs[0], snapshots=True)] == [
            (40, True)
        ] + [(s, False) for s in range(41, 50)]
        # timestamps 10000 + 10*token: GetTokenAt hits every segment
        for token in (0, 1, 37, 99, 100, 150, 199):
            assert store.token_at(10_000 + 10 * token) == token
            assert store.token_at(10_000 + 10 * token - 5) == token
        assert store.token_at(10_000 + 10 * total) == total
        with store.tracker(123, permits=5) as t:
            assert tokens(t.take(5)) == [123, 124, 125, 126, 127]

    check()
    segments = sorted((node.data_dir / "ctx1" / "events").glob("*.events"))
    assert len(segments) >= 4, segments  # ~80 KB of events in 16 KB segments
    channel.close()
    node.restart()
    channel = node.channel()
    store = EventStore(channel, "ctx1")
    check()
    store.append(agg_events(aggs[1], 50, 1))
    assert store.last_token() == total
    channel.close()
