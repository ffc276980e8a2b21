package io.myelin.axonfw;

import org.axonframework.commandhandling.RoutingKey;
import org.axonframework.modelling.command.TargetAggregateIdentifier;

/** The application's commands, events and queries (serialized as JSON). */
public final class Messages {
    private Messages() {}

    // Commands of the Account aggregate.
    public record OpenAccount(@TargetAggregateIdentifier String accountId, String owner) {}

    /** {@code holdAtBarrier}: the handler waits at {@link Account#barrier} after loading (a test hook). */
    public record Deposit(@TargetAggregateIdentifier String accountId, long amount, boolean holdAtBarrier) {}

    /** Answers how many events the load read (after the snapshot, if any) and the balance. */
    public record InspectAccount(@TargetAggregateIdentifier String accountId) {}

    public record AccountView(String accountId, long balance, int eventsReplayed, long version) {}

    // Events.
    public record AccountOpened(String accountId, String owner) {}

    public record Deposited(String accountId, long amount, long balance) {}

    // A command handled by a plain component: answers the instance that handled it.
    public record Ping(@RoutingKey String key) {}

    // A command no one handles.
    public record Unhandled(@RoutingKey String key) {}

    // Queries.
    public record FindBalance(String accountId) {}

    public record WatchBalance(String accountId) {}

    public record WhoIsThere() {}

    /** A streaming query: the numbers 1 to count, each padded to `size` characters. */
    public record CountTo(int count, int size) {}
}
