"""Backup and restore with `myelin-backup-agent`, checked through axonclient.

A node with small segments stores events (and snapshots) in two contexts; the agent backs it up;
the node is stopped and its data directory wiped; the agent restores it; the restarted node must
serve every event under the same token, the same aggregate streams and snapshots, and go on
appending after them. The agent is `target/release/myelin-backup-agent` (next to `MYELIN_BIN`,
or `MYELIN_BACKUP_AGENT`); `cargo build --release --workspace` builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from axonclient.client import AxonClient, AxonEvent

from conftest import single_node_only
from myelin_harness import MyelinNode, myelin_bin, unique


def agent_bin() -> Path:
    return Path(os.environ.get("MYELIN_BACKUP_AGENT", str(myelin_bin().with_name("myelin-backup-agent"))))


def run_agent(*args: str) -> subprocess.CompletedProcess:
    binary = agent_bin()
    if not binary.is_file():
        pytest.fail(f"{binary} not found: build it with `cargo build --release --workspace`", pytrace=False)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300)


def events_of(aggregate: str, start: int, count: int) -> list[AxonEvent]:
    return [
        AxonEvent(
            aggregate,
            seq,
            "Order",
            message_identifier=f"{aggregate}-{seq}",
            payload_type="OrderEvent",
            payload_revision="1",
            payload_data=f"{aggregate}:{seq}:".encode() + b"x" * 150,
        )
        for seq in range(start, start + count)
    ]


def snapshot_of(aggregate: str, seq: int) -> AxonEvent:
    return AxonEvent(
        aggregate,
        seq,
        "Order",
        message_identifier=f"snap-{aggregate}-{seq}",
        payload_type="OrderState",
        payload_data=b"state",
        snapshot=True,
    )


def fill(client: AxonClient, prefix: str) -> list[str]:
    aggregates = [unique(f"{prefix}{i}") for i in range(4)]
    for round_ in range(12):
        for aggregate in aggregates:
            client.append_event(events_of(aggregate, round_ * 3, 3))
    client.append_snapshot(snapshot_of(aggregates[0], 20))
    return aggregates


def stored(client: AxonClient, aggregates: list[str]) -> dict:
    """Everything a client can read back: the event stream with tokens, aggregates, snapshots."""
    return {
        "events": [(token, event.__dict__) for token, event in client.list_events()],
        "aggregates": {a: [e.__dict__ for e in client.list_aggregate_events(a, 0, False)] for a in aggregates},
        "snapshots": {a: [e.__dict__ for e in client.list_snapshot_events(a)] for a in aggregates},
        "last_token": client.get_last_token(),
    }


@single_node_only("backs up, wipes and restores one node's data directory (cluster backups: not yet)")
def test_full_backup_wipe_restore_keeps_every_event_and_token(tmp_path):
    node = MyelinNode(
        {
            "axoniq.axonserver.event.segment-size": "4096",
            "axoniq.axonserver.snapshot.segment-size": "4096",
            "myelin.contexts": "default,orders",
        }
    )
    try:
        node.start()
        default, orders = node.client(), node.client("orders")
        default_aggs, orders_aggs = fill(default, "bd"), fill(orders, "bo")
        before = {"default": stored(default, default_aggs), "orders": stored(orders, orders_aggs)}
        assert before["default"]["last_token"] == 4 * 12 * 3 - 1
        default.close_connection()
        orders.close_connection()

        backup_set = tmp_path / "set"
        server = node.http_base
        done = run_agent("backup", "--json", "--server", server, "--dest", str(backup_set))
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert sorted(summary["contexts"]) == ["default", "orders"]
        assert summary["contexts"]["default"]["segments"]["EVENT"]["closedSegmentsCopied"] > 3
        checked = run_agent("verify", str(backup_set))
        assert checked.returncode == 0, checked.stderr

        node.stop(remove=False)
        shutil.rmtree(node.data_dir)
        restored = run_agent("restore", str(backup_set), "--data", str(node.data_dir))
        assert restored.returncode == 0, restored.stderr
        node.start()

        default, orders = node.client(), node.client("orders")
        after = {"default": stored(default, default_aggs), "orders": stored(orders, orders_aggs)}
        assert after == before

        # The restored node continues each stream where the backup left it.
        aggregate = default_aggs[1]
        default.append_event(events_of(aggregate, 36, 1))
        assert default.get_last_token() == before["default"]["last_token"] + 1
        assert [e.aggregate_sequence_number for e in default.list_aggregate_events(aggregate, 0, False)] == list(
            range(37)
        )
        default.close_connection()
        orders.close_connection()
    finally:
        node.stop()
