//! A per-process circuit breaker: after a connectivity failure, calls fail fast for a
//! cool-down instead of each paying the timeout again; then one caller probes Redis while the
//! others keep failing fast, and its success closes the circuit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use std::sync::LazyLock;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    // +1 so that 0 can mean "closed".
    EPOCH.elapsed().as_millis() as u64 + 1
}

pub struct Breaker {
    /// 0 when closed, else the monotonic instant (ms) until which calls fail fast.
    open_until_ms: AtomicU64,
    cooldown_ms: u64,
}

impl Breaker {
    pub fn new(cooldown_ms: u64) -> Self {
        Breaker { open_until_ms: AtomicU64::new(0), cooldown_ms }
    }

    /// May this call go to Redis? While open, only the one caller that claims the probe may.
    pub fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 || self.cooldown_ms == 0 {
            return true;
        }
        let now = now_ms();
        if now < until {
            return false;
        }
        // Claim the probe by pushing the deadline out; losers of the race fail fast.
        self.open_until_ms.compare_exchange(until, now + self.cooldown_ms, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// True if this success closed the circuit.
    pub fn record_success(&self) -> bool {
        // A load first: the common case (closed) writes nothing to the shared cache line.
        self.open_until_ms.load(Ordering::Relaxed) != 0 && self.open_until_ms.swap(0, Ordering::AcqRel) != 0
    }

    /// True if this failure opened a closed circuit (a trip; a failed probe only reopens it).
    /// With no cool-down the breaker never opens.
    pub fn record_failure(&self) -> bool {
        if self.cooldown_ms == 0 {
            return false;
        }
        self.open_until_ms.swap(now_ms() + self.cooldown_ms, Ordering::AcqRel) == 0
    }

    /// Closed: no failure since the last success (not even a probe's cool-down over).
    pub fn is_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) == 0
    }

    pub fn is_open(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        until != 0 && now_ms() < until
    }

    pub fn reset(&self) {
        self.open_until_ms.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closed_until_a_failure() {
        let b = Breaker::new(50);
        assert!(b.allow());
        b.record_failure();
        assert!(b.is_open());
        assert!(!b.allow());
    }

    #[test]
    fn one_probe_after_cooldown_then_closes_on_success() {
        let b = Breaker::new(20);
        b.record_failure();
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow(), "first caller after the cool-down probes");
        assert!(!b.allow(), "others fail fast while the probe runs");
        b.record_success();
        assert!(b.allow());
        assert!(!b.is_open());
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(20);
        b.record_failure();
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        b.record_failure();
        assert!(!b.allow());
    }

    #[test]
    fn zero_cooldown_never_blocks() {
        let b = Breaker::new(0);
        assert!(!b.record_failure(), "never opens, so never trips");
        assert!(b.allow());
        assert!(!b.record_success());
    }

    #[test]
    fn only_closed_to_open_is_a_trip_and_only_open_to_closed_a_close() {
        let b = Breaker::new(20);
        assert!(!b.record_success(), "already closed");
        assert!(b.record_failure(), "closed -> open");
        assert!(!b.record_failure(), "open -> open");
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        assert!(!b.record_failure(), "a failed probe reopens: not another trip");
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        assert!(b.record_success(), "open -> closed");
        assert!(!b.record_success());
        b.record_failure();
        b.reset();
        assert!(b.record_failure(), "after a reset, the next failure trips again");
    }
}
