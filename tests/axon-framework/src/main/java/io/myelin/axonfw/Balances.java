package io.myelin.axonfw;

import io.myelin.axonfw.Messages.AccountOpened;
import io.myelin.axonfw.Messages.Deposited;
import io.myelin.axonfw.Messages.FindBalance;
import io.myelin.axonfw.Messages.WatchBalance;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import org.axonframework.config.ProcessingGroup;
import org.axonframework.eventhandling.EventHandler;
import org.axonframework.queryhandling.QueryHandler;
import org.axonframework.queryhandling.QueryUpdateEmitter;

/** A read model of account balances: answers queries and pushes updates to subscribers. */
@ProcessingGroup(Balances.PROCESSOR)
public class Balances {
    public static final String PROCESSOR = "balances";

    private final Map<String, Long> balances = new ConcurrentHashMap<>();
    private final QueryUpdateEmitter emitter;

    public Balances(QueryUpdateEmitter emitter) {
        this.emitter = emitter;
    }

    @EventHandler
    void on(AccountOpened event) {
        balances.put(event.accountId(), 0L);
        emitter.emit(WatchBalance.class, q -> q.accountId().equals(event.accountId()), 0L);
    }

    @EventHandler
    void on(Deposited event) {
        balances.put(event.accountId(), event.balance());
        emitter.emit(WatchBalance.class, q -> q.accountId().equals(event.accountId()), event.balance());
    }

    @QueryHandler
    Long find(FindBalance query) {
        return balances.getOrDefault(query.accountId(), -1L);
    }

    @QueryHandler
    Long watch(WatchBalance query) {
        return balances.getOrDefault(query.accountId(), -1L);
    }
}
