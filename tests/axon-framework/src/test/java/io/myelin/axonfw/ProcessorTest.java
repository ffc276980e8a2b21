package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import io.myelin.axonfw.Messages.Deposit;
import io.myelin.axonfw.Messages.OpenAccount;
import java.net.http.HttpResponse;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import java.util.function.Predicate;
import org.axonframework.common.stream.BlockingStream;
import org.axonframework.eventhandling.StreamingEventProcessor;
import org.axonframework.eventhandling.TrackedEventMessage;
import org.axonframework.eventhandling.tokenstore.inmemory.InMemoryTokenStore;
import org.junit.jupiter.api.Test;

/**
 * A tracking and a pooled streaming processor, two segments each, reading from Myelin: every
 * event exactly once per processor across a client restart, split and merge through Myelin's
 * REST API, a reset and replay, and their status in {@code /v1/processors}.
 */
class ProcessorTest extends OneNodeTest {
    static final List<String> PROCESSORS = List.of(Ledgers.TRACKING, Ledgers.POOLED);
    static final ObjectMapper JSON = new ObjectMapper();
    /** Opens `accounts` accounts with `deposits` deposits each: accounts * (1 + deposits) events. */
    static int produce(App app, int accounts, int deposits) {
        for (int i = 0; i < accounts; i++) {
            String id = "acc-" + UUID.randomUUID();
            app.commands().sendAndWait(new OpenAccount(id, "p" + i));
            for (int d = 1; d <= deposits; d++) {
                app.commands().sendAndWait(new Deposit(id, d, false));
            }
        }
        return accounts * (1 + deposits);
    }

    /** The ids of every event in the store, in token order, read with Axon's own stream. */
    static List<String> storedEventIds(App app, int expected) throws InterruptedException {
        List<String> ids = new ArrayList<>();
        try (BlockingStream<TrackedEventMessage<?>> stream = app.eventStore().openStream(null)) {
            while (ids.size() < expected && stream.hasNextAvailable(10, TimeUnit.SECONDS)) {
                ids.add(stream.nextAvailable().getIdentifier());
            }
        }
        assertEquals(expected, ids.size());
        return ids;
    }

    /** Waits until each processor handled every one of `ids` exactly `times` times, and nothing else. */
    static void awaitHandled(Recorder recorder, List<String> ids, int times) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
        for (String processor : PROCESSORS) {
            Map<String, Integer> counts = recorder.counts(processor);
            while (!allHandled(counts, ids, times) && System.nanoTime() < deadline) {
                Thread.sleep(50);
                counts = recorder.counts(processor);
            }
            Thread.sleep(300); // a duplicate would arrive now
            counts = recorder.counts(processor);
            assertEquals(new TreeSet<>(ids), new TreeSet<>(counts.keySet()), processor + ": the events handled");
            Map<String, Integer> wrong = new HashMap<>();
            counts.forEach((id, n) -> {
                if (n != times) {
                    wrong.put(id, n);
                }
            });
            assertEquals(Map.of(), wrong, processor + ": events not handled exactly " + times + " time(s)");
        }
    }

    static boolean allHandled(Map<String, Integer> counts, List<String> ids, int times) {
        return counts.size() >= ids.size() && ids.stream().allMatch(id -> counts.getOrDefault(id, 0) >= times);
    }

    /** The processor's latest report in /v1/processors, once it satisfies `check`. */
    static JsonNode awaitStatus(MyelinNode node, String processor, Predicate<JsonNode> check) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        JsonNode last = null;
        while (System.nanoTime() < deadline) {
            HttpResponse<String> response = node.get("/v1/processors?context=default");
            assertEquals(200, response.statusCode(), response.body());
            for (JsonNode report : JSON.readTree(response.body())) {
                if (report.path("processorName").asText().equals(processor)) {
                    last = report;
                    if (check.test(report)) {
                        return report;
                    }
                }
            }
            Thread.sleep(100);
        }
        throw new AssertionError(processor + ": status never as expected; last: " + last);
    }

    static Predicate<JsonNode> segments(int count) {
        return r -> r.path("running").asBoolean() && r.path("segments").size() == count;
    }

    @Test
    void every_event_once_per_processor_across_restart_split_merge_and_replay() throws Exception {
        Recorder recorder = new Recorder();
        InMemoryTokenStore tokens = new InMemoryTokenStore(); // outlives the instances, as a database would
        App.Options options = App.Options.of(node.servers(), "proc-1").withLedgers(recorder, tokens);
        int total;
        App app = node.startApp(options);
        try {
            total = produce(app, 5, 3);
            awaitHandled(recorder, storedEventIds(app, total), 1);

            // Status: both processors, two segments each, streaming, running.
            JsonNode tracking = awaitStatus(node, Ledgers.TRACKING, segments(2));
            JsonNode pooled = awaitStatus(node, Ledgers.POOLED, segments(2));
            for (JsonNode report : List.of(tracking, pooled)) {
                assertEquals(App.COMPONENT, report.path("componentName").asText());
                assertEquals("proc-1", report.path("clientId").asText());
                assertTrue(report.path("isStreamingProcessor").asBoolean(), report.toString());
                for (JsonNode segment : report.path("segments")) {
                    assertEquals(2, segment.path("onePartOf").asInt(), report.toString());
                }
            }
            assertEquals("Tracking", tracking.path("mode").asText());
            assertEquals("Pooled Streaming", pooled.path("mode").asText());
        } finally {
            app.close();
        }

        // The client restarts; events appended meanwhile are handled once, the old ones not again.
        try (App writer = node.startApp(App.Options.of(node.servers(), "proc-writer"))) {
            total += produce(writer, 3, 2);
        }
        app = node.startApp(options.withLedgers(recorder, tokens));
        try {
            List<String> ids = storedEventIds(app, total);
            awaitHandled(recorder, ids, 1);

            // Split through Myelin's REST API: three segments; then merge back to two.
            for (String processor : PROCESSORS) {
                String base = "/v1/components/" + App.COMPONENT + "/processors/" + processor + "/segments/";
                awaitStatus(node, processor, segments(2));
                HttpResponse<String> split = node.patch(base + "split?context=default");
                assertEquals(200, split.statusCode(), split.body());
                awaitStatus(node, processor, segments(3));
                total += produce(app, 2, 2);
                awaitHandled(recorder, storedEventIds(app, total), 1);

                // Both halves store their tokens (see App: claimExtensionThreshold) before the merge.
                Thread.sleep(1000);
                HttpResponse<String> merge = node.patch(base + "merge?context=default");
                assertEquals(200, merge.statusCode(), merge.body());
                awaitStatus(node, processor, segments(2));
                total += produce(app, 2, 2);
                awaitHandled(recorder, storedEventIds(app, total), 1);
            }

            // Reset and replay: every event once more, as a replay.
            ids = storedEventIds(app, total);
            for (String processor : PROCESSORS) {
                StreamingEventProcessor p = app.processor(processor, StreamingEventProcessor.class);
                p.shutdownAsync().get(20, TimeUnit.SECONDS);
                p.resetTokens();
                p.start();
            }
            awaitHandled(recorder, ids, 2);
            for (String processor : PROCESSORS) {
                assertEquals(total, recorder.replays(processor), processor + ": replayed events");
                awaitStatus(node, processor, r -> r.path("running").asBoolean());
            }
        } finally {
            app.close();
        }
    }
}
