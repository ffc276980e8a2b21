package io.myelin.axonfw;

import io.myelin.axonfw.Messages.CountTo;
import io.myelin.axonfw.Messages.Ping;
import io.myelin.axonfw.Messages.WhoIsThere;
import java.util.concurrent.atomic.AtomicInteger;
import org.axonframework.commandhandling.CommandHandler;
import org.axonframework.queryhandling.QueryHandler;
import reactor.core.publisher.Flux;

/** Handlers that answer with the instance's name, and a streaming query that counts what it produced. */
public class Instance {
    private final String name;
    /** How many elements the CountTo stream produced (its subscriber asked for them). */
    public final AtomicInteger produced = new AtomicInteger();

    public Instance(String name) {
        this.name = name;
    }

    @CommandHandler
    String ping(Ping command) {
        return name;
    }

    @QueryHandler
    String whoIsThere(WhoIsThere query) {
        return name;
    }

    @QueryHandler
    Flux<String> countTo(CountTo query) {
        return Flux.range(1, query.count())
                .map(i -> i + ":" + "x".repeat(Math.max(0, query.size() - 8)))
                .doOnNext(i -> produced.incrementAndGet());
    }
}
