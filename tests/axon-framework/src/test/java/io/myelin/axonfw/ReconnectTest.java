package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import io.myelin.axonfw.Messages.Ping;
import java.net.http.HttpResponse;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

/**
 * Axon's {@code RequestReconnect}, what a node sends a client when it balances its clients or is
 * cut off from its context's majority (and what {@code PATCH /v1/instructions} sends): the
 * connector does not acknowledge it, it reconnects by itself; the operator's call answers at
 * once. The connector closes its old connection before it subscribes on the new one: a command
 * sent in between waits for the returning handler (up to 3 s) instead of failing with "no
 * handler", so every command sent meanwhile is answered.
 */
class ReconnectTest extends OneNodeTest {
    @Test
    void an_application_asked_to_reconnect_comes_back_and_its_commands_are_answered() throws Exception {
        try (App handler = node.startApp(App.Options.of(node.servers(), "recon-handler"));
                App sender = node.startApp(App.Options.client(node.servers(), "recon-sender"))) {
            String before = streamId("recon-handler");
            List<String> failures = new CopyOnWriteArrayList<>();
            AtomicInteger answered = new AtomicInteger();
            AtomicBoolean stop = new AtomicBoolean();
            Thread load = new Thread(() -> {
                int i = 0;
                while (!stop.get()) {
                    try {
                        sender.commands().sendAndWait(new Ping("key-" + (i++ % 16)), 10, TimeUnit.SECONDS);
                        answered.incrementAndGet();
                    } catch (RuntimeException e) {
                        failures.add(e.getClass().getSimpleName());
                    }
                }
            });
            load.start();
            Thread.sleep(500);
            long asked = System.nanoTime();
            HttpResponse<String> reply = node.patch("/v1/instructions?client=recon-handler&context=default");
            long answeredIn = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - asked);
            String after = before;
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
            while (after.equals(before) && System.nanoTime() < deadline) {
                Thread.sleep(50);
                after = streamId("recon-handler");
            }
            long back = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - asked);
            // The load goes on a while on the new connection.
            Thread.sleep(1000);
            stop.set(true);
            load.join(30_000);
            System.out.printf("reconnect: PATCH answered %d in %d ms (%s); a new control stream after %d ms; "
                    + "%d commands answered, %d failed (%s)%n",
                    reply.statusCode(), answeredIn, reply.body(), back, answered.get(), failures.size(),
                    new java.util.TreeSet<>(failures));
            assertEquals(200, reply.statusCode(), reply.body());
            assertTrue(answeredIn < 5000, "the reconnect call took " + answeredIn + " ms");
            assertNotEquals(before, after, "the application did not reconnect");
            assertTrue(failures.isEmpty(), answered.get() + " answered, failed: " + new java.util.TreeSet<>(failures)
                    + " x" + failures.size());
            assertEquals("recon-handler",
                    sender.commands().sendAndWait(new Ping("after"), 10, TimeUnit.SECONDS));
        }
    }

    /** The id of the client's control stream, "" when it has none now. */
    static String streamId(String clientId) throws Exception {
        String clients = node.get("/v1/clients?context=default").body();
        for (JsonNode client : ProcessorTest.JSON.readTree(clients)) {
            if (client.path("clientId").asText().equals(clientId)) {
                return client.path("clientStreamId").asText();
            }
        }
        return "";
    }
}
