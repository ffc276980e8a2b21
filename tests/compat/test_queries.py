"""QueryService seen through AxonIQ's own generated stubs (axonclient.protos.query_pb2): a handler
application and a dispatcher application, each on its own channel, round-trip queries through
the node. What the dispatcher sends must reach the handler byte for byte, and back.

axonclient's protos predate streaming queries: its ProcessingKey stops at NR_OF_RESULTS and its
QueryProviderInbound has no query_cancel (5) / query_flow_control (6). The streaming test sends
CLIENT_SUPPORTS_STREAMING by its number (8) and reads the newer inbound messages from the unknown
fields the stubs keep, with a small wire decoder, so what is checked is the bytes on the wire
against the numbers of AxonIQ's current query.proto / common.proto."""

from __future__ import annotations

import queue
import threading

import grpc
from axonclient.protos import common_pb2, query_pb2, query_pb2_grpc

from myelin_harness import END as _END, ctx_md, unique, queue_requests, wait_handler

WAIT = 10


class QueryHandlerApp:
    """A query handler: its own channel and OpenStream call, driven message by message."""

    def __init__(self, node, component: str, context: str | None = None):
        self.component = component
        self.channel = node.channel()
        self._requests: queue.Queue = queue.Queue()
        self.inbound: queue.Queue = queue.Queue()
        stub = query_pb2_grpc.QueryServiceStub(self.channel)
        self.call = stub.OpenStream(queue_requests(self._requests), metadata=ctx_md(context))
        threading.Thread(target=self._read, daemon=True).start()


    def _read(self):
        try:
            for message in self.call:
                self.inbound.put(message)
        except grpc.RpcError:
            pass
        finally:
            self.inbound.put(_END)

    def send(self, **kw) -> None:
        self._requests.put(query_pb2.QueryProviderOutbound(**kw))

    def next(self) -> query_pb2.QueryProviderInbound:
        message = self.inbound.get(timeout=WAIT)
        assert message is not _END, "handler stream ended"
        return message

    def subscribe(self, query: str, permits: int = 10) -> None:
        instruction = unique("sub")
        self.send(
            subscribe=query_pb2.QuerySubscription(
                message_id=instruction,
                query=query,
                result_name="java.lang.String",
                component_name=self.component,
                client_id=f"{self.component}-1",
            ),
            instruction_id=instruction,
        )
        ack = self.next()
        assert ack.WhichOneof("request") == "ack"
        assert ack.ack.instruction_id == instruction and ack.ack.success
        self.send(flow_control=common_pb2.FlowControl(client_id=f"{self.component}-1", permits=permits))

    def close(self) -> None:
        self._requests.put(_END)
        self.call.cancel()
        self.channel.close()


def meta(**values) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = common_pb2.MetaDataValue(boolean_value=value)
        elif isinstance(value, int):
            out[key] = common_pb2.MetaDataValue(number_value=value)
        elif isinstance(value, float):
            out[key] = common_pb2.MetaDataValue(double_value=value)
        elif isinstance(value, bytes):
            out[key] = common_pb2.MetaDataValue(
                bytes_value=common_pb2.SerializedObject(type="bytes", revision="", data=value)
            )
        else:
            out[key] = common_pb2.MetaDataValue(text_value=value)
    return out


# Numbers from AxonIQ's current protos that axonclient's older stubs lack.
SERVER_SUPPORTS_STREAMING = 7
CLIENT_SUPPORTS_STREAMING = 8
INBOUND_QUERY_CANCEL = 5
INBOUND_QUERY_FLOW_CONTROL = 6


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def wire_fields(data: bytes) -> dict[int, list]:
    """Field number -> values (int for varints, bytes for length-delimited) of one message."""
    fields: dict[int, list] = {}
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _varint(data, at)
        elif wire_type == 2:
            length, at = _varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            raise AssertionError(f"unexpected wire type {wire_type} for field {number}")
        fields.setdefault(number, []).append(value)
    return fields


def newer_inbound(message: query_pb2.QueryProviderInbound) -> tuple[str, str, int]:
    """(kind, request_id, permits) of a query_cancel / query_flow_control the stubs cannot name."""
    assert message.WhichOneof("request") is None, message
    fields = wire_fields(message.SerializeToString())
    if INBOUND_QUERY_CANCEL in fields:
        reference = wire_fields(fields[INBOUND_QUERY_CANCEL][0])
        return "query_cancel", reference[1][0].decode(), 0
    flow = wire_fields(fields[INBOUND_QUERY_FLOW_CONTROL][0])
    reference = wire_fields(flow[1][0])
    return "query_flow_control", reference[1][0].decode(), flow[2][0]


def dispatch(node, request, context: str | None = None) -> list[query_pb2.QueryResponse]:
    channel = node.channel()
    try:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        return list(stub.Query(request, metadata=ctx_md(context), timeout=WAIT))
    finally:
        channel.close()


