"""QueryService seen through AxonIQ's own generated stubs (axonclient.protos.query_pb2): a handler
application and a dispatcher application, each on its own channel, round-trip queries through
the node. What the dispatcher sends must reach the handler byte for byte, and back."""

from __future__ import annotations

import queue
import threading

import grpc
from axonclient.protos import common_pb2, query_pb2, query_pb2_grpc

from myelin_harness import END as _END, ctx_md, unique, queue_requests

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


def dispatch(node, request, context: str | None = None) -> list[query_pb2.QueryResponse]:
    channel = node.channel()
    try:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        return list(stub.Query(request, metadata=ctx_md(context), timeout=WAIT))
    finally:
        channel.close()


def test_query_round_trips_payload_and_metadata_byte_identical(node):
    handler = QueryHandlerApp(node, "compat-handler")
    try:
        handler.subscribe("FindOrder")
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


def test_handlers_are_per_context(node):
    handler = QueryHandlerApp(node, "ctx-handler", context="ctx1")
    try:
        handler.subscribe("ContextBound")
        request = query_pb2.QueryRequest(message_identifier=unique("q"), query="ContextBound")
        responses = dispatch(node, request)  # default context: nobody there
        assert [r.error_code for r in responses] == ["AXONIQ-5000"]
    finally:
        handler.close()


def test_bad_subscribe_gets_negative_ack(node):
    handler = QueryHandlerApp(node, "sloppy")
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


def test_subscription_query_initial_result_and_update(node):
    handler = QueryHandlerApp(node, "prices")
    channel = node.channel()
    requests: queue.Queue = queue.Queue()

    try:
        handler.subscribe("WatchPrice")
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
