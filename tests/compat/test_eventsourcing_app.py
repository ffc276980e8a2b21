"""End to end with the PyPI packages `eventsourcing` (9.x) and `eventsourcing-axonserver` (0.2),
which persists through axonclient's AxonClient (default context, no context header).

Note: eventsourcing aggregates start at version 1 by default, Axon aggregates at sequence 0 (a
first event at 1 is an AXONIQ-2000 conflict on Axon Server too), so the aggregate here sets
INITIAL_VERSION = 0, which is what eventsourcing-axonserver needs against any Axon Server.
"""

from __future__ import annotations

from uuid import UUID

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from conftest import start_node
from myelin_harness import EventStore


class Dog(Aggregate):
    INITIAL_VERSION = 0

    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name
        self.tricks: list[str] = []

    @event("TrickAdded")
    def add_trick(self, trick: str) -> None:
        self.tricks.append(trick)


class DogSchool(Application):
    def register_dog(self, name: str) -> UUID:
        dog = Dog(name)
        self.save(dog)
        return dog.id

    def add_trick(self, dog_id: UUID, trick: str) -> None:
        dog: Dog = self.repository.get(dog_id)
        dog.add_trick(trick)
        self.save(dog)

    def get_dog(self, dog_id: UUID, version: int | None = None) -> dict:
        dog: Dog = self.repository.get(dog_id, version=version)
        return {"name": dog.name, "tricks": list(dog.tricks), "version": dog.version}


@pytest.fixture(scope="module")
def node(request):
    # its own node: the notification log is the whole `default` context
    return start_node(request)


@pytest.fixture
def app_env(node, monkeypatch):
    monkeypatch.setenv("PERSISTENCE_MODULE", "eventsourcing_axonserver")
    monkeypatch.setenv("AXONSERVER_URI", node.uri)
    monkeypatch.delenv("IS_SNAPSHOTTING_ENABLED", raising=False)
    return monkeypatch


def test_save_reload_and_notification_log(app_env, node):
    app = DogSchool()
    fido = app.register_dog("Fido")
    app.add_trick(fido, "roll over")
    app.add_trick(fido, "play dead")
    rex = app.register_dog("Rex")
    app.add_trick(rex, "sit")

    # a second application instance (new connection) reloads from the server
    app2 = DogSchool()
    assert app2.get_dog(fido) == {"name": "Fido", "tricks": ["roll over", "play dead"], "version": 2}
    assert app2.get_dog(rex) == {"name": "Rex", "tricks": ["sit"], "version": 1}
    assert app2.get_dog(fido, version=1)["tricks"] == ["roll over"]  # historical version (lte)

    # notification log: every event of the context, in commit order, ids = Axon tokens
    notifications = app2.notification_log.select(start=0, limit=10)
    assert [n.id for n in notifications] == [0, 1, 2, 3, 4]
    assert [(n.originator_id, n.originator_version) for n in notifications] == [
        (fido, 0), (fido, 1), (fido, 2), (rex, 0), (rex, 1)
    ]
    assert notifications[0].topic.endswith("Dog.Registered")
    assert notifications[1].topic.endswith("Dog.TrickAdded")
    assert [n.id for n in app2.notification_log.select(start=2, limit=2)] == [2, 3]
    assert [n.id for n in app2.recorder.select_notifications(start=1, limit=10, stop=3)] == [1, 2, 3]

    # the same events, read straight from the server by the test
    channel = node.channel()
    try:
        store = EventStore(channel, "default")
        assert store.last_token() == 4
        stored = store.aggregate(str(fido))
        assert [(e.aggregate_sequence_number, e.aggregate_type) for e in stored] == [
            (0, "AggregateRoot"), (1, "AggregateRoot"), (2, "AggregateRoot")
        ]
        assert [e.payload.type for e in stored] == [n.topic for n in notifications[:3]]
        assert [e.payload.data for e in stored] == [n.state for n in notifications[:3]]
    finally:
        channel.close()


def test_concurrent_modification_is_an_integrity_error(app_env):
    app_a, app_b = DogSchool(), DogSchool()
    dog_id = app_a.register_dog("Bella")
    dog_a: Dog = app_a.repository.get(dog_id)
    dog_b: Dog = app_b.repository.get(dog_id)
    dog_a.add_trick("fetch")
    app_a.save(dog_a)
    dog_b.add_trick("beg")
    with pytest.raises(IntegrityError) as info:
        app_b.save(dog_b)
    assert "AXONIQ-2000" in str(info.value)
    assert DogSchool().get_dog(dog_id)["tricks"] == ["fetch"]


def test_snapshots(app_env):
    app_env.setenv("IS_SNAPSHOTTING_ENABLED", "y")
    app = DogSchool()
    dog_id = app.register_dog("Snappy")
    for trick in ("a", "b", "c"):
        app.add_trick(dog_id, trick)
    app.take_snapshot(dog_id)
    app.add_trick(dog_id, "d")
    snapshots = list(app.snapshots.get(dog_id)) if app.snapshots else []
    assert [s.originator_version for s in snapshots] == [3]
    assert app.get_dog(dog_id) == {"name": "Snappy", "tricks": ["a", "b", "c", "d"], "version": 4}
    assert DogSchool().get_dog(dog_id) == {"name": "Snappy", "tricks": ["a", "b", "c", "d"], "version": 4}
