package io.myelin.axonfw;

import static org.axonframework.commandhandling.GenericCommandMessage.asCommandMessage;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.myelin.axonfw.Messages.AccountOpened;
import io.myelin.axonfw.Messages.AccountView;
import io.myelin.axonfw.Messages.Deposit;
import io.myelin.axonfw.Messages.Deposited;
import io.myelin.axonfw.Messages.InspectAccount;
import io.myelin.axonfw.Messages.OpenAccount;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import org.axonframework.axonserver.connector.event.util.GrpcExceptionParser;
import org.axonframework.commandhandling.CommandResultMessage;
import org.axonframework.eventhandling.DomainEventMessage;
import org.axonframework.modelling.command.ConcurrencyException;
import org.junit.jupiter.api.Test;

/** An event-sourced aggregate stored in Myelin: create, change, load, conflicts and snapshots. */
class AggregateTest extends OneNodeTest {
    static List<DomainEventMessage<?>> history(App app, String id) {
        List<DomainEventMessage<?>> out = new ArrayList<>();
        app.eventStore().readEvents(id).forEachRemaining(out::add);
        return out;
    }

    /** The history once the snapshot at its start stayed the same for half a second. */
    static List<DomainEventMessage<?>> settledHistory(App app, String id) throws InterruptedException {
        List<DomainEventMessage<?>> stream = history(app, id);
        for (int i = 0; i < 40; i++) {
            Thread.sleep(500);
            List<DomainEventMessage<?>> again = history(app, id);
            if (again.get(0).getSequenceNumber() == stream.get(0).getSequenceNumber()) {
                return again;
            }
            stream = again;
        }
        throw new AssertionError("the snapshots of " + id + " never settled");
    }

    @Test
    void an_aggregate_is_created_changed_and_loaded() throws Exception {
        try (App app = node.startApp(App.Options.of(node.servers(), "agg-1"))) {
            String id = "acc-" + UUID.randomUUID();
            app.commands().sendAndWait(new OpenAccount(id, "ada"));
            for (int amount : new int[] {10, 20, 30}) {
                app.commands().sendAndWait(new Deposit(id, amount, false));
            }
            AccountView view = app.commands().sendAndWait(new InspectAccount(id));
            assertEquals(60, view.balance());
            assertEquals(4, view.eventsReplayed(), "every stored event was read to load it");
            assertEquals(3, view.version());

            List<DomainEventMessage<?>> events = history(app, id);
            assertEquals(4, events.size());
            for (int i = 0; i < events.size(); i++) {
                assertEquals(i, events.get(i).getSequenceNumber());
                assertEquals(id, events.get(i).getAggregateIdentifier());
                assertEquals("Account", events.get(i).getType());
            }
            assertInstanceOf(AccountOpened.class, events.get(0).getPayload());
            assertEquals(new Deposited(id, 30, 60), events.get(3).getPayload());
        }
    }

    @Test
    void two_concurrent_commands_on_one_aggregate_one_wins_the_other_gets_a_concurrency_exception()
            throws Exception {
        // Two instances, each with its own lock on the aggregate, take a command for it straight
        // to their own handlers: both load the same version and both append the next sequence.
        try (App a = node.startApp(App.Options.of(node.servers(), "agg-a"));
                App b = node.startApp(App.Options.of(node.servers(), "agg-b"))) {
            String id = "acc-" + UUID.randomUUID();
            a.commands().sendAndWait(new OpenAccount(id, "bob"));
            Account.barrier = new CyclicBarrier(2);
            List<CompletableFuture<CommandResultMessage<?>>> outcomes = new ArrayList<>();
            for (App app : List.of(a, b)) {
                // The local bus runs the handler in the dispatching thread: one thread each.
                CompletableFuture<CommandResultMessage<?>> outcome = new CompletableFuture<>();
                CompletableFuture.runAsync(() -> app.localCommandBus()
                        .dispatch(asCommandMessage(new Deposit(id, 5, true)), (c, r) -> outcome.complete(r)));
                outcomes.add(outcome);
            }
            int ok = 0;
            List<Throwable> failures = new ArrayList<>();
            for (CompletableFuture<CommandResultMessage<?>> outcome : outcomes) {
                CommandResultMessage<?> result = outcome.get(30, TimeUnit.SECONDS);
                if (result.isExceptional()) {
                    failures.add(result.exceptionResult());
                } else {
                    ok++;
                }
            }
            assertEquals(1, ok, "exactly one command succeeds; failures: " + failures);
            assertEquals(1, failures.size());
            // Axon Framework 4.13's AxonServerEventStore rethrows the append's gRPC error as it is
            // (it does not map it, against Axon Server either): OUT_OF_RANGE with AXONIQ-2000 in
            // the AxonIQ-ErrorCode trailer, which Axon's own error mapping turns into its
            // ConcurrencyException.
            Throwable failure = failures.get(0);
            StatusRuntimeException status = cause(failure, StatusRuntimeException.class);
            assertNotNull(status, "the append's error: " + describe(failure));
            assertEquals(Status.Code.OUT_OF_RANGE, status.getStatus().getCode());
            assertTrue(status.getMessage().contains("[AXONIQ-2000]"), status.getMessage());
            assertInstanceOf(ConcurrencyException.class, GrpcExceptionParser.parse(status),
                    "Axon maps the error code to its ConcurrencyException");
            assertEquals(2, history(a, id).size(), "only the winner's event is stored");
            AccountView view = b.commands().sendAndWait(new InspectAccount(id));
            assertEquals(5, view.balance());
        } finally {
            Account.barrier = null;
        }
    }

