package io.myelin.axonfw;

import com.fasterxml.jackson.annotation.JsonAutoDetect;
import com.fasterxml.jackson.annotation.PropertyAccessor;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.util.concurrent.TimeUnit;
import org.axonframework.axonserver.connector.AxonServerConfiguration;
import org.axonframework.axonserver.connector.AxonServerConnectionManager;
import org.axonframework.axonserver.connector.event.axon.AxonServerEventScheduler;
import org.axonframework.axonserver.connector.command.AxonServerCommandBus;
import org.axonframework.commandhandling.CommandBus;
import org.axonframework.commandhandling.gateway.CommandGateway;
import org.axonframework.config.AggregateConfigurer;
import org.axonframework.config.Configuration;
import org.axonframework.config.Configurer;
import org.axonframework.config.DefaultConfigurer;
import org.axonframework.config.EventProcessingConfigurer;
import org.axonframework.eventhandling.EventProcessor;
import org.axonframework.eventhandling.TrackingEventProcessorConfiguration;
import org.axonframework.eventhandling.scheduling.EventScheduler;
import org.axonframework.eventhandling.tokenstore.TokenStore;
import org.axonframework.eventsourcing.EventCountSnapshotTriggerDefinition;
import org.axonframework.eventsourcing.eventstore.EventStore;
import org.axonframework.queryhandling.QueryGateway;
import org.axonframework.serialization.json.JacksonSerializer;

/**
 * One instance of the application: an Axon Framework {@link Configuration} built with the plain
 * {@link Configurer} API and connected to Axon Server (here: Myelin) through Axon's own
 * connector, which the configurer finds on the class path.
 */
public final class App implements AutoCloseable {
    public static final String COMPONENT = "myelin-bank";

    /** What an instance runs. */
    public record Options(
            String servers,
            String name,
            boolean accounts,
            int snapshotEvery,
            boolean pinger,
            boolean balances,
            Recorder ledgers,
            TokenStore tokenStore,
            boolean heartbeats,
            String component) {
        public static Options of(String servers, String name) {
            return new Options(servers, name, true, 0, true, false, null, null, false, COMPONENT);
        }

        /** An instance that handles nothing: it only sends. */
        public static Options client(String servers, String name) {
            return new Options(servers, name, false, 0, false, false, null, null, false, COMPONENT);
        }

        public Options component(String c) {
            return new Options(servers, name, accounts, snapshotEvery, pinger, balances, ledgers, tokenStore, heartbeats, c);
        }

        public Options snapshotEvery(int n) {
            return new Options(servers, name, accounts, n, pinger, balances, ledgers, tokenStore, heartbeats, component);
        }

        public Options withBalances() {
            return new Options(servers, name, accounts, snapshotEvery, pinger, true, ledgers, tokenStore, heartbeats, component);
        }

        public Options withLedgers(Recorder recorder, TokenStore store) {
            return new Options(servers, name, accounts, snapshotEvery, pinger, balances, recorder, store, heartbeats, component);
        }

        public Options withHeartbeats() {
            return new Options(servers, name, accounts, snapshotEvery, pinger, balances, ledgers, tokenStore, true, component);
        }
    }

    public final Options options;
    public final Instance instance;
    private final Configuration configuration;

