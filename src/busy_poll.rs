//! How a pooled connection waits for a reply (`BUSY_POLL_US`): for up to that many
//! microseconds it keeps asking the socket, without sleeping, before it sleeps in `poll()`.
//!
//! Why: a reply from a Redis on the same host comes back in tens of microseconds, and a
//! thread that went to sleep for it pays for being woken on top of that. Measured here
//! (`bench/hit_breakdown.py`), a `PING` costs 23 µs polled and 55 µs slept for: on a VM, waking
//! an idle vCPU goes through the hypervisor. For a `USER_CACHE` hit, which is one round trip,
//! that is most of its cost. The price is CPU: a thread that polls is busy while it waits. So
//! it polls only while it pays: `MISSES` waits in a row that outlast the window (a Redis
//! across a network, a loaded server) turn polling off for the next `REST` waits, then one
//! wait tries again. Between two reads it yields the CPU (`sched_yield`), so a redis-server
//! or another thread sharing the vCPU runs first. 0 turns it off: every wait sleeps.
//!
//! Shared by the connections of one pool (one server); fork-safe (atomics only).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Consecutive waits that outlasted the window before polling rests.
const MISSES: u32 = 4;
/// Waits that sleep at once while polling rests.
const REST: u32 = 1024;

pub struct BusyPoll {
    window: Duration,
    /// Consecutive waits the window didn't cover.
    misses: AtomicU32,
    /// Waits left before polling is tried again.
    resting: AtomicU32,
}

impl BusyPoll {
    pub fn new(window: Duration) -> Self {
        BusyPoll { window, misses: AtomicU32::new(0), resting: AtomicU32::new(0) }
    }

    /// How long the next wait may poll before it sleeps (zero: sleep at once).
    pub fn window(&self) -> Duration {
        if self.window.is_zero() {
            return Duration::ZERO;
        }
        let resting = self.resting.load(Ordering::Relaxed);
        if resting > 0 {
            // Racy by design: two threads may both take one; either way it ends.
            self.resting.store(resting - 1, Ordering::Relaxed);
            return Duration::ZERO;
        }
        self.window
    }

    /// A polled wait ended with the reply (`caught`) or ran out of window and slept.
    pub fn polled(&self, caught: bool) {
        if caught {
            self.misses.store(0, Ordering::Relaxed);
        } else if self.misses.fetch_add(1, Ordering::Relaxed) + 1 >= MISSES {
            self.misses.store(0, Ordering::Relaxed);
            self.resting.store(REST, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn resting(&self) -> bool {
        self.resting.load(Ordering::Relaxed) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_never_polls() {
        let off = BusyPoll::new(Duration::ZERO);
        assert!(off.window().is_zero());
    }

    #[test]
    fn polling_rests_after_misses_in_a_row_then_tries_again() {
        let poll = BusyPoll::new(Duration::from_micros(100));
        for _ in 0..MISSES - 1 {
            assert_eq!(poll.window(), Duration::from_micros(100));
            poll.polled(false);
        }
        poll.polled(true); // a catch resets the streak
        for _ in 0..MISSES {
            assert!(!poll.window().is_zero());
            poll.polled(false);
        }
        assert!(poll.resting());
        for _ in 0..REST {
            assert!(poll.window().is_zero());
        }
        assert_eq!(poll.window(), Duration::from_micros(100));
    }
}
