package io.myelin.axonfw;

import static org.axonframework.modelling.command.AggregateLifecycle.apply;

import com.fasterxml.jackson.annotation.JsonIgnore;
import io.myelin.axonfw.Messages.AccountOpened;
import io.myelin.axonfw.Messages.AccountView;
import io.myelin.axonfw.Messages.Deposit;
import io.myelin.axonfw.Messages.Deposited;
import io.myelin.axonfw.Messages.InspectAccount;
import io.myelin.axonfw.Messages.OpenAccount;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.TimeUnit;
import org.axonframework.commandhandling.CommandHandler;
import org.axonframework.eventsourcing.EventSourcingHandler;
import org.axonframework.modelling.command.AggregateIdentifier;
import org.axonframework.modelling.command.AggregateLifecycle;

/** An event-sourced bank account. Snapshots of it are its fields as JSON. */
public class Account {
    /** Test hook: commands with {@code holdAtBarrier} wait here after their aggregate was loaded. */
    public static volatile CyclicBarrier barrier;

    @AggregateIdentifier
    private String accountId;
    private String owner;
    private long balance;

    /** Events applied to this instance since it was created or restored from a snapshot. */
    @JsonIgnore
    private transient int eventsReplayed;

    protected Account() {}

    @CommandHandler
    public Account(OpenAccount command) {
        apply(new AccountOpened(command.accountId(), command.owner()));
    }

    @CommandHandler
    public long handle(Deposit command) throws Exception {
        if (command.amount() <= 0) {
            throw new IllegalArgumentException("a deposit must be positive");
        }
        if (command.holdAtBarrier()) {
            barrier.await(30, TimeUnit.SECONDS);
        }
        apply(new Deposited(accountId, command.amount(), balance + command.amount()));
        return balance;
    }

    @CommandHandler
    public AccountView handle(InspectAccount command) {
        return new AccountView(accountId, balance, eventsReplayed, AggregateLifecycle.getVersion());
    }

    @EventSourcingHandler
    void on(AccountOpened event) {
        accountId = event.accountId();
        owner = event.owner();
        eventsReplayed++;
    }

    @EventSourcingHandler
    void on(Deposited event) {
        balance = event.balance();
        eventsReplayed++;
    }
}
