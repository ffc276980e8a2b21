//! Crash points for tests: with the `failpoints` feature (never in release builds), the process
//! aborts at a named persistence step, so tests can check recovery at exactly that step.
//!
//! Armed by a file: `$MYELIN_CRASH_FILE` holds `<point> <n>`; the n-th time the point is reached
//! the file is removed and the process aborts. Removing the file first makes it one-shot: the
//! eventstore the supervisor restarts runs normally and recovers. (The `fail` crate's
//! configuration lives in the environment, which a restarted child inherits, so it would crash
//! again on every restart.) Without the feature `point` is an empty inline function.

/// Reached at a persistence step named `name`.
#[inline(always)]
pub fn point(name: &'static str) {
    #[cfg(feature = "failpoints")]
    armed::reach(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    static HITS: AtomicU64 = AtomicU64::new(0);
    static ARMED: Mutex<Option<Option<(String, u64)>>> = Mutex::new(None);

    pub fn reach(name: &'static str) {
        let mut armed = ARMED.lock().expect("crash point lock");
        let target = armed.get_or_insert_with(|| {
            let path = std::env::var("MYELIN_CRASH_FILE").ok()?;
            let text = std::fs::read_to_string(path).ok()?;
            let (point, n) = text.trim().split_once(' ')?;
            Some((point.to_owned(), n.parse().ok()?))
        });
        let Some((point, n)) = target else { return };
        if point != name {
            return;
        }
        if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            if let Ok(path) = std::env::var("MYELIN_CRASH_FILE") {
                let _ = std::fs::remove_file(path);
            }
            eprintln!("crash point {name} reached: aborting");
            std::process::abort();
        }
    }
}
