package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.myelin.axonfw.Messages.Deposited;
import java.time.Duration;
import java.util.List;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Axon's {@code AxonServerEventScheduler} against Myelin, which does not serve the
 * EventScheduler service yet (docs/compatibility.md): the call fails at once, as Axon maps
 * UNIMPLEMENTED, and the node logs the unimplemented call once, naming service and method.
 */
class SchedulerTest {
    static MyelinNode node;

    @BeforeAll
    static void startNode() throws Exception {
        node = MyelinNode.start();
        node.unimplementedCallsExpected = true;
    }

    @AfterAll
    static void stopNode() throws Exception {
        node.close();
    }

    @Test
    void the_event_scheduler_is_refused_as_unimplemented_and_the_node_logs_it_once() throws Exception {
        try (App app = node.startApp(App.Options.of(node.servers(), "scheduler-1"))) {
            for (int i = 0; i < 3; i++) {
                assertThrows(UnsupportedOperationException.class,
                        () -> app.eventScheduler().schedule(Duration.ofSeconds(1), new Deposited("s", 1, 1)));
            }
            long deadline = System.nanoTime() + 5_000_000_000L;
            List<String> lines = node.unimplementedCalls();
            while (lines.isEmpty() && System.nanoTime() < deadline) {
                Thread.sleep(50);
                lines = node.unimplementedCalls();
            }
            assertEquals(1, lines.size(), "one log line for three calls: " + lines);
            assertTrue(lines.get(0).contains("service=\"io.axoniq.axonserver.grpc.event.EventScheduler\"")
                    && lines.get(0).contains("method=\"ScheduleEvent\""), lines.get(0));
        }
    }
}
