"""Clients through grpcio that send many small messages (issue 15, D10).

h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames") whose received but
not yet consumed small DATA frames outweigh half its connection window. With hyper's 1 MiB window
that was reached whenever the router read a stream of ~150-byte events a little slower than a
grpcio client sent them (under load, or when a refused transaction kept coming): every call on
the connection failed with UNAVAILABLE, not just the one. The router's client port now has a
4 MiB connection window (256 KiB per stream), and drains a refused transaction until the client
half-closes before answering it."""

from __future__ import annotations

import threading
import time

import grpc
from axonclient.protos import event_pb2, event_pb2_grpc

from myelin_harness import ctx_md, error_code, event, unique


def test_over_limit_transactions_fail_alone_and_the_connection_stays(node):
    channel = node.channel()
    stub = event_pb2_grpc.EventStoreStub(channel)
    md = ctx_md("default")
    results: list[tuple[str, str | None]] = []
    bystander_errors: list[grpc.RpcError] = []

    def over_limit(k: int):
        agg = unique(f"over{k}")
        # 40,000 events of ~150 bytes: about 6 MB, over the 4 MB transaction limit.
        events = (event(agg, i, data=b"d" * 100) for i in range(40_000))
        try:
            stub.AppendEvent(events, metadata=md, timeout=60)
            results.append(("stored", None))
        except grpc.RpcError as exc:
            results.append((exc.code().name, error_code(exc)))

    def bystander():
        for _ in range(60):
            try:
                stub.GetLastToken(event_pb2.GetLastTokenRequest(), metadata=md, timeout=10)
            except grpc.RpcError as exc:
                bystander_errors.append(exc)
            time.sleep(0.02)

    threads = [threading.Thread(target=over_limit, args=(k,)) for k in range(8)]
    threads.append(threading.Thread(target=bystander))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [("INVALID_ARGUMENT", "AXONIQ-2001")] * 8, results
    assert bystander_errors == [], bystander_errors[:3]
    # The same channel still works.
    agg = unique("after")
    stub.AppendEvent(iter([event(agg, 0)]), metadata=md, timeout=10)
    channel.close()

