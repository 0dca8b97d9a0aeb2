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
//! or another thread sharing the vCPU runs first. And at most half the CPUs (at least one)
//! poll at once in a process: its other threads sleep. (Per process: several worker
//! processes on one host each have their own.) 0 turns it off: every wait sleeps.
//!
//! The back-off is shared by the connections of one pool (one server); fork-safe (atomics,
//! and a forked child's count of polling threads starts at 0: `process.rs`).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// Consecutive waits that outlasted the window before polling rests.
const MISSES: u32 = 4;
/// Waits that sleep at once while polling rests.
const REST: u32 = 1024;

/// Threads of this process polling now.
static POLLING: AtomicUsize = AtomicUsize::new(0);
/// How many may (0: not known yet). Not a `LazyLock`: a fork while another thread runs its
/// initialiser would leave the child's stuck; two threads computing it at once is harmless.
static MAX_POLLING: AtomicUsize = AtomicUsize::new(0);

fn max_polling() -> usize {
    match MAX_POLLING.load(Ordering::Relaxed) {
        0 => {
            let max = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
            MAX_POLLING.store(max, Ordering::Relaxed);
            max
        }
        max => max,
    }
}

/// A forked child: the threads that were polling in the parent don't exist here.
/// Async-signal-safe (one atomic store), for the `pthread_atfork` child handler.
pub fn forked() {
    POLLING.store(0, Ordering::Relaxed);
}

/// One thread's turn to poll; given back when dropped.
pub struct Turn(&'static AtomicUsize);

impl Turn {
    fn take(polling: &'static AtomicUsize, max: usize) -> Option<Turn> {
        polling
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Turn(polling))
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Saturating: a count reset by `forked` may meet a turn taken before.
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

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

    /// May the next wait poll, and for how long? None: it sleeps at once (off, resting, or
    /// as many threads polling as may).
    pub fn start(&self) -> Option<(Duration, Turn)> {
        if self.window.is_zero() {
            return None;
        }
        let resting = self.resting.load(Ordering::Relaxed);
        if resting > 0 {
            // Racy by design: two threads may both take one; either way it ends.
            self.resting.store(resting - 1, Ordering::Relaxed);
            return None;
        }
        Turn::take(&POLLING, max_polling()).map(|turn| (self.window, turn))
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

    /// Tests: could every turn be taken at once right now?
    #[cfg(test)]
    pub fn all_turns_free() -> bool {
        let max = max_polling();
        let turns: Vec<Turn> = (0..max).filter_map(|_| Turn::take(&POLLING, max)).collect();
        turns.len() == max
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
        assert!(off.start().is_none());
    }

    #[test]
    fn polling_rests_after_misses_in_a_row_then_tries_again() {
        let poll = BusyPoll::new(Duration::from_micros(100));
        for _ in 0..MISSES - 1 {
            assert_eq!(poll.start().map(|(window, _)| window), Some(Duration::from_micros(100)));
            poll.polled(false);
        }
        poll.polled(true); // a catch resets the streak
        for _ in 0..MISSES {
            assert!(poll.start().is_some());
            poll.polled(false);
        }
        assert!(poll.resting());
        for _ in 0..REST {
            assert!(poll.start().is_none());
        }
        assert!(poll.start().is_some());
    }

    #[test]
    fn no_more_threads_poll_at_once_than_may() {
        static POLLING_HERE: AtomicUsize = AtomicUsize::new(0);
        let turns: Vec<Turn> = (0..3).filter_map(|_| Turn::take(&POLLING_HERE, 2)).collect();
        assert_eq!(turns.len(), 2);
        drop(turns);
        assert_eq!(POLLING_HERE.load(Ordering::Relaxed), 0);
        let _turn = Turn::take(&POLLING_HERE, 2).expect("a turn given back is free again");
        POLLING_HERE.store(0, Ordering::Relaxed); // as `forked` does
    }
}
