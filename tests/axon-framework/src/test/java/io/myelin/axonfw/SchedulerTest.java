package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.myelin.axonfw.Messages.Deposited;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.axonframework.common.stream.BlockingStream;
import org.axonframework.eventhandling.TrackedEventMessage;
import org.axonframework.eventhandling.scheduling.EventScheduler;
import org.axonframework.eventhandling.scheduling.ScheduleToken;
import org.junit.jupiter.api.Test;

/**
 * Axon's {@code AxonServerEventScheduler} against Myelin (issue 14): schedule, reschedule and
 * cancel; a scheduled event is published once, at its time or just after, as an ordinary event
 * of the context, and a schedule survives a node restart. The node logs no unimplemented call
 * ({@link MyelinNode#close()} checks).
 */
class SchedulerTest extends OneNodeTest {

    /** The account ids of the scheduled {@code Deposited} events in the store, in order. */
    static List<String> published(App app) {
        List<String> ids = new ArrayList<>();
        try (BlockingStream<TrackedEventMessage<?>> stream = app.eventStore().openStream(null)) {
            while (stream.hasNextAvailable(500, TimeUnit.MILLISECONDS)) {
                if (stream.nextAvailable().getPayload() instanceof Deposited d && d.accountId().startsWith("sched-")) {
                    ids.add(d.accountId());
                }
            }
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException(e);
        }
        return ids;
    }

    static void awaitPublished(App app, String id, Duration within) throws InterruptedException {
        long deadline = System.nanoTime() + within.toNanos();
        while (!published(app).contains(id)) {
            assertTrue(System.nanoTime() < deadline, id + " not published within " + within);
            Thread.sleep(100);
        }
    }

    @Test
    void scheduled_events_are_published_once_at_their_time_and_can_be_rescheduled_or_cancelled() throws Exception {
        try (App app = node.startApp(App.Options.of(node.servers(), "scheduler-1"))) {
            EventScheduler scheduler = app.eventScheduler();
            Instant at = Instant.now().plusMillis(2000);
            ScheduleToken kept = scheduler.schedule(at, new Deposited("sched-kept", 1, 1));
            ScheduleToken moved = scheduler.schedule(at, new Deposited("sched-moved", 2, 2));
            ScheduleToken cancelled = scheduler.schedule(at, new Deposited("sched-cancelled", 3, 3));
            Instant later = at.plusMillis(1500);
            ScheduleToken rescheduled =
                    scheduler.reschedule(moved, Duration.between(Instant.now(), later), new Deposited("sched-later", 4, 4));
            scheduler.cancelSchedule(cancelled);
            List<String> early = published(app);
            early.retainAll(List.of("sched-kept", "sched-moved", "sched-cancelled", "sched-later"));
            assertEquals(List.of(), early, "nothing is published before its time");

            awaitPublished(app, "sched-kept", Duration.ofSeconds(10));
            assertTrue(!Instant.now().isBefore(at), "published at its time, not before");
            awaitPublished(app, "sched-later", Duration.ofSeconds(10));
            assertTrue(!Instant.now().isBefore(later), "the rescheduled event at its new time");

            // Cancelling what was already published succeeds, as with Axon Server, and changes nothing.
            scheduler.cancelSchedule(kept);
            scheduler.cancelSchedule(rescheduled);
            Thread.sleep(1000);
            List<String> ids = published(app);
            assertEquals(1, Collections.frequency(ids, "sched-kept"), ids.toString());
            assertEquals(1, Collections.frequency(ids, "sched-later"), ids.toString());
            assertEquals(0, Collections.frequency(ids, "sched-moved"), ids.toString());
            assertEquals(0, Collections.frequency(ids, "sched-cancelled"), ids.toString());
        }
    }

    @Test
    void a_scheduled_event_survives_a_node_restart_and_is_published_once() throws Exception {
        Instant at;
        try (App app = node.startApp(App.Options.of(node.servers(), "scheduler-2"))) {
            at = Instant.now().plusMillis(3000);
            app.eventScheduler().schedule(at, new Deposited("sched-restart", 5, 5));
        }
        node.stop();
        long wait = Duration.between(Instant.now(), at.plusMillis(1000)).toMillis();
        assertTrue(wait > 0, "the node took too long to stop");
        Thread.sleep(wait);
        node.launch();
        try (App app = node.startApp(App.Options.of(node.servers(), "scheduler-3"))) {
            awaitPublished(app, "sched-restart", Duration.ofSeconds(20));
            Thread.sleep(1500);
            List<String> ids = published(app);
            assertEquals(1, Collections.frequency(ids, "sched-restart"), ids.toString());
        }
    }
}
