#!/usr/bin/env bash
# Renders a bench/results/*.jsonl file (written by bench/run.sh) as a Markdown table.
set -euo pipefail
FILE="${1:?usage: bench/table.sh bench/results/<date>.jsonl}"
jq -rs '
  def f(x): if x == null then "–" else (x|tostring) end;
  def lat: "\(f(.p50_ms)) / \(f(.p99_ms)) / \(f(.max_ms))";
  (map(select(.workload=="machine"))[0]) as $m
  | (map(select(.workload=="end"))[0]) as $e
  | (map(select(.workload=="cpu") | {key:.label, value:.}) | from_entries) as $cpu
  | def cpucol: ($cpu[.label]) as $c | (.client_cpu_s) as $b
      | if $c == null then "–" else
          "\($c.eventstore_cpu_s) / \($c.router_cpu_s) / \($b // "?") / \((($c.machine_busy_cpu_s - $c.node_cpu_s - ($b // 0))*10|round)/10) (\($c.wall_s) s)"
        end;
  "Run \($m.date) on \($m.host): \($m.nproc) CPUs (\($m.cpu)), \($m.mem_mb) MB RAM, kernel \($m.kernel), data dir on \($m.fs) (\($m.device)), commit \($m.commit)\(if $m.uncommitted_changes=="yes" then "+changes" else "" end), load average at start \($m.loadavg_start), at end \($e.loadavg_end // "?").",
    "",
    "| step | workload | result | latency p50 / p99 / max (ms) | errors | CPU s: eventstore / router / bench / other (wall) |",
    "|---|---|---|---|---|---|",
    ( .[] |
      if .workload=="fsync" then
        "| \(.label) | write \(.block_bytes) B + fdatasync loop (no server) | \(.syncs_per_s) syncs/s | \(lat) | – | \(cpucol) |"
      elif .workload=="append" then
        "| \(.label) | append, \(.clients) client\(if .clients==1 then "" else "s" end) / \(.connections) conn, \(.events_per_append) event/append, \(.payload_bytes) B\(if .hot_aggregates>0 then ", \(.hot_share*100|round)% to \(.hot_aggregates) hot aggregates" else "" end), \(.duration_s) s | **\(.events_per_s) events/s** (\(.appends_per_s) appends/s) | \(lat) | \(.errors) | \(cpucol) |"
      elif .workload=="fill" then
        "| \(.label) | fill \(.events) events, \(.aggregates) aggregates × \(.aggregate_size), \(.batch_events) events/append, \(.clients) clients | \(.events_per_s) events/s (\(.seconds) s) | \(lat) (per batch) | \(.errors) | \(cpucol) |"
      elif .workload=="replay" then
        "| \(.label) | replay \(.events) events from token \(.from), \(.permits) permits | **\(.events_per_s) events/s** (\(.seconds) s, first event \(.first_event_ms) ms) | – | \(.errors) | \(cpucol) |"
      elif .workload=="aggregate-read" then
        "| \(.label) | read \(.expect)-event aggregates, concurrency \(.concurrency), \(.samples) samples | \(.reads_per_s) reads/s | \(lat) | \(.errors) | \(cpucol) |"
      elif .workload=="memory" then
        "| memory \(.label) | RSS of node (\(.processes) processes) | \(.node_rss_mb) MB total; eventstore \(.eventstore_rss_mb) MB (peak \(.eventstore_peak_rss_mb) MB), router \(.router_rss_mb) MB | – | – | – |"
      elif .workload=="disk" then
        "| disk \(.label) | data dir size | \(.data_dir_mb) MB | – | – | – |"
      else empty end )
' "$FILE"
# Command and query round trips (a second table, only when the run has them).
if jq -e -s 'any(.[]; .workload=="command-dispatch" or .workload=="query-dispatch")' "$FILE" >/dev/null; then
    echo
    jq -rs '
      def r(x): (x*10|round)/10;
      (map(select(.workload=="cpu") | {key:.label, value:.}) | from_entries) as $cpu
      | "| step | workload | result | latency p50 / p90 / p99 / max (ms) | errors | CPU s: router / handler / dispatcher / eventstore / other (wall) | CPU µs per round trip: router / handler / dispatcher |",
        "|---|---|---|---|---|---|---|",
        ( .[] | select(.workload=="command-dispatch" or .workload=="query-dispatch")
          | ($cpu[.label]) as $c
          | (.round_trips_per_s * (.duration_s + .warmup_s)) as $n
          | "| \(.label) | \(if .workload=="command-dispatch" then "command Dispatch" else "point-to-point query" end), \(.in_flight) in flight / \(.connections) conn, \(.payload_bytes) B, handler in its own process, \(.duration_s) s | **\(.round_trips_per_s) round trips/s** | \(.p50_ms) / \(.p90_ms) / \(.p99_ms) / \(.max_ms) | \(.errors) | "
            + (if $c == null then "– | –" else
                "\($c.router_cpu_s) / \($c.handler_cpu_s // "?") / \(.client_cpu_s) / \($c.eventstore_cpu_s) / \(r($c.machine_busy_cpu_s - $c.node_cpu_s - .client_cpu_s - ($c.handler_cpu_s // 0))) (\($c.wall_s) s) | "
                + (if $n > 0 then "\($c.router_cpu_s*1e6/$n|round) / \(($c.handler_cpu_s // 0)*1e6/$n|round) / \(.client_cpu_s*1e6/$n|round)" else "–" end)
              end) + " |" )
    ' "$FILE"
fi
