//! When to restart a child that exited, and when to stop trying.
//!
//! Exponential backoff: the first restart waits `initial`, each further one twice as long, up to
//! `max`; a child that stayed up for `reset_after` starts again from `initial`. A child that
//! exits more than `max_failures` times within `window` is given up on: the supervisor then stops
//! the node and exits non-zero, so that systemd's restart policy (with its own limits) decides.
//! Pure bookkeeping over instants, so it is tested without processes or clocks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct RestartPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    pub max_failures: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(30),
            max_failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    /// `failures` exits within the policy's window.
    GiveUp {
        failures: usize,
    },
}

/// One child's restart history.
#[derive(Debug)]
pub struct Backoff {
    policy: RestartPolicy,
    next_delay: Duration,
    failures: VecDeque<Instant>,
}

impl Backoff {
    pub fn new(policy: RestartPolicy) -> Self {
        Backoff {
            policy,
            next_delay: policy.initial,
            failures: VecDeque::new(),
        }
    }

    /// Records that the child exited at `now` after running for `uptime`.
    pub fn exited(&mut self, now: Instant, uptime: Duration) -> Decision {
        if uptime >= self.policy.reset_after {
            self.next_delay = self.policy.initial;
        }
        self.failures.push_back(now);
        while let Some(first) = self.failures.front() {
            if now.duration_since(*first) > self.policy.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() > self.policy.max_failures {
            return Decision::GiveUp {
                failures: self.failures.len(),
            };
        }
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(self.policy.max);
        Decision::RestartAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(RestartPolicy {
            max_failures: 100,
            ..RestartPolicy::default()
        });
        let t0 = Instant::now();
        let delays: Vec<_> = (0..10)
            .map(|i| match b.exited(t0 + i * 10 * MS, MS) {
                Decision::RestartAfter(d) => d.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]);
    }

    #[test]
    fn long_uptime_resets_the_delay() {
        let mut b = Backoff::new(RestartPolicy::default());
        let t0 = Instant::now();
        assert_eq!(b.exited(t0, MS), Decision::RestartAfter(100 * MS));
        assert_eq!(b.exited(t0, MS), Decision::RestartAfter(200 * MS));
        let later = t0 + Duration::from_secs(40);
        assert_eq!(
            b.exited(later, Duration::from_secs(31)),
            Decision::RestartAfter(100 * MS)
        );
    }

    #[test]
    fn gives_up_after_too_many_failures_in_the_window() {
        let policy = RestartPolicy::default();
        let mut b = Backoff::new(policy);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(matches!(
                b.exited(t0 + i * Duration::from_secs(1), MS),
                Decision::RestartAfter(_)
            ));
        }
        assert_eq!(
            b.exited(t0 + Duration::from_secs(10), MS),
            Decision::GiveUp { failures: 11 }
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = Backoff::new(RestartPolicy::default());
        let t0 = Instant::now();
        // Ten failures, then one every 7 s: the window never holds more than ten.
        for i in 0..10 {
            assert!(matches!(b.exited(t0 + i * MS, MS), Decision::RestartAfter(_)));
        }
        for i in 1..20u32 {
            let now = t0 + Duration::from_secs(61) + i * Duration::from_secs(7);
            assert!(matches!(b.exited(now, MS), Decision::RestartAfter(_)), "failure {i}");
        }
    }
}