    private App(Options options) {
        this.options = options;
        this.instance = new Instance(options.name());
        Configurer configurer = DefaultConfigurer.defaultConfiguration();
        configurer.registerComponent(AxonServerConfiguration.class, c -> server(options));
        JacksonSerializer serializer = JacksonSerializer.builder().objectMapper(objectMapper()).build();
        configurer.configureSerializer(c -> serializer);
        configurer.configureMessageSerializer(c -> serializer);
        configurer.configureEventSerializer(c -> serializer);

        // Axon's connector leaves the scheduler to the application: the Axon Server one here.
        configurer.registerComponent(EventScheduler.class, c -> AxonServerEventScheduler.builder()
                .connectionManager(c.getComponent(AxonServerConnectionManager.class))
                .eventSerializer(c.eventSerializer())
                .build());

        if (options.accounts()) {
            AggregateConfigurer<Account> accounts = AggregateConfigurer.defaultConfiguration(Account.class);
            if (options.snapshotEvery() > 0) {
                accounts.configureSnapshotTrigger(
                        c -> new EventCountSnapshotTriggerDefinition(c.snapshotter(), options.snapshotEvery()));
            }
            configurer.configureAggregate(accounts);
        }
        if (options.pinger()) {
            configurer.registerCommandHandler(c -> instance);
            configurer.registerQueryHandler(c -> instance);
        }
        EventProcessingConfigurer processing = configurer.eventProcessing();
        if (options.balances()) {
            processing.registerTrackingEventProcessor(Balances.PROCESSOR);
            // One object as event handler and query handler.
            configurer.registerMessageHandler(c -> new Balances(c.queryUpdateEmitter()));
        }
        if (options.ledgers() != null) {
            processing.registerTokenStore(c -> options.tokenStore());
            processing.registerTrackingEventProcessor(
                    Ledgers.TRACKING,
                    Configuration::eventStore,
                    // Three threads for two segments: a third segment after a split finds one.
                    c -> TrackingEventProcessorConfiguration.forParallelProcessing(3)
                            .andInitialSegmentsCount(2)
                            .andTokenClaimInterval(200, TimeUnit.MILLISECONDS)
                            .andEventAvailabilityTimeout(200, TimeUnit.MILLISECONDS));
            processing.registerPooledStreamingEventProcessor(
                    Ledgers.POOLED,
                    Configuration::eventStore,
                    // A work package stores the token of events it does not handle only when it
                    // extends its claim (5 s by default); a merge of two segments then starts from
                    // the lower of their stored tokens and redelivers what the other half handled
                    // (Axon Framework's documented merge behaviour). Extending often keeps the
                    // stored tokens close to the handled ones.
                    (c, builder) -> builder.initialSegmentCount(2)
                            .tokenClaimInterval(200)
                            .claimExtensionThreshold(200));
            processing.registerEventHandler(c -> new Ledgers.TrackingLedger(options.ledgers()));
            processing.registerEventHandler(c -> new Ledgers.PooledLedger(options.ledgers()));
        }
        configuration = configurer.buildConfiguration();
    }

    private static AxonServerConfiguration server(Options options) {
        AxonServerConfiguration server = AxonServerConfiguration.builder()
                .servers(options.servers())
                .componentName(options.component())
                .clientId(options.name())
                .suppressDownloadMessage()
                .build();
        server.setReconnectInterval(200);
        AxonServerConfiguration.HeartbeatConfiguration heartbeat = new AxonServerConfiguration.HeartbeatConfiguration();
        heartbeat.setEnabled(options.heartbeats());
        heartbeat.setInterval(500);
        heartbeat.setTimeout(2500);
        server.setHeartbeat(heartbeat);
        return server;
    }

    static ObjectMapper objectMapper() {
        ObjectMapper mapper = new ObjectMapper();
        // Aggregates are snapshotted by their fields, without getters.
        mapper.setVisibility(PropertyAccessor.ALL, JsonAutoDetect.Visibility.NONE);
        mapper.setVisibility(PropertyAccessor.FIELD, JsonAutoDetect.Visibility.ANY);
        mapper.configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);
        return mapper;
    }

    /** Builds and starts an instance: it connects and subscribes its handlers. */
    public static App start(Options options) {
        App app = new App(options);
        // Created before the start, so that its start handler runs with the others.
        app.eventScheduler();
        app.configuration.start();
        return app;
    }

    public Configuration configuration() {
        return configuration;
    }

    public CommandGateway commands() {
        return configuration.commandGateway();
    }

    public QueryGateway queries() {
        return configuration.queryGateway();
    }

    public EventScheduler eventScheduler() {
        return configuration.getComponent(EventScheduler.class);
    }

    public EventStore eventStore() {
        return configuration.eventStore();
    }

    /** The instance's own handlers, bypassing Axon Server's routing. */
    public CommandBus localCommandBus() {
        return ((AxonServerCommandBus) configuration.commandBus()).localSegment();
    }

    public <T extends EventProcessor> T processor(String name, Class<T> type) {
        return configuration.eventProcessingConfiguration().eventProcessor(name, type).orElseThrow();
    }

    @Override
    public void close() {
        configuration.shutdown();
    }
}