    @Test
    void snapshots_every_n_events_and_loads_from_the_snapshot_plus_later_events() throws Exception {
        int every = 5;
        String id = "acc-" + UUID.randomUUID();
        int deposits = 16;
        long snapshotAt;
        try (App app = node.startApp(App.Options.of(node.servers(), "agg-snap").snapshotEvery(every))) {
            app.commands().sendAndWait(new OpenAccount(id, "cy"));
            for (int i = 1; i <= deposits; i++) {
                app.commands().sendAndWait(new Deposit(id, i, false));
            }
            // Sequence 0 is the opening, `deposits` the last deposit. Axon stores a snapshot
            // without waiting for its confirmation: read until the newest one stays put.
            List<DomainEventMessage<?>> stream = settledHistory(app, id);
            DomainEventMessage<?> first = stream.get(0);
            assertInstanceOf(Account.class, first.getPayload(), "the stream starts with a snapshot: " + first);
            snapshotAt = first.getSequenceNumber();
            assertTrue(snapshotAt >= every - 1 && snapshotAt <= deposits, "snapshot at " + snapshotAt);
            assertTrue(deposits - snapshotAt <= every, "a snapshot at least every " + every + " events");
            assertEquals(deposits - snapshotAt, stream.size() - 1, "after the snapshot: the later events only");
        }
        // Another instance, taking no snapshots, adds two events after the snapshot.
        try (App app = node.startApp(App.Options.of(node.servers(), "agg-plain"))) {
            app.commands().sendAndWait(new Deposit(id, 100, false));
            app.commands().sendAndWait(new Deposit(id, 200, false));
            long last = deposits + 2;
            List<DomainEventMessage<?>> stream = history(app, id);
            assertEquals(snapshotAt, stream.get(0).getSequenceNumber());
            assertInstanceOf(Account.class, stream.get(0).getPayload());
            assertEquals(last - snapshotAt, stream.size() - 1);
            for (int i = 1; i < stream.size(); i++) {
                assertEquals(snapshotAt + i, stream.get(i).getSequenceNumber());
                assertInstanceOf(Deposited.class, stream.get(i).getPayload());
            }
            AccountView view = app.commands().sendAndWait(new InspectAccount(id));
            assertEquals(deposits * (deposits + 1) / 2 + 300, view.balance());
            assertEquals(last, view.version());
            assertEquals(last - snapshotAt, view.eventsReplayed(),
                    "the load read the snapshot at " + snapshotAt + " and only the events after it");
        }
    }

    static <T extends Throwable> T cause(Throwable t, Class<T> type) {
        for (Throwable c = t; c != null; c = c.getCause()) {
            if (type.isInstance(c)) {
                return type.cast(c);
            }
        }
        return null;
    }

    static String describe(Throwable t) {
        StringBuilder out = new StringBuilder();
        for (Throwable c = t; c != null; c = c.getCause()) {
            out.append(c.getClass().getName()).append(": ").append(c.getMessage()).append(" <- ");
        }
        return out.toString();
    }
}
