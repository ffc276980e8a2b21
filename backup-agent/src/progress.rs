//! Progress on a terminal, silence under cron: lines go to stderr only when it is a terminal
//! (and `--quiet` was not given). Errors are reported by `main` either way.

use std::io::{IsTerminal, Write};

pub struct Progress {
    enabled: bool,
    /// A status line is on screen and must be cleared before the next line.
    pending: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            pending: false,
        }
    }

    /// A step worth a line of its own.
    pub fn step(&mut self, text: &str) {
        if self.enabled {
            self.clear();
            eprintln!("{text}");
        }
    }

    /// The current file, overwriting the previous one on the same line.
    pub fn file(&mut self, done: usize, total: usize, name: &str, bytes: u64) {
        if self.enabled {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K  [{done}/{total}] {name} ({})", human(bytes));
            let _ = err.flush();
            self.pending = true;
        }
    }

    fn clear(&mut self) {
        if self.pending {
            eprint!("\r\x1b[K");
            self.pending = false;
        }
    }

    pub fn finish(&mut self) {
        self.clear();
    }
}

/// Bytes for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(12), "12 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(3 << 30), "3.0 GiB");
    }
}
