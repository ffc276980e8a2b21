package io.myelin.axonfw;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Comparator;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;

/**
 * A real Myelin node for a test: the built {@code myelin} binary ($MYELIN_BIN, else the
 * repository's target/release/myelin) in a temp dir, on free loopback ports. It can be stopped
 * and started again on the same ports and data.
 */
public final class MyelinNode implements AutoCloseable {
    private static final HttpClient HTTP = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(2)).build();

    public final Path dir;
    public final int grpcPort = freePort();
    public final int httpPort = freePort();
    public final int internalPort = freePort();
    private Process process;

    private MyelinNode() throws IOException {
        // Short path: the node's runtime directory holds Unix sockets (108-byte limit).
        dir = Files.createTempDirectory(Path.of("/tmp"), "myaf");
    }

    public static MyelinNode start() throws Exception {
        MyelinNode node = new MyelinNode();
        node.launch();
        return node;
    }

    static Path binary() {
        String configured = System.getenv("MYELIN_BIN");
        if (configured != null && !configured.isEmpty()) {
            return Path.of(configured);
        }
        // Maven runs the tests in tests/axon-framework.
        return Path.of(System.getProperty("user.dir")).resolve("../../target/release/myelin").normalize();
    }

    /** {@code host:port} for Axon's {@code servers} setting. */
    public String servers() {
        return "127.0.0.1:" + grpcPort;
    }

    public Path log() {
        return dir.resolve("node.log");
    }

    /** Starts the node's processes and waits until it serves clients. */
    public void launch() throws Exception {
        if (process != null) {
            throw new IllegalStateException("already running");
        }
        ProcessBuilder builder = new ProcessBuilder(
                        binary().toString(),
                        "--data-dir", dir.resolve("d").toString(),
                        "--bind-address", "127.0.0.1",
                        "--hostname", "127.0.0.1",
                        "--name", "myelin-axonfw",
                        "--port", Integer.toString(grpcPort),
                        "--http-port", Integer.toString(httpPort),
                        "--internal-port", Integer.toString(internalPort))
                .directory(dir.toFile())
                .redirectErrorStream(true)
                .redirectOutput(ProcessBuilder.Redirect.appendTo(log().toFile()));
        builder.environment().put("RUST_LOG", "info,openraft=warn");
        builder.environment().remove("RUNTIME_DIRECTORY");
        process = builder.start();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (true) {
            if (!process.isAlive()) {
                throw new IllegalStateException("myelin exited with " + process.exitValue() + "; log:\n" + logText());
            }
            if (serving()) {
                return;
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("myelin not ready in time; log:\n" + logText());
            }
            Thread.sleep(50);
        }
    }

    private boolean serving() {
        try {
            HttpResponse<String> health = get("/actuator/health");
            return health.statusCode() == 200
                    && health.body().startsWith("{\"status\":\"UP\"")
                    && health.body().contains("\"router\":{\"status\":\"UP\"}");
        } catch (IOException e) {
            return false;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        }
    }

    /** Stops the node with SIGTERM (the supervisor stops its children in order) and waits. */
    public void stop() throws InterruptedException {
        if (process == null) {
            return;
        }
        process.destroy();
        if (!process.waitFor(20, TimeUnit.SECONDS)) {
            process.destroyForcibly().waitFor();
        }
        process = null;
    }

    public String logText() {
        try {
            return Files.readString(log());
        } catch (IOException e) {
            return "(no log: " + e + ")";
        }
    }

    public HttpResponse<String> get(String path) throws IOException, InterruptedException {
        return HTTP.send(
                HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + httpPort + path))
                        .timeout(Duration.ofSeconds(10))
                        .GET()
                        .build(),
                HttpResponse.BodyHandlers.ofString());
    }

    public HttpResponse<String> patch(String path) throws IOException, InterruptedException {
        return HTTP.send(
                HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + httpPort + path))
                        .timeout(Duration.ofSeconds(30))
                        .method("PATCH", HttpRequest.BodyPublishers.noBody())
                        .build(),
                HttpResponse.BodyHandlers.ofString());
    }

    /**
     * Starts an application instance and waits until the node lists its command handlers: Axon
     * Framework subscribes them without waiting for the node's acknowledgement, so a command
     * sent at once could find no handler yet (with Axon Server as well).
     */
    public App startApp(App.Options options) throws Exception {
        App app = App.start(options);
        List<String> commands = new java.util.ArrayList<>();
        if (options.accounts()) {
            commands.add("io.myelin.axonfw.Messages$Deposit");
        }
        if (options.pinger()) {
            commands.add("io.myelin.axonfw.Messages$Ping");
        }
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
        String listing = "";
        while (System.nanoTime() < deadline) {
            listing = get("/v1/handlers").body();
            List<String> listed = new java.util.ArrayList<>();
            for (com.fasterxml.jackson.databind.JsonNode handler : new com.fasterxml.jackson.databind.ObjectMapper().readTree(listing)) {
                if (handler.path("clientId").asText().equals(options.name())) {
                    listed.add(handler.path("name").asText());
                }
            }
            if (listed.containsAll(commands)) {
                return app;
            }
            Thread.sleep(20);
        }
        app.close();
        throw new AssertionError(options.name() + ": handlers " + commands + " not listed: " + listing);
    }

    /** Whether the test expects the application to call what the node does not implement. */
    public boolean unimplementedCallsExpected;

    /** The node's log lines for calls it answered UNIMPLEMENTED (router/src/unimplemented.rs). */
    public List<String> unimplementedCalls() {
        return logText().lines().filter(l -> l.contains("does not implement")).toList();
    }

    /** Stops the node and removes its files; fails if the application called what it lacks. */
    @Override
    public void close() throws Exception {
        stop();
        List<String> unimplemented = unimplementedCalls();
        try (Stream<Path> files = Files.walk(dir)) {
            files.sorted(Comparator.reverseOrder()).forEach(p -> {
                try {
                    Files.deleteIfExists(p);
                } catch (IOException e) {
                    throw new UncheckedIOException(e);
                }
            });
        }
        if (!unimplementedCallsExpected && !unimplemented.isEmpty()) {
            throw new AssertionError("the application called what Myelin does not implement: " + unimplemented);
        }
    }

    private static int freePort() {
        try (ServerSocket socket = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())) {
            return socket.getLocalPort();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }
}
