#!/usr/bin/env bash
# Renders a docs/benchmarks/*.jsonl file written by bench/compare.sh as Markdown: the machine and
# the peers, a summary (events/s per system and Myelin's ratio to the best peer of the same run:
# single node against single-node peers, Myelin × 3 against the three-node peers and against
# Myelin's single node), the three-node targets when Myelin × 3 ran, and the detail
# table (ops/s, events/s, p50/p99, CPU of server and load generator).
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
  | (map(select(.label != null and .workload != "fill" and .workload != "failed" and .system != null
      and .workload != "command-dispatch" and .workload != "query-dispatch"))) as $rows
  | ($m.systems | split(" ")) as $systems
  | ($rows | map(.label) | reduce .[] as $l ([]; if index([$l]) then . else . + [$l] end)) as $lbs
  | def cell($lb; $sys): ($rows | map(select(.label == $lb and .system == $sys))[0]);
    def rate: if .workload == "aggregate-read" then .ops_per_s else .events_per_s end;
    def nodes($s): ([$peers[] | select(.system == $s) | .nodes // 1] | first) // 1;
    def has($s): $systems | index([$s]) != null;
    ($systems | map(select(. != "myelin" and nodes(.) == 1))) as $single_peers
    | ($systems | map(select((startswith("myelin") | not) and nodes(.) > 1))) as $cluster_peers
    | def ratio_to($lb; $me; $among):
      (cell($lb; $me)) as $m
      | ([$rows[] | select(.label == $lb) | select(.system as $s | $among | index([$s]) != null) | {system, v: rate}]
         | max_by(.v)) as $best
      | if $m == null or $best == null or ($best.v // 0) == 0 then "–"
        else "\((($m | rate) / $best.v * 100 | round) / 100)×" + (if ($among | length) > 1 then " (\($best.system))" else "" end) end;
    # The ratio columns this run has: [header, me, among].
    ([ (if has("myelin") and ($single_peers | length) > 0 then ["Myelin ÷ best peer", "myelin", $single_peers] else empty end),
       (if has("myelin-3") and ($cluster_peers | length) > 0 then ["Myelin × 3 ÷ best 3-node peer", "myelin-3", $cluster_peers] else empty end),
       (if has("myelin-3") and has("myelin") then ["Myelin × 3 ÷ Myelin", "myelin-3", ["myelin"]] else empty end) ]) as $ratios
    | def target_row($me; $other; $goal):
      ($rows | map(select(.workload == "append" and .clients == 64 and (.in_flight_per_client // 1) == 1))) as $a64
      | ($a64 | map(select(.system == $me))[0]) as $m | ($a64 | map(select(.system == $other))[0]) as $o
      | if $m == null or $o == null then empty
        else (($m.events_per_s / $o.events_per_s * 100 | round) / 100) as $r
        | "| \($me) ≥ \($goal)× \($other), 64 clients, one event per call | \(num($m.events_per_s)) vs \(num($o.events_per_s)) events/s | \($r)× | \(if $r >= $goal then "met" else "**missed**" end) |" end;
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
  ( if ($cluster_peers | length) > 0 or has("myelin-3") then
      "Three-node systems run on 127.0.0.1, .2 and .3; the connections of the clients (one per 8) are spread evenly over the nodes (rounded up to a multiple of 3, at most one per client); replay and single-client runs use the first node. Their CPU columns add up the three nodes."
      + (if has("myelin-3-leader") then " myelin-3-leader is Myelin × 3 with every connection on the node leading the context (a diagnostic of what forwarding costs)." else "" end)
    else empty end ),
  "",
  "## Summary: events/s (aggregate read: reads/s), p99 ms in parentheses",
  "",
  "| workload | clients | " + ($systems | join(" | ")) + ([$ratios[] | " | " + .[0]] | join("")) + " |",
  "|---|---|" + ($systems | map("---:") | join("|")) + ([$ratios[] | "|---"] | join("")) + "|",
  ( $lbs[] as $l
    | ($rows | map(select(.label == $l))[0]) as $any
    | "| \($any | what) | \($any | clients) | "
      + ([$systems[] as $s | cell($l; $s) | if . == null then "–" else "\(num(rate)) (\(f(.p99_ms)))" end] | join(" | "))
      + ([$ratios[] as $r | " | " + ratio_to($l; $r[1]; $r[2])] | join("")) + " |" ),
  "",
  ( [target_row("myelin-3"; "nats-r3"; 2), target_row("myelin-3"; "myelin"; 0.6)]
    | if length > 0 then
        ("## Three-node targets (issue 11)", "", "| target | measured | ratio | |", "|---|---|---|---|", .[], "")
      else empty end ),
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
# Command and query round trips (Myelin only; a second table when the run has them).
if jq -e -s 'any(.[]; .workload=="command-dispatch" or .workload=="query-dispatch")' "$FILE" >/dev/null; then
    echo
    echo "Round trips through a handler application (its own process), 64 in flight, 200 B payloads; on a cluster \"cross-node\" has the handler on n2 and the dispatcher on n1."
    echo
    jq -rs '
      "| system | step | round trips/s | latency p50 / p90 / p99 / max (ms) | errors |",
      "|---|---|---|---|---|",
      ( .[] | select(.workload=="command-dispatch" or .workload=="query-dispatch")
        | "| \(.system) | \(.label) | **\(.round_trips_per_s)** | \(.p50_ms) / \(.p90_ms) / \(.p99_ms) / \(.max_ms) | \(.errors) |" )
    ' "$FILE"
fi