def test_query_round_trips_payload_and_metadata_byte_identical(node, handler_node):
    handler = QueryHandlerApp(handler_node, "compat-handler")
    try:
        handler.subscribe("FindOrder")
        wait_handler(node, "query", "FindOrder")
        request = query_pb2.QueryRequest(
            message_identifier=unique("q"),
            query="FindOrder",
            timestamp=1_700_000_000_000,
            payload=common_pb2.SerializedObject(type="com.example.FindOrder", revision="2", data=b"\x00\xffid-42\x01"),
            meta_data=meta(traceId="t-1", count=-7, ratio=0.5, flag=True, blob=b"\x00\x01\x02"),
            processing_instructions=[
                common_pb2.ProcessingInstruction(
                    key=common_pb2.TIMEOUT, value=common_pb2.MetaDataValue(number_value=5000)
                )
            ],
            client_id="compat-dispatcher",
            component_name="compat-dispatch-app",
        )
        result: dict = {}
        dispatcher = threading.Thread(target=lambda: result.update(responses=dispatch(node, request)))
        dispatcher.start()

        received = handler.next()
        assert received.WhichOneof("request") == "query"
        query = received.query
        assert query.message_identifier == request.message_identifier
        assert query.payload.SerializeToString() == request.payload.SerializeToString()
        assert set(query.meta_data) == set(request.meta_data)
        for key in request.meta_data:
            assert query.meta_data[key].SerializeToString() == request.meta_data[key].SerializeToString()

        response = query_pb2.QueryResponse(
            message_identifier=unique("r"),
            payload=common_pb2.SerializedObject(type="com.example.Order", revision="", data=b"order\x00\xfe"),
            meta_data=meta(handledBy="compat-handler", attempt=1),
            request_identifier=query.message_identifier,
        )
        handler.send(query_response=response)
        handler.send(
            query_complete=query_pb2.QueryComplete(message_id=unique("c"), request_id=query.message_identifier)
        )
        dispatcher.join(WAIT)
        assert not dispatcher.is_alive(), "the query stream did not complete"
        responses = result["responses"]
        assert len(responses) == 1
        assert responses[0].SerializeToString(deterministic=True) == response.SerializeToString(deterministic=True)
    finally:
        handler.close()


def test_no_handler_is_in_band_axoniq_5000(node):
    request = query_pb2.QueryRequest(message_identifier=unique("q"), query="NobodyHandlesThis")
    responses = dispatch(node, request)
    assert len(responses) == 1
    assert responses[0].error_code == "AXONIQ-5000"
    assert responses[0].error_message.message == "No handler for query: NobodyHandlesThis"
    assert responses[0].request_identifier == request.message_identifier


def test_handlers_are_per_context(node, handler_node):
    handler = QueryHandlerApp(handler_node, "ctx-handler", context="ctx1")
    try:
        handler.subscribe("ContextBound")
        wait_handler(node, "query", "ContextBound", context="ctx1")
        request = query_pb2.QueryRequest(message_identifier=unique("q"), query="ContextBound")
        responses = dispatch(node, request)  # default context: nobody there
        assert [r.error_code for r in responses] == ["AXONIQ-5000"]
    finally:
        handler.close()


def test_bad_subscribe_gets_negative_ack(handler_node):
    handler = QueryHandlerApp(handler_node, "sloppy")
    try:
        handler.send(subscribe=query_pb2.QuerySubscription(message_id="x", query=""), instruction_id="bad-1")
        ack = handler.next()
        assert ack.WhichOneof("request") == "ack"
        assert ack.ack.instruction_id == "bad-1"
        assert not ack.ack.success
        assert ack.ack.error.error_code == "AXONIQ-1002"
        handler.subscribe("StillUp")  # the stream is still usable
    finally:
        handler.close()


def test_subscription_query_initial_result_and_update(node, handler_node):
    handler = QueryHandlerApp(handler_node, "prices")
    channel = node.channel()
    requests: queue.Queue = queue.Queue()

    try:
        handler.subscribe("WatchPrice")
        wait_handler(node, "query", "WatchPrice")
        sub_id = unique("s")
        subscription = query_pb2.SubscriptionQuery(
            subscription_identifier=sub_id,
            number_of_permits=10,
            query_request=query_pb2.QueryRequest(message_identifier=unique("q"), query="WatchPrice"),
        )
        call = query_pb2_grpc.QueryServiceStub(channel).Subscription(queue_requests(requests), timeout=WAIT)
        requests.put(query_pb2.SubscriptionQueryRequest(subscribe=subscription))
        requests.put(query_pb2.SubscriptionQueryRequest(flow_control=subscription))
        requests.put(query_pb2.SubscriptionQueryRequest(get_initial_result=subscription))
        kinds = set()
        while kinds != {"subscribe", "get_initial_result"}:
            message = handler.next()
            assert message.WhichOneof("request") == "subscription_query_request"
            kinds.add(message.subscription_query_request.WhichOneof("request"))
        initial = query_pb2.QueryResponse(
            message_identifier=unique("i"),
            payload=common_pb2.SerializedObject(type="Price", data=b"10"),
            request_identifier=subscription.query_request.message_identifier,
        )
        update = query_pb2.QueryUpdate(
            message_identifier=unique("u"), payload=common_pb2.SerializedObject(type="Price", data=b"11")
        )
        sent = [
            query_pb2.SubscriptionQueryResponse(
                message_identifier=unique("m"), subscription_identifier=sub_id, initial_result=initial
            ),
            query_pb2.SubscriptionQueryResponse(
                message_identifier=unique("m"), subscription_identifier=sub_id, update=update
            ),
        ]
        for response in sent:
            handler.send(subscription_query_response=response)
        got = [next(call), next(call)]
        assert [g.SerializeToString(deterministic=True) for g in got] == [
            s.SerializeToString(deterministic=True) for s in sent
        ]
        requests.put(query_pb2.SubscriptionQueryRequest(unsubscribe=subscription))
        message = handler.next()
        assert message.subscription_query_request.WhichOneof("request") == "unsubscribe"
        assert message.subscription_query_request.unsubscribe.subscription_identifier == sub_id
        requests.put(_END)
        call.cancel()
    finally:
        requests.put(_END)
        handler.close()
        channel.close()


