package io.myelin.axonfw;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.myelin.axonfw.Messages.CountTo;
import io.myelin.axonfw.Messages.Deposit;
import io.myelin.axonfw.Messages.FindBalance;
import io.myelin.axonfw.Messages.OpenAccount;
import io.myelin.axonfw.Messages.Ping;
import io.myelin.axonfw.Messages.Unhandled;
import io.myelin.axonfw.Messages.WatchBalance;
import io.myelin.axonfw.Messages.WhoIsThere;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import org.axonframework.commandhandling.NoHandlerForCommandException;
import org.axonframework.messaging.responsetypes.ResponseTypes;
import org.axonframework.queryhandling.SubscriptionQueryResult;
import org.junit.jupiter.api.Test;
import org.reactivestreams.Subscription;
import reactor.core.publisher.BaseSubscriber;
import reactor.core.publisher.Flux;

/** Commands and queries routed by Myelin between two instances of the application. */
class RoutingTest extends OneNodeTest {
    static Map<String, Set<String>> pingAll(App sender, List<String> keys, int rounds) {
        Map<String, Set<String>> handledBy = new HashMap<>();
        for (int round = 0; round < rounds; round++) {
            for (String key : keys) {
                String instance = sender.commands().sendAndWait(new Ping(key), 10, TimeUnit.SECONDS);
                handledBy.computeIfAbsent(key, k -> new HashSet<>()).add(instance);
            }
        }
        return handledBy;
    }

    @Test
    void commands_stick_to_their_routing_key_and_move_when_an_instance_stops() throws Exception {
        List<String> keys = new ArrayList<>();
        for (int i = 0; i < 24; i++) {
            keys.add("key-" + i);
        }
        try (App a = node.startApp(App.Options.of(node.servers(), "route-a"));
                App sender = node.startApp(App.Options.client(node.servers(), "route-sender"))) {
            App b = node.startApp(App.Options.of(node.servers(), "route-b"));
            awaitHandlers("Ping", 2);

            Map<String, Set<String>> handledBy = pingAll(sender, keys, 3);
            for (String key : keys) {
                assertEquals(1, handledBy.get(key).size(), key + " went to " + handledBy.get(key));
            }
            Set<String> used = handledBy.values().stream().flatMap(Set::stream).collect(Collectors.toSet());
            assertEquals(Set.of("route-a", "route-b"), used, "both instances take a share of the keys");

            // B stops while commands keep coming: each one is answered (by B before it leaves,
            // by A after), none hangs, and afterwards A takes every key.
            List<String> failures = new CopyOnWriteArrayList<>();
            Thread stopper = new Thread(b::close);
            int sent = 0;
            long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(3);
            stopper.start();
            while (System.nanoTime() < until || stopper.isAlive()) {
                String key = keys.get(sent++ % keys.size());
                try {
                    sender.commands().sendAndWait(new Ping(key), 10, TimeUnit.SECONDS);
                } catch (RuntimeException e) {
                    failures.add(e.getClass().getSimpleName() + ": " + e.getMessage());
                }
            }
            stopper.join();
            System.out.printf("while route-b stopped: %d commands sent, %d failed %s%n", sent, failures.size(), failures);
            assertTrue(failures.size() < sent / 4, sent + " sent, failed: " + failures);
            awaitHandlers("Ping", 1);
            Map<String, Set<String>> after = pingAll(sender, keys, 2);
            for (String key : keys) {
                assertEquals(Set.of("route-a"), after.get(key), key);
            }
        }
    }

    @Test
    void a_command_without_handler_fails_with_no_handler() throws Exception {
        try (App a = node.startApp(App.Options.of(node.servers(), "nohandler-a"))) {
            Exception e = assertThrows(Exception.class,
                    () -> a.commands().sendAndWait(new Unhandled("x"), 10, TimeUnit.SECONDS));
            assertInstanceOf(NoHandlerForCommandException.class, e, AggregateTest.describe(e));
        }
    }

