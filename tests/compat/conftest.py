"""Fixtures for the Myelin/Axon compatibility tests (see myelin_harness.py)."""

from __future__ import annotations

import pytest

from myelin_harness import EventStore, MyelinNode

# Contexts every module node is created with: `default` plus spare ones, so that a test that needs
# an empty event store (tokens from 0, GetLastToken -1, ...) gets a context nobody else writes to.
SPARE_CONTEXTS = [f"ctx{i}" for i in range(1, 15)]


def start_node(request, **properties) -> MyelinNode:
    props = {"myelin.contexts": ",".join(["default", "other"] + SPARE_CONTEXTS)}
    props.update(properties)
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
