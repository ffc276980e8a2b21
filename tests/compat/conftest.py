"""Fixtures for the Myelin/Axon compatibility tests (see myelin_harness.py).

With `MYELIN_COMPAT_CLUSTER=3` every module's node is the follower of a three-node cluster
(`MyelinCluster`): the same tests, the client connected to a node that does not lead `default`,
and the messaging tests' handler applications connected to another node (`handler_node`).
"""

from __future__ import annotations

import pytest

from myelin_harness import EventStore, MyelinCluster, MyelinNode, cluster_size

# Contexts every module node is created with: `default` plus spare ones, so that a test that needs
# an empty event store (tokens from 0, GetLastToken -1, ...) gets a context nobody else writes to.
SPARE_CONTEXTS = [f"ctx{i}" for i in range(1, 15)]
CONTEXTS = ["default", "other"] + SPARE_CONTEXTS

CLUSTER_SIZE = cluster_size()


def single_node_only(why: str):
    """Marks a test that means one node by itself; skipped when the suite runs on a cluster."""
    return pytest.mark.skipif(CLUSTER_SIZE > 1, reason=f"single node only: {why}")


def start_node(request, **properties) -> MyelinNode:
    """The module's node: a standalone node, or (MYELIN_COMPAT_CLUSTER) a follower of a cluster
    whose every node has these properties. Stopped, with its temp dirs removed, at module end."""
    props = {"myelin.contexts": ",".join(CONTEXTS)}
    props.update(properties)
    if CLUSTER_SIZE > 1:
        cluster = MyelinCluster(CLUSTER_SIZE, props, CONTEXTS)
        request.addfinalizer(cluster.stop)  # registered first: stops every node even if start fails
        try:
            cluster.start()
        except Exception as exc:
            pytest.fail(f"could not start a Myelin cluster: {exc}", pytrace=False)
        node = cluster.follower()
        node.cluster = cluster
        return node
    node = MyelinNode(props)
    request.addfinalizer(node.stop)  # registered first: stops the node even if start fails
    try:
        node.start()
    except Exception as exc:
        pytest.fail(f"could not start Myelin: {exc}", pytrace=False)
    return node


@pytest.fixture(scope="module")
def node(request) -> MyelinNode:
    """One node per test module; tests use unique aggregate ids or their own spare context."""
    return start_node(request)


@pytest.fixture(scope="module")
def handler_node(node) -> MyelinNode:
    """Where handler applications connect: on a cluster another node than `node` (where the
    dispatchers connect), so that every command and query crosses the link between nodes; on
    one node, that node."""
    cluster = getattr(node, "cluster", None)
    if cluster is None:
        return node
    return next(other for other in cluster.nodes if other is not node)


@pytest.fixture(scope="module")
def channel(node):
    ch = node.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def store(channel) -> EventStore:
    """The `default` context, named by header."""
    return EventStore(channel, "default")


@pytest.fixture(scope="module")
def spare_contexts():
    return list(SPARE_CONTEXTS)


@pytest.fixture
def fresh(request, channel, spare_contexts) -> EventStore:
    """An EventStore on a context no other test of the module has touched."""
    if not spare_contexts:
        pytest.fail("module ran out of spare contexts; add more to SPARE_CONTEXTS")
    return EventStore(channel, spare_contexts.pop(0))