    @Test
    void queries_point_to_point_scatter_gather_subscription_and_streaming() throws Exception {
        try (App a = node.startApp(App.Options.of(node.servers(), "query-a").withBalances());
                App b = node.startApp(App.Options.of(node.servers(), "query-b").component("myelin-bank-b"));
                App a2 = node.startApp(App.Options.of(node.servers(), "query-a2"))) {
            awaitHandlers("io.myelin.axonfw.Messages$WhoIsThere", 3);
            String id = "acc-" + UUID.randomUUID();
            b.commands().sendAndWait(new OpenAccount(id, "dee"));
            b.commands().sendAndWait(new Deposit(id, 7, false));

            // Point to point: only A answers balances; B asks.
            long balance = -1;
            for (int i = 0; i < 100 && balance != 7; i++) {
                balance = b.queries().query(new FindBalance(id), Long.class).get(10, TimeUnit.SECONDS);
                Thread.sleep(50);
            }
            assertEquals(7, balance);

            // Scatter-gather: one instance of each component answers (as Axon Server does); a
            // third instance of A's component adds no answer.
            List<String> answers = b.queries()
                    .scatterGather(new WhoIsThere(), ResponseTypes.instanceOf(String.class), 10, TimeUnit.SECONDS)
                    .collect(Collectors.toList());
            assertEquals(2, answers.size(), answers.toString());
            assertTrue(answers.contains("query-b"), answers.toString());
            assertTrue(answers.contains("query-a") || answers.contains("query-a2"), answers.toString());

            // Subscription query: the initial balance, then an update per deposit.
            try (SubscriptionQueryResult<Long, Long> watch =
                    b.queries().subscriptionQuery(new WatchBalance(id), Long.class, Long.class)) {
                assertEquals(7L, watch.initialResult().block(Duration.ofSeconds(10)));
                List<Long> updates = new CopyOnWriteArrayList<>();
                watch.updates().subscribe(updates::add);
                for (int amount = 1; amount <= 3; amount++) {
                    a.commands().sendAndWait(new Deposit(id, amount, false));
                }
                long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
                while (updates.size() < 3 && System.nanoTime() < deadline) {
                    Thread.sleep(20);
                }
                assertEquals(List.of(8L, 10L, 13L), updates);
            }

            // Streaming query with back-pressure: the subscriber asks for 5, gets 5, and the
            // handler does not run far ahead of it. The bound of what runs ahead is in bytes (the
            // HTTP/2 windows of both links, which grpc-java grows to several MiB, plus the
            // router's window of 16 responses), as against Axon Server: 3,000 responses of 32 KiB
            // (96 MB) are far beyond it.
            int total = 3000;
            List<Integer> received = new CopyOnWriteArrayList<>();
            Subscriber subscriber = new Subscriber(received);
            Flux.from(b.queries().streamingQuery(new CountTo(total, 32 * 1024), String.class)).subscribe(subscriber);
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
            while (received.size() < 5 && System.nanoTime() < deadline) {
                Thread.sleep(20);
            }
            Thread.sleep(1000);
            int produced = a.instance.produced.get() + b.instance.produced.get() + a2.instance.produced.get();
            System.out.printf("streaming query: %d asked, %d received, %d produced of %d%n", 5, received.size(), produced, total);
            assertEquals(5, received.size(), "only what was asked for arrives");
            assertTrue(produced < total / 4, "the handler produced " + produced + " of " + total + " for 5 asked");
            subscriber.more(Long.MAX_VALUE);
            deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
            while (!subscriber.done && System.nanoTime() < deadline) {
                Thread.sleep(20);
            }
            assertTrue(subscriber.done, "the stream completes; received " + received.size());
            assertEquals(total, received.size());
            for (int i = 0; i < total; i++) {
                assertEquals(i + 1, received.get(i), "in order");
            }
        }
    }

    static final class Subscriber extends BaseSubscriber<String> {
        /** The number each response starts with (the responses themselves are not kept). */
        final List<Integer> received;
        volatile boolean done;

        Subscriber(List<Integer> received) {
            this.received = received;
        }

        @Override
        protected void hookOnSubscribe(Subscription subscription) {
            subscription.request(5);
        }

        @Override
        protected void hookOnNext(String value) {
            received.add(Integer.parseInt(value.substring(0, value.indexOf(':'))));
        }

        @Override
        protected void hookOnComplete() {
            done = true;
        }

        void more(long n) {
            upstream().request(n);
        }
    }

    /** Waits until Myelin lists `count` handlers of a command or query (by name suffix). */
    static void awaitHandlers(String name, int count) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
        String body = "";
        while (System.nanoTime() < deadline) {
            body = node.get("/v1/handlers").body();
            int n = 0;
            for (String part : body.split("\\},\\{")) {
                if (part.contains("\"name\":\"" + name + "\"") || part.contains("Messages$" + name + "\"")) {
                    n++;
                }
            }
            if (n == count) {
                return;
            }
            Thread.sleep(50);
        }
        throw new AssertionError("expected " + count + " handlers of " + name + ": " + body);
    }
}
