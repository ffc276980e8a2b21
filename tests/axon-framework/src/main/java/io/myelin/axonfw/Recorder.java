package io.myelin.axonfw;

import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * What the event handlers saw, per processor: how often each event (by message id) was handled,
 * and how many of those were replays. Outlives application instances, as a database would.
 */
public final class Recorder {
    private final Map<String, Map<String, AtomicInteger>> handled = new ConcurrentHashMap<>();
    private final Map<String, AtomicInteger> replayed = new ConcurrentHashMap<>();

    public void record(String processor, String eventId, boolean replay) {
        handled.computeIfAbsent(processor, p -> new ConcurrentHashMap<>())
                .computeIfAbsent(eventId, e -> new AtomicInteger())
                .incrementAndGet();
        if (replay) {
            replayed.computeIfAbsent(processor, p -> new AtomicInteger()).incrementAndGet();
        }
    }

    /** Event id -> times handled (replays included). */
    public Map<String, Integer> counts(String processor) {
        Map<String, Integer> out = new ConcurrentHashMap<>();
        handled.getOrDefault(processor, Map.of()).forEach((id, n) -> out.put(id, n.get()));
        return out;
    }

    public Set<String> seen(String processor) {
        return counts(processor).keySet();
    }

    public int replays(String processor) {
        AtomicInteger n = replayed.get(processor);
        return n == null ? 0 : n.get();
    }

    public void clear() {
        handled.clear();
        replayed.clear();
    }
}
