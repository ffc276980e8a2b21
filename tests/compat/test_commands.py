"""CommandService through AxonIQ's own generated stubs (axonclient.protos.command_pb2): a handler
application and a dispatcher, each on its own channel, round-trip commands; routing errors come
back in-band as Axon Server sends them."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from axonclient.protos import command_pb2, command_pb2_grpc, common_pb2

from myelin_harness import END as _END, ctx_md, unique, queue_requests, wait_handler



class CommandHandler:
    """A handler app: OpenStream, subscribe, grant permits, answer every command it receives by
    echoing its payload and metadata (plus a marker), and remember what it received."""

    def __init__(self, node, names, client_id="py-handler", permits=100, context=None):
        self.client_id = client_id
        self.channel = node.channel()
        self.stub = command_pb2_grpc.CommandServiceStub(self.channel)
        self.requests: queue.Queue = queue.Queue()
        self.received: list = []
        self.sent_responses: dict = {}
        self.acks: queue.Queue = queue.Queue()
        for name in names:
            self.send(
                command_pb2.CommandProviderOutbound(
                    subscribe=command_pb2.CommandSubscription(
                        message_id=unique("sub"), command=name, component_name="py-app", client_id=client_id,
                        load_factor=100,
                    ),
                    instruction_id=f"subscribe-{name}",
                )
            )
        self.send(
            command_pb2.CommandProviderOutbound(
                flow_control=common_pb2.FlowControl(client_id=client_id, permits=permits),
                instruction_id="permits",
            )
        )
        self.call = self.stub.OpenStream(queue_requests(self.requests), metadata=ctx_md(context))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, message):
        self.requests.put(message)


    def _read(self):
        try:
            for inbound in self.call:
                kind = inbound.WhichOneof("request")
                if kind == "ack":
                    self.acks.put(inbound.ack)
                elif kind == "command":
                    command = inbound.command
                    self.received.append(command)
                    meta = dict(command.meta_data)
                    meta["handled-by"] = common_pb2.MetaDataValue(text_value=self.client_id)
                    response = command_pb2.CommandResponse(
                        message_identifier=unique("resp"),
                        request_identifier=command.message_identifier,
                        payload=common_pb2.SerializedObject(
                            type=command.payload.type + "Result",
                            revision=command.payload.revision,
                            data=command.payload.data[::-1],
                        ),
                        meta_data=meta,
                    )
                    self.sent_responses[command.message_identifier] = response
                    self.send(command_pb2.CommandProviderOutbound(command_response=response))
        except grpc.RpcError:
            pass

    def wait_acks(self, n, timeout=10):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got.append(self.acks.get(timeout=max(deadline - time.monotonic(), 0.001)))
        return got

    def close(self):
        self.requests.put(_END)
        self.call.cancel()
        self.reader.join(timeout=5)
        self.channel.close()


@pytest.fixture
def dispatcher(node):
    channel = node.channel()
    yield command_pb2_grpc.CommandServiceStub(channel)
    channel.close()


def wire(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def test_round_trip_is_byte_identical(node, handler_node, dispatcher):
    name = unique("PlaceOrder")
    handler = CommandHandler(handler_node, [name])
    try:
        acks = handler.wait_acks(2)
        assert [(a.instruction_id, a.success) for a in acks] == [(f"subscribe-{name}", True), ("permits", True)]
        wait_handler(node, "command", name)
        command = command_pb2.Command(
            message_identifier=unique("cmd"),
            name=name,
            timestamp=int(time.time() * 1000),
            payload=common_pb2.SerializedObject(type="com.example.PlaceOrder", revision="2", data=bytes(range(256))),
            meta_data={
                "text": common_pb2.MetaDataValue(text_value="héllo"),
                "number": common_pb2.MetaDataValue(number_value=-42),
                "flag": common_pb2.MetaDataValue(boolean_value=True),
                "double": common_pb2.MetaDataValue(double_value=2.5),
                "object": common_pb2.MetaDataValue(
                    bytes_value=common_pb2.SerializedObject(type="t", revision="r", data=b"\x00\xff")
                ),
            },
            processing_instructions=[
                common_pb2.ProcessingInstruction(
                    key=common_pb2.ROUTING_KEY, value=common_pb2.MetaDataValue(text_value="order-7")
                )
            ],
            client_id="py-dispatcher",
            component_name="py-sender",
        )
        response = dispatcher.Dispatch(command, timeout=10)
        assert len(handler.received) == 1
        assert wire(handler.received[0]) == wire(command)
        assert wire(response) == wire(handler.sent_responses[command.message_identifier])
        assert response.request_identifier == command.message_identifier
        assert response.error_code == ""
        assert response.payload.data == bytes(range(256))[::-1]
    finally:
        handler.close()


def test_no_handler_is_in_band(dispatcher):
    command = command_pb2.Command(message_identifier=unique("cmd"), name="NobodyHandlesThis")
    response = dispatcher.Dispatch(command, timeout=10)  # the call itself succeeds
    assert response.error_code == "AXONIQ-4000"
    assert response.request_identifier == command.message_identifier
    assert response.error_message.message == "No Handler for command: NobodyHandlesThis"
    assert response.error_message.error_code == "AXONIQ-4000"


def test_empty_subscription_is_a_failed_ack(handler_node, dispatcher):
    handler = CommandHandler(handler_node, [""], client_id="py-bad")
    try:
        acks = handler.wait_acks(2)
        assert (acks[0].instruction_id, acks[0].success) == ("subscribe-", False)
        assert acks[0].error.error_code == "AXONIQ-1002"
        assert (acks[1].instruction_id, acks[1].success) == ("permits", True)
    finally:
        handler.close()


def test_handler_in_another_context(node, handler_node, dispatcher):
    name = unique("CtxCommand")
    handler = CommandHandler(handler_node, [name], client_id="py-other", context="other")
    try:
        handler.wait_acks(2)
        wait_handler(node, "command", name, context="other")
        command = command_pb2.Command(message_identifier=unique("cmd"), name=name)
        assert dispatcher.Dispatch(command, timeout=10).error_code == "AXONIQ-4000"
        command = command_pb2.Command(message_identifier=unique("cmd"), name=name)
        response = dispatcher.Dispatch(command, metadata=ctx_md("other"), timeout=10)
        assert response.error_code == ""
        assert response.meta_data["handled-by"].text_value == "py-other"
    finally:
        handler.close()
