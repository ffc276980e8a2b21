//! CPU time (user + system) of a process tree and of this process, read from `/proc` (Linux).
//!
//! A server is measured as the sum over its whole process tree (Myelin's supervisor and its
//! children, PostgreSQL's postmaster and its backends): on a small machine every process of the
//! server competes with the load generator for the same cores, so all of it counts. Times of
//! children that already exited and were reaped are included through their parent's
//! `cutime`/`cstime`. The clock tick is taken as 100 Hz (Linux's USER_HZ), so figures have a
//! resolution of 10 ms per process.

use std::collections::HashMap;

/// Clock ticks per second of the times in `/proc/<pid>/stat`.
const TICKS_PER_S: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(line: &str) -> Option<Stat> {
    let after = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..=14 {
        let v: i64 = fields.get(i)?.parse().ok()?;
        ticks += v.max(0) as u64;
    }
    Some(Stat { ppid, ticks })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Sum of the ticks of `root` and all its descendants in `table` (pid → stat).
fn tree_ticks_in(table: &HashMap<u32, Stat>, root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, stat) in table {
        children.entry(stat.ppid).or_default().push(pid);
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Some(stat) = table.get(&pid) {
            total += stat.ticks;
        }
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().copied().filter(|&k| k != pid));
        }
    }
    total
}

/// CPU seconds used so far by `root` and its descendants (0 when it does not exist).
pub fn tree_seconds(root: u32) -> f64 {
    let mut table = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(stat) = read_stat(pid)
            {
                table.insert(pid, stat);
            }
        }
    }
    tree_ticks_in(&table, root) as f64 / TICKS_PER_S
}

/// CPU seconds this process used so far (all threads).
pub fn own_seconds() -> f64 {
    read_stat(std::process::id()).map_or(0.0, |s| s.ticks as f64 / TICKS_PER_S)
}

/// Busy CPU seconds of the whole machine (all CPUs: user, nice, system, irq, softirq; not
/// idle, iowait or steal), from the first line of `/proc/stat`.
fn parse_machine_busy(proc_stat: &str) -> Option<f64> {
    let line = proc_stat.lines().next()?;
    let mut fields = line.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let v: Vec<u64> = fields.take(7).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq
    Some((v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?) as f64 / TICKS_PER_S)
}

pub fn machine_busy_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_machine_busy(&s))
        .unwrap_or(0.0)
}

/// CPU used over a window.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The server's process trees (None when no pid was given).
    pub server: Option<f64>,
    /// This process (the load generator).
    pub client: f64,
    /// Everything else the machine ran (other processes, kernel work not charged to a process).
    pub other: f64,
    pub wall: f64,
}

/// A point in time: CPU used by the server trees (if pids were given), by this process and by
/// the whole machine.
#[derive(Debug, Clone)]
pub struct Snapshot {
    server: Option<f64>,
    client: f64,
    machine: f64,
    at: std::time::Instant,
}

impl Snapshot {
    pub fn take(server_pids: &[u32]) -> Snapshot {
        Snapshot {
            server: (!server_pids.is_empty()).then(|| server_pids.iter().map(|&p| tree_seconds(p)).sum()),
            client: own_seconds(),
            machine: machine_busy_seconds(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used between `self` and a later snapshot.
    pub fn until(&self, later: &Snapshot) -> Usage {
        let server = self.server.zip(later.server).map(|(a, b)| b - a);
        let client = later.client - self.client;
        Usage {
            server,
            client,
            other: (later.machine - self.machine) - client - server.unwrap_or(0.0),
            wall: (later.at - self.at).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let line = "1234 (my (odd) name) S 77 1234 1234 0 -1 4194560 100 0 0 0 150 25 3 2 20 0 4 0 100 0";
        assert_eq!(parse_stat(line), Some(Stat { ppid: 77, ticks: 180 }));
    }

    #[test]
    fn sums_a_tree_and_nothing_outside_it() {
        let table = HashMap::from([
            (1, Stat { ppid: 0, ticks: 1000 }),
            (10, Stat { ppid: 1, ticks: 5 }),
            (11, Stat { ppid: 10, ticks: 7 }),
            (12, Stat { ppid: 11, ticks: 11 }),
            (20, Stat { ppid: 1, ticks: 100 }),
        ]);
        assert_eq!(tree_ticks_in(&table, 10), 23);
        assert_eq!(tree_ticks_in(&table, 12), 11);
        assert_eq!(tree_ticks_in(&table, 99), 0);
    }

    #[test]
    fn machine_busy_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 5 50 9000 700 3 2 400 0 0\ncpu0 50 2 25 4500 350 1 1 200 0 0\n";
        assert_eq!(parse_machine_busy(stat), Some(1.6));
        assert_eq!(parse_machine_busy("intr 1 2 3"), None);
    }

    #[test]
    fn own_cpu_is_readable() {
        // Burn a little CPU so the counter cannot legitimately be missing.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(own_seconds() >= 0.0);
        assert!(read_stat(std::process::id()).is_some());
    }
}
