"""PlatformService.OpenStream through AxonIQ's own generated stubs (axonclient.protos.control_pb2):
register, heartbeats both ways, processor reports, and the acknowledgement of every instruction
that carries an instruction id — failed (AXONIQ-1002) for one the node does not support."""

from __future__ import annotations

import queue
import threading
import time

from axonclient.protos import common_pb2, control_pb2, control_pb2_grpc

from myelin_harness import END as _END, ctx_md, unique, queue_requests



class ControlStream:
    """A client application's control stream, read on a thread."""

    def __init__(self, channel, context=None):
        self.requests: queue.Queue = queue.Queue()
        self.received: queue.Queue = queue.Queue()
        stub = control_pb2_grpc.PlatformServiceStub(channel)
        self.call = stub.OpenStream(queue_requests(self.requests), metadata=ctx_md(context))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()


    def _read(self):
        try:
            for message in self.call:
                self.received.put(message)
        except Exception as exc:  # the stream ended with an error (or was cancelled)
            self.received.put(exc)
        self.received.put(_END)

    def send(self, instruction_id="", **request):
        self.requests.put(control_pb2.PlatformInboundInstruction(instruction_id=instruction_id, **request))

    def ack(self, instruction_id, timeout=5.0):
        """The ack for `instruction_id`; heartbeats before it are counted and skipped."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            assert isinstance(message, control_pb2.PlatformOutboundInstruction), message
            kind = message.WhichOneof("request")
            if kind == "heartbeat":
                continue
            assert kind == "ack", message
            if message.ack.instruction_id == instruction_id:
                return message.ack

    def heartbeats(self, window):
        deadline = time.monotonic() + window
        count = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.received.get(timeout=left)
            except queue.Empty:
                break
            assert isinstance(message, control_pb2.PlatformOutboundInstruction), message
            assert message.WhichOneof("request") == "heartbeat", message
            count += 1
        return count

    def close(self):
        self.requests.put(_END)
        self.reader.join(5)


def test_register_heartbeat_and_ack_round_trip(node):
    channel = node.channel()
    stream = ControlStream(channel, context="ctx1")
    try:
        client_id = unique("py-client")
        stream.send(
            "reg-1",
            register=control_pb2.ClientIdentification(
                client_id=client_id, component_name="py-app", version="4.6.0", tags={"region": "eu"}
            ),
        )
        assert stream.ack("reg-1").success

        stream.send("hb-1", heartbeat=control_pb2.Heartbeat())
        assert stream.ack("hb-1").success
        # The node heartbeats the registered client every 500 ms.
        assert 2 <= stream.heartbeats(1.6) <= 4

        stream.send(
            "epi-1",
            event_processor_info=control_pb2.EventProcessorInfo(
                processor_name="orders", mode="Pooled", active_threads=2, running=True,
                segment_status=[control_pb2.EventProcessorInfo.SegmentStatus(segment_id=0, caught_up=True)],
            ),
        )
        assert stream.ack("epi-1").success
        # The client's answer to a server instruction is accepted (and acked when it has an id).
        stream.send("ack-1", ack=common_pb2.InstructionAck(instruction_id="server-1", success=True))
        assert stream.ack("ack-1").success

        # Something the node does not support (these 4.x stubs predate the topology requests, so
        # an instruction with no request at all): a failed ack, and the stream stays up.
        stream.send("topo-1")
        failed = stream.ack("topo-1")
        assert not failed.success
        assert failed.error.error_code == "AXONIQ-1002"
        assert list(failed.error.details) == ["Unsupported instruction"]
        assert failed.error.location == node.me()["name"]
        stream.send("hb-2", heartbeat=control_pb2.Heartbeat())
        assert stream.ack("hb-2").success
    finally:
        stream.close()
        channel.close()
