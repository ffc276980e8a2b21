package io.myelin.axonfw;

import org.axonframework.config.ProcessingGroup;
import org.axonframework.eventhandling.EventHandler;
import org.axonframework.eventhandling.EventMessage;
import org.axonframework.eventhandling.ReplayStatus;

/** Two ledgers that record every event: one in a tracking, one in a pooled streaming processor. */
public final class Ledgers {
    private Ledgers() {}

    public static final String TRACKING = "ledger-tracking";
    public static final String POOLED = "ledger-pooled";

    abstract static class Ledger {
        private final Recorder recorder;
        private final String processor;

        Ledger(Recorder recorder, String processor) {
            this.recorder = recorder;
            this.processor = processor;
        }

        @EventHandler
        void on(Object payload, EventMessage<?> event, ReplayStatus status) {
            recorder.record(processor, event.getIdentifier(), status.isReplay());
        }
    }

    @ProcessingGroup(TRACKING)
    public static final class TrackingLedger extends Ledger {
        public TrackingLedger(Recorder recorder) {
            super(recorder, TRACKING);
        }
    }

    @ProcessingGroup(POOLED)
    public static final class PooledLedger extends Ledger {
        public PooledLedger(Recorder recorder) {
            super(recorder, POOLED);
        }
    }
}
