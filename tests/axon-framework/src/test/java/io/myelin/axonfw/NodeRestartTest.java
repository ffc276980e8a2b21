package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import io.myelin.axonfw.Messages.AccountOpened;
import io.myelin.axonfw.Messages.OpenAccount;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentSkipListSet;
import java.util.concurrent.TimeUnit;
import org.axonframework.common.stream.BlockingStream;
import org.axonframework.eventhandling.TrackedEventMessage;
import org.axonframework.eventhandling.tokenstore.inmemory.InMemoryTokenStore;
import org.junit.jupiter.api.Test;

/**
 * Heartbeats on, and the node restarted in the middle of the run: the application reconnects by
 * itself and carries on, with nothing lost or handled twice.
 */
class NodeRestartTest extends OneNodeTest {
    @Test
    void the_application_reconnects_after_a_node_restart_and_loses_or_repeats_nothing() throws Exception {
        Recorder recorder = new Recorder();
        InMemoryTokenStore tokens = new InMemoryTokenStore();
        try (App app = node.startApp(
                App.Options.of(node.servers(), "restart-1").withLedgers(recorder, tokens).withHeartbeats())) {
            int accounts = 60;
            Set<String> opened = new ConcurrentSkipListSet<>();
            List<String> failures = new ArrayList<>();
            Thread producer = new Thread(() -> {
                for (int i = 0; i < accounts; i++) {
                    String id = String.format("restart-%03d", i);
                    // Retried until it is known to be stored: a command that failed when the node
                    // went away may or may not have been appended; then the retry finds the
                    // account there (AXONIQ-2000 on its sequence 0).
                    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
                    while (!opened.contains(id) && System.nanoTime() < deadline) {
                        try {
                            app.commands().sendAndWait(new OpenAccount(id, "r"), 5, TimeUnit.SECONDS);
                            opened.add(id);
                        } catch (RuntimeException e) {
                            String text = AggregateTest.describe(e);
                            if (text.contains("AXONIQ-2000")) {
                                opened.add(id);
                            } else {
                                synchronized (failures) {
                                    failures.add(text);
                                }
                                sleep(100);
                            }
                        }
                    }
                    sleep(40);
                }
            });
            producer.start();
            while (opened.size() < 20) {
                Thread.sleep(20);
            }
            long down = System.nanoTime();
            node.stop();
            Thread.sleep(1000);
            node.launch();
            long restarted = System.nanoTime();
            producer.join(120_000);
            assertEquals(accounts, opened.size(), "every account opened in the end; failures on the way: " + failures);
            assertTrue(!failures.isEmpty(), "the restart was felt by the application");
            System.out.printf("node down for %d ms; %d commands failed meanwhile%n",
                    TimeUnit.NANOSECONDS.toMillis(restarted - down), failures.size());

            // The store holds each account's opening once.
            List<String> eventIds = new ArrayList<>();
            Map<String, Integer> openings = new HashMap<>();
            try (BlockingStream<TrackedEventMessage<?>> stream = app.eventStore().openStream(null)) {
                while (stream.hasNextAvailable(2, TimeUnit.SECONDS)) {
                    TrackedEventMessage<?> event = stream.nextAvailable();
                    eventIds.add(event.getIdentifier());
                    if (event.getPayload() instanceof AccountOpened o) {
                        openings.merge(o.accountId(), 1, Integer::sum);
                    }
                }
            }
            assertEquals(new TreeSet<>(opened), new TreeSet<>(openings.keySet()));
            assertTrue(openings.values().stream().allMatch(n -> n == 1), openings.toString());
            assertEquals(accounts, eventIds.size());

            // Both processors reconnected by themselves and handled every event exactly once.
            ProcessorTest.awaitHandled(recorder, eventIds, 1);

            // The client is connected again, with its processors reported.
            ProcessorTest.awaitStatus(node, Ledgers.TRACKING, r -> r.path("clientId").asText().equals("restart-1")
                    && r.path("running").asBoolean());
            String clients = node.get("/v1/clients?context=default").body();
            assertTrue(clients.contains("\"clientId\":\"restart-1\""), clients);

            // Heartbeats both ways: the node records the client's heartbeats while it is idle,
            // and the client, which gives up a connection whose heartbeats go unanswered for
            // 2.5 s, stays on the same connection for longer than that.
            JsonNode before = client(clients);
            Thread.sleep(4000);
            JsonNode after = client(node.get("/v1/clients?context=default").body());
            assertEquals(before.path("clientStreamId").asText(), after.path("clientStreamId").asText(),
                    "the client did not reconnect while idle");
            assertEquals(before.path("connectedAt").asLong(), after.path("connectedAt").asLong());
            assertTrue(after.path("lastHeartbeat").asLong() >= before.path("lastHeartbeat").asLong() + 3000,
                    "the node saw heartbeats while the client was idle: " + before + " then " + after);
        }
    }

    static JsonNode client(String clients) throws Exception {
        for (JsonNode client : ProcessorTest.JSON.readTree(clients)) {
            if (client.path("clientId").asText().equals("restart-1")) {
                return client;
            }
        }
        throw new AssertionError("restart-1 not connected: " + clients);
    }

    static void sleep(long millis) {
        try {
            Thread.sleep(millis);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
