#!/usr/bin/env bash
# Renders a docs/benchmarks/*.jsonl file written by bench/compare.sh as Markdown: the machine and
# the peers, a summary (events/s per system and Myelin's ratio to the best peer of the same run)
# and the detail table (ops/s, events/s, p50/p99, CPU of server and load generator).
set -euo pipefail
FILE="${1:?usage: bench/compare-table.sh docs/benchmarks/<run>.jsonl}"
jq -rs '
  def f(x): if x == null then "–" else (x|tostring) end;
  def num(x): if x == null then "–" else (x | tostring | if test("^[0-9]{4,}(\\.0)?$")
      then (sub("\\.0$"; "") | [scan("[0-9]")] | reverse | [range(0; length; 3) as $i | .[$i:$i+3] | reverse | join("")] | reverse | join(","))
      else . end) end;
  def r2(x): if x == null then null else ((x * 100 | round) / 100) end;
  (map(select(.workload == "machine"))[0]) as $m
  | (map(select(.workload == "end"))[0] // {}) as $e
  | (map(select(.workload == "fsync"))) as $fs
  | (map(select(.workload == "peer"))) as $peers
  | (map(select(.label != null and .workload != "fill" and .workload != "failed" and .system != null))) as $rows
  | ($m.systems | split(" ")) as $systems
  | ($rows | map(.label) | reduce .[] as $l ([]; if index([$l]) then . else . + [$l] end)) as $lbs
  | def cell($lb; $sys): ($rows | map(select(.label == $lb and .system == $sys))[0]);
    def rate: if .workload == "aggregate-read" then .ops_per_s else .events_per_s end;
    def ratio($lb):
      (cell($lb; "myelin")) as $me
      | ([$rows[] | select(.label == $lb and .system != "myelin") | {system, v: rate}] | max_by(.v)) as $best
      | if $me == null or $best == null or ($best.v // 0) == 0 then "–"
        else "\((($me | rate) / $best.v * 100 | round) / 100)× (\($best.system))" end;
    def what: if .workload == "append" then "append, 1 event/call"
      elif .workload == "append-batch" then "append, \(.events_per_op) events/call"
      elif .workload == "replay" then "replay from the first event"
      elif .workload == "aggregate-read" then "aggregate read (\(.aggregate_size) events)"
      else .workload end;
    def clients: if .in_flight_per_client != null and .in_flight_per_client > 1
      then "\(.clients) × \(.in_flight_per_client) in flight" else "\(.clients)" end;
  "# Myelin side by side with its durable peers: \($m.date), \($m.machine)",
  "",
  "Machine: \($m.nproc) CPUs (\($m.cpu)), \($m.mem_mb) MB RAM, kernel \($m.kernel); temp dirs on \($m.fs) (\($m.device); \($m.disk)).",
  "fsync probe (4 KiB write + fdatasync, one thread): \([$fs[] | "\(.label): \(.syncs_per_s)/s, p50 \(.p50_ms) ms"] | join("; ")).",
  "Load average (1/5/15 min) at start \($m.loadavg_start), at end \($e.loadavg_end // "?"); commit \($m.commit)\(if $m.uncommitted_changes == "yes" then " with uncommitted changes in the tree" else "" end).",
  "Load generator: `myelin-bench` with \(([$rows[] | .bench_threads // empty] | unique | map(tostring) | join(", ")) // "?") runtime thread(s), the same for every system.",
  "Each run: \($m.warmup_s) s warm-up, \($m.duration_s) s measured; 200-byte payloads; appends go to a new aggregate each, 10% to 16 hot aggregates with the sequence check; replay and aggregate reads over \(num($m.fill_events)) events in aggregates of 50.",
  "",
  "Systems: \([$peers[] | "\(.system) = \(.version)"] | join("; ")).",
  "",
  "## Summary: events/s (aggregate read: reads/s), p99 ms in parentheses",
  "",
  "| workload | clients | " + ($systems | join(" | ")) + " | Myelin ÷ best peer |",
  "|---|---|" + ($systems | map("---:") | join("|")) + "|---|",
  ( $lbs[] as $l
    | ($rows | map(select(.label == $l))[0]) as $any
    | "| \($any | what) | \($any | clients) | "
      + ([$systems[] as $s | cell($l; $s) | if . == null then "–" else "\(num(rate)) (\(f(.p99_ms)))" end] | join(" | "))
      + " | \(ratio($l)) |" ),
  "",
  "## Detail",
  "",
  "CPU is over the measured window: the server (its whole process tree), the load generator, and everything else the machine ran (\"other\": disturbance by other work, kernel threads). µs per event (aggregate read: per read).",
  "",
  "| workload | clients | system | ops/s | events/s | p50 / p99 / max ms | server CPU s (µs/ev) | bench CPU s (µs/ev) | other CPU s | errors | load avg |",
  "|---|---|---|---:|---:|---|---|---|---:|---:|---|",
  ( $lbs[] as $l | $systems[] as $s | cell($l; $s) | select(. != null)
    | "| \(what) | \(clients) | \(.system) | \(num(.ops_per_s)) | \(num(.events_per_s)) | "
      + (if .workload == "replay" then "first event after \(f(.first_event_ms)) ms" else "\(f(.p50_ms)) / \(f(.p99_ms)) / \(f(.max_ms))" end)
      + " | \(f(.server_cpu_s)) (\(f(.server_cpu_us_per_event // .server_cpu_us_per_op))) | \(f(.bench_cpu_s)) (\(f(.bench_cpu_us_per_event // .bench_cpu_us_per_op))) | \(f(.other_cpu_s)) | \(f(.errors)) | \(f(.loadavg)) |" ),
  "",
  "Preparation (not compared): " + ([.[] | select(.workload == "fill") | "\(.system) fill \(num(.events_per_s)) events/s"] | join("; ")) + ".",
  "Data on disk after the runs of each system: " + ([.[] | select(.workload == "disk") | "\(.system) \(.data_mb) MB"] | join("; ")) + ".",
  ( [.[] | select(.workload == "failed")] | if length > 0 then "\nFailed steps: " + (map("\(.system) \(.label)") | join(", ")) + "." else empty end )
' "$FILE"
