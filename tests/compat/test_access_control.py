"""Access control seen by a third-party client: axonclient's own AxonClient, with the token added
as `AxonIQ-Access-Token` metadata, against a node with `accesscontrol.enabled=true`.

Applications and their roles are registered through the admin REST API with the admin token;
what each token may do is then checked through axonclient calls.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from axonclient.client import AxonEvent

from conftest import start_node
from myelin_harness import TOKEN_HEADER, unique

ADMIN_TOKEN = "compat-admin-token-0123456789"


@pytest.fixture(scope="module")
def secured(request):
    return start_node(
        request,
        **{
            "axoniq.axonserver.accesscontrol.enabled": "true",
            "axoniq.axonserver.accesscontrol.admin-token": ADMIN_TOKEN,
        },
    )


def http(node, method: str, path: str, body: dict | None = None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{node.http_base}{path}", data=data, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    if token is not None:
        req.add_header(TOKEN_HEADER, token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("AxonIQ-ErrorCode"), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("AxonIQ-ErrorCode"), json.loads(e.read() or b"null")


def register(node, name: str, roles: list[str], context: str = "default") -> str:
    status, _, body = http(
        node, "POST", "/v1/applications", {"name": name, "roles": [{"context": context, "roles": roles}]}, ADMIN_TOKEN
    )
    assert status == 200, body
    return body["token"]


def new_event(aggregate: str, seq: int) -> AxonEvent:
    return AxonEvent(
        message_identifier=unique("msg"),
        aggregate_identifier=aggregate,
        aggregate_sequence_number=seq,
        aggregate_type="Order",
        timestamp=AxonEvent.create_timestamp(),
        payload_type="OrderPlaced",
        payload_revision="1",
        payload_data=b'{"total": 10}',
        meta_data={},
        snapshot=False,
    )


def eventually(check, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_calls_without_a_valid_token_are_refused_with_axon_codes(secured):
    for token, code in [(None, "AXONIQ-1000"), ("wrong-token", "AXONIQ-1001")]:
        client = secured.client(token=token)
        with pytest.raises(grpc.RpcError) as refused:
            client.append_event(new_event(unique("agg"), 0))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(refused.value.trailing_metadata() or ())
        assert trailers.get("axoniq-errorcode") == code, trailers
        with pytest.raises(grpc.RpcError):
            client.list_aggregate_events(unique("agg"), 0, False)


def test_roles_decide_what_a_token_may_do(secured):
    writer_token = register(secured, "writer-app", ["PUBLISH_EVENTS", "READ_EVENTS"])
    writer = secured.client(token=writer_token)
    reader = secured.client(token=register(secured, "reader-app", ["READ_EVENTS"]))
    aggregate = unique("order")
    eventually(lambda: writer.append_event([new_event(aggregate, 0), new_event(aggregate, 1)]))

    events = eventually(lambda: reader.list_aggregate_events(aggregate, 0, False))
    assert [e.aggregate_sequence_number for e in events] == [0, 1]

    with pytest.raises(grpc.RpcError) as refused:
        reader.append_event(new_event(aggregate, 2))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was stored by the refused append.
    assert [e.aggregate_sequence_number for e in writer.list_aggregate_events(aggregate, 0, False)] == [0, 1]

    # The writer's roles hold in `default` only.
    elsewhere = secured.client(context="other", token=writer_token)
    with pytest.raises(grpc.RpcError) as refused:
        elsewhere.list_aggregate_events(aggregate, 0, False)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_http_needs_the_admin_token_for_administration(secured):
    status, code, body = http(secured, "GET", "/v1/public/context")
    assert (status, code, body["code"]) == (401, "AXONIQ-1000", "AXONIQ-1000")
    status, code, _ = http(secured, "GET", "/v1/public/context", token="wrong")
    assert (status, code) == (401, "AXONIQ-1001")
    status, _, contexts = http(secured, "GET", "/v1/public/context", token=ADMIN_TOKEN)
    assert status == 200 and any(c["context"] == "default" for c in contexts)
    app_token = register(secured, "client-only", ["USE_CONTEXT"])
    status, code, _ = http(secured, "POST", "/v1/context", {"context": "notallowed"}, token=app_token)
    assert (status, code) == (403, "AXONIQ-1001")
    status, _, _ = http(secured, "GET", "/actuator/health")
    assert status == 200