def test_streaming_query_round_trip(node, handler_node):
    """A streaming query: the handler hears SERVER_SUPPORTS_STREAMING=true, gets per-query
    permits after the query, answers within them; the dispatcher gets every response byte for byte
    and in order; the other component's handler is cancelled once the first one answered."""
    streamer = QueryHandlerApp(handler_node, "compat-streamer")
    bystander = QueryHandlerApp(handler_node, "compat-bystander")
    try:
        streamer.subscribe("StreamOrders")
        bystander.subscribe("StreamOrders")
        for app in (streamer, bystander):
            wait_handler(node, "query", "StreamOrders", client_id=f"{app.component}-1")
        request = query_pb2.QueryRequest(
            message_identifier=unique("q"),
            query="StreamOrders",
            payload=common_pb2.SerializedObject(type="com.example.StreamOrders", data=b"all"),
            processing_instructions=[
                common_pb2.ProcessingInstruction(
                    key=common_pb2.TIMEOUT, value=common_pb2.MetaDataValue(number_value=60_000)
                ),
                common_pb2.ProcessingInstruction(
                    key=CLIENT_SUPPORTS_STREAMING, value=common_pb2.MetaDataValue(boolean_value=True)
                ),
            ],
            client_id="compat-dispatcher",
            component_name="compat-dispatch-app",
        )
        result: dict = {}
        dispatcher = threading.Thread(target=lambda: result.update(responses=dispatch(node, request)))
        dispatcher.start()

        received = {}
        permits = {}
        for app in (streamer, bystander):
            message = app.next()
            assert message.WhichOneof("request") == "query"
            query = message.query
            assert query.message_identifier == request.message_identifier
            assert query.payload.SerializeToString() == request.payload.SerializeToString()
            streaming = [
                p.value.boolean_value for p in query.processing_instructions if p.key == SERVER_SUPPORTS_STREAMING
            ]
            assert streaming == [True], query.processing_instructions
            received[app.component] = query
            # Permits for this query come after the query itself.
            kind, request_id, granted = newer_inbound(app.next())
            assert (kind, request_id) == ("query_flow_control", request.message_identifier)
            assert granted > 0
            permits[app.component] = granted

        count = min(permits["compat-streamer"], 8)
        sent = []
        for n in range(count):
            response = query_pb2.QueryResponse(
                message_identifier=unique("r"),
                payload=common_pb2.SerializedObject(type="com.example.Order", data=f"order-{n}".encode()),
                meta_data=meta(position=n),
                request_identifier=request.message_identifier,
            )
            streamer.send(query_response=response)
            sent.append(response)

        kind, request_id, _ = newer_inbound(bystander.next())
        assert (kind, request_id) == ("query_cancel", request.message_identifier)

        streamer.send(
            query_complete=query_pb2.QueryComplete(message_id=unique("c"), request_id=request.message_identifier)
        )
        dispatcher.join(WAIT)
        assert not dispatcher.is_alive(), "the query stream did not complete"
        responses = result["responses"]
        assert [r.SerializeToString(deterministic=True) for r in responses] == [
            s.SerializeToString(deterministic=True) for s in sent
        ]
    finally:
        streamer.close()
        bystander.close()


def test_plain_query_tells_the_handler_the_server_does_not_stream(node, handler_node):
    handler = QueryHandlerApp(handler_node, "compat-plain")
    try:
        handler.subscribe("PlainOrders")
        wait_handler(node, "query", "PlainOrders")
        request = query_pb2.QueryRequest(message_identifier=unique("q"), query="PlainOrders")
        dispatcher = threading.Thread(target=lambda: dispatch(node, request))
        dispatcher.start()
        message = handler.next()
        assert message.WhichOneof("request") == "query"
        streaming = [
            p.value.boolean_value
            for p in message.query.processing_instructions
            if p.key == SERVER_SUPPORTS_STREAMING
        ]
        assert streaming == [False]
        handler.send(
            query_complete=query_pb2.QueryComplete(message_id=unique("c"), request_id=request.message_identifier)
        )
        dispatcher.join(WAIT)
        assert not dispatcher.is_alive()
    finally:
        handler.close()
