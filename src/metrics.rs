//! This process's counters and the latency histogram of its Redis calls: what
//! `knox_redis.stats()` returns and `knox_redis.metrics` exposes to Prometheus.
//!
//! One set per process, not per client: a client replaced by a settings change must not take
//! its counts with it (a Prometheus counter never goes down while its process lives). Each
//! event is one relaxed atomic add: no lock, no allocation, no syscall on the request path.
//! Gauges (idle connections, breaker open) belong to the client, which the Python side asks.
//!
//! A forked child must not report its parent's counts as its own (gunicorn `--preload`: each
//! worker would count the master's again): `cache.py` zeroes them from `os.register_at_fork`,
//! and a snapshot taken in a process other than the one that last zeroed them (a fork from C,
//! without Python's hooks) zeroes them first.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A counted event. The discriminant indexes `Metrics::counters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// A lookup found a record that decoded and whose MAC verified.
    LookupHit,
    /// A lookup found no record.
    LookupMiss,
    /// A lookup found a value that doesn't decode (foreign, truncated, another version).
    LookupUndecodable,
    /// A lookup found a record whose MAC fails: someone else wrote it, or another secret.
    LookupBadMac,
    /// A lookup found a record written to another incarnation of Redis (restored from an
    /// older snapshot, replicated before a failover): a miss (also counted in `LookupMiss`).
    LookupOtherIncarnation,
    /// A hit whose record says the token expired (decided by the Python side, at request time).
    LookupExpired,
    Fill,
    FillRefused,
    /// Revocation scripts Redis ran.
    Revocation,
    /// Revocation calls that failed: each a refused deletion (503) or a journaled retry.
    RevocationFailure,
    /// Tokens named by revocations that Redis ran.
    RevokedTokens,
    /// Cached records those revocations deleted.
    RevokedRecords,
    ErrorTimeout,
    ErrorConnection,
    /// Redis answered with an error, or with a reply of an unexpected shape.
    ErrorReply,
    /// A call not sent because the circuit breaker was open.
    ErrorCircuitOpen,
    /// Closed → open transitions of the circuit breaker.
    BreakerTrip,
    /// `USER_CACHE`: a hit's user row came back usable (MAC verified for the record's user).
    UserRowHit,
    /// `USER_CACHE`: a hit without a usable user row (the user is read from the database).
    UserRowMiss,
    UserRowFill,
    UserRowFillRefused,
    /// `LOCAL_CACHE_SIZE`: a lookup served from the in-process cache (no network call).
    LocalHit,
    /// `LOCAL_CACHE_SIZE`: an entry dropped to make room.
    LocalEviction,
    /// `LOCAL_CACHE_SIZE`: invalidations applied (Redis' pushes, and this process's own).
    LocalInvalidation,
    /// A script refused to run: the server took another role (a `REPLICAOF` sent by hand)
    /// since the connection learned its incarnation; idle connections dropped, call retried.
    RoleChanged,
    ConnectionOpened,
}

const COUNTERS: usize = Counter::ConnectionOpened as usize + 1;

/// Upper bounds of the latency buckets in microseconds: 0.1 ms to 250 ms, then +Inf.
pub const BUCKET_BOUNDS_US: [u32; 11] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];
const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;

/// What tripped the breaker last, for the log line that says so (0: nothing yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    Timeout = 1,
    Connection = 2,
    Reply = 3,
}

impl ErrorKind {
    pub fn of(err: &redis::RedisError) -> Self {
        if err.is_timeout() {
            ErrorKind::Timeout
        } else if crate::errors::is_connectivity(err) {
            ErrorKind::Connection
        } else {
            ErrorKind::Reply
        }
    }

    fn counter(self) -> Counter {
        match self {
            ErrorKind::Timeout => Counter::ErrorTimeout,
            ErrorKind::Connection => Counter::ErrorConnection,
            ErrorKind::Reply => Counter::ErrorReply,
        }
    }

    fn name(code: u8) -> Option<&'static str> {
        match code {
            1 => Some("timeout"),
            2 => Some("connection"),
            3 => Some("reply"),
            _ => None,
        }
    }
}

pub struct Metrics {
    counters: [AtomicU64; COUNTERS],
    /// Observations per bucket (not cumulative: each call adds to one bucket only).
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    last_trip: AtomicU8,
    /// The process the counts are this process's for (0: not known yet).
    owner_pid: AtomicU32,
}

/// The counters at one instant, in `Counter` order.
pub type Counts = [u64; COUNTERS];

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            counters: [const { AtomicU64::new(0) }; COUNTERS],
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
            last_trip: AtomicU8::new(0),
            owner_pid: AtomicU32::new(0),
        }
    }

    pub fn bump(&self, counter: Counter) {
        self.add(counter, 1);
    }

    pub fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.bump(kind.counter());
    }

    /// The breaker went from closed to open after an error of this kind.
    pub fn tripped(&self, kind: ErrorKind) {
        self.last_trip.store(kind as u8, Ordering::Relaxed);
        self.bump(Counter::BreakerTrip);
    }

    /// One Redis call, however it ended.
    pub fn observe(&self, elapsed: Duration) {
        let ns = elapsed.as_nanos();
        let bucket = BUCKET_BOUNDS_US.iter().position(|&us| ns <= u128::from(us) * 1_000).unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn counts(&self) -> Counts {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// Cumulative bucket counts (the last one is the number of calls) and the sum in seconds.
    pub fn histogram(&self) -> ([u64; BUCKETS], f64) {
        let mut cumulative = [0u64; BUCKETS];
        let mut total = 0;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            total += bucket.load(Ordering::Relaxed);
            *slot = total;
        }
        (cumulative, Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)).as_secs_f64())
    }

    pub fn last_trip_kind(&self) -> Option<&'static str> {
        ErrorKind::name(self.last_trip.load(Ordering::Relaxed))
    }

    /// Zero everything and claim the counts for process `pid` (a forked child starting over).
    pub fn reset(&self, pid: u32) {
        for counter in self.counters.iter().chain(&self.buckets).chain([&self.sum_ns]) {
            counter.store(0, Ordering::Relaxed);
        }
        self.last_trip.store(0, Ordering::Relaxed);
        self.owner_pid.store(pid, Ordering::Relaxed);
    }

    /// Before reading: counts inherited through a fork that bypassed Python's at-fork hooks
    /// are the parent's, not this process's.
    fn claim(&self, pid: u32) {
        match self.owner_pid.load(Ordering::Relaxed) {
            0 => self.owner_pid.store(pid, Ordering::Relaxed),
            owner if owner != pid => self.reset(pid),
            _ => {}
        }
    }
}

/// This process's counters.
pub static PROCESS: Metrics = Metrics::new();

/// Record the importing process as the owner of the counts (see `Metrics::claim`).
pub fn init() {
    PROCESS.claim(crate::process::id());
}

/// Each counter's name in `knox_redis.stats()` (and, below, the sums derived from them).
fn counter_name(counter: usize) -> Option<&'static str> {
    const NAMES: [Option<&str>; COUNTERS] = [
        Some("lookups_hit"),
        Some("lookups_miss"),
        None, // undecodable: reported inside lookups_garbage
        Some("lookups_bad_mac"),
        Some("lookups_other_incarnation"),
        Some("lookups_expired"),
        Some("fills"),
        Some("fills_refused"),
        Some("revocations"),
        Some("revocation_failures"),
        Some("revoked_tokens"),
        Some("revoked_records"),
        Some("errors_timeout"),
        Some("errors_connection"),
        Some("errors_reply"),
        Some("errors_circuit_open"),
        Some("breaker_trips"),
        Some("user_rows_hit"),
        Some("user_rows_miss"),
        Some("user_row_fills"),
        Some("user_row_fills_refused"),
        Some("local_hits"),
        Some("local_evictions"),
        Some("local_invalidations"),
        Some("role_changes"),
        Some("connections_opened"),
    ];
    NAMES[counter]
}

/// The garbage outcome: every value that is not a record this site signed for this token.
pub fn garbage(counts: &Counts) -> u64 {
    counts[Counter::LookupUndecodable as usize] + counts[Counter::LookupBadMac as usize]
}

/// A bucket's upper bound as Prometheus writes `le` ("0.0001", ..., "+Inf").
fn le(bucket: usize) -> String {
    match BUCKET_BOUNDS_US.get(bucket) {
        Some(&us) => format!("{}", f64::from(us) / 1e6),
        None => "+Inf".into(),
    }
}

/// This process's counters and call-latency histogram, by their stable names (README,
/// "Metrics"). Gauges are the client's: `cache.metrics()` adds them.
#[pyfunction]
pub fn process_metrics(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    PROCESS.claim(crate::process::id());
    let counts = PROCESS.counts();
    let dict = PyDict::new(py);
    for (i, value) in counts.iter().enumerate() {
        if let Some(name) = counter_name(i) {
            dict.set_item(name, value)?;
        }
    }
    dict.set_item("lookups_garbage", garbage(&counts))?;
    let (cumulative, sum_seconds) = PROCESS.histogram();
    let buckets = PyDict::new(py);
    for (i, count) in cumulative.iter().enumerate() {
        buckets.set_item(le(i), count)?;
    }
    dict.set_item("call_duration_seconds_bucket", buckets)?;
    dict.set_item("call_duration_seconds_sum", sum_seconds)?;
    dict.set_item("call_duration_seconds_count", cumulative[BUCKETS - 1])?;
    Ok(dict)
}

/// Count a hit whose record said the token expired (the Python side decides that).
#[pyfunction]
pub fn count_expired() {
    PROCESS.bump(Counter::LookupExpired);
}

/// The kind of error ("timeout", "connection") that last opened a circuit breaker in this
/// process, or None: for the one log line that says the breaker opened.
#[pyfunction]
pub fn last_trip_kind() -> Option<&'static str> {
    PROCESS.last_trip_kind()
}

/// Zero this process's counters: called in a forked child, which starts with its own.
#[pyfunction]
pub fn reset_metrics() {
    PROCESS.reset(crate::process::id());
}

/// A client's view: the process's counters since the client was created, under the names
/// `TokenCache.stats()` has always used.
pub struct ClientMetrics {
    baseline: Counts,
}

impl ClientMetrics {
    pub fn new() -> Self {
        ClientMetrics { baseline: PROCESS.counts() }
    }

    pub fn since_created(&self) -> [(&'static str, u64); 17] {
        let now = PROCESS.counts();
        let delta = |c: Counter| now[c as usize].saturating_sub(self.baseline[c as usize]);
        let garbage = delta(Counter::LookupUndecodable) + delta(Counter::LookupBadMac);
        [
            ("hits", delta(Counter::LookupHit)),
            ("misses", delta(Counter::LookupMiss) + garbage),
            ("undecodable", delta(Counter::LookupUndecodable)),
            ("bad_mac", delta(Counter::LookupBadMac)),
            ("other_incarnation", delta(Counter::LookupOtherIncarnation)),
            ("fills", delta(Counter::Fill)),
            ("fills_refused", delta(Counter::FillRefused)),
            ("revoked", delta(Counter::RevokedRecords)),
            ("errors", delta(Counter::ErrorTimeout) + delta(Counter::ErrorConnection) + delta(Counter::ErrorReply)),
            ("short_circuits", delta(Counter::ErrorCircuitOpen)),
            ("user_hits", delta(Counter::UserRowHit)),
            ("user_misses", delta(Counter::UserRowMiss)),
            ("user_fills", delta(Counter::UserRowFill)),
            ("user_fills_refused", delta(Counter::UserRowFillRefused)),
            ("local_hits", delta(Counter::LocalHit)),
            ("local_evictions", delta(Counter::LocalEviction)),
            ("local_invalidations", delta(Counter::LocalInvalidation)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_but_undecodable_has_a_name() {
        let unnamed: Vec<usize> = (0..COUNTERS).filter(|&i| counter_name(i).is_none()).collect();
        assert_eq!(unnamed, vec![Counter::LookupUndecodable as usize]);
    }

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let m = Metrics::new();
        m.observe(Duration::from_micros(100)); // le 0.0001, inclusive
        m.observe(Duration::from_nanos(100_001)); // le 0.00025
        m.observe(Duration::from_millis(3)); // le 0.005
        m.observe(Duration::from_secs(1)); // +Inf only
        let (cumulative, sum) = m.histogram();
        assert_eq!(cumulative, [1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4]);
        assert!((sum - 1.003_200_001).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn bucket_bounds_are_written_as_prometheus_reads_them() {
        let names: Vec<String> = (0..BUCKETS).map(le).collect();
        assert_eq!(names[0], "0.0001");
        assert_eq!(names[3], "0.001");
        assert_eq!(names[10], "0.25");
        assert_eq!(names[11], "+Inf");
    }

    #[test]
    fn counts_claimed_by_another_process_are_zeroed_before_reading() {
        let m = Metrics::new();
        m.claim(1);
        m.bump(Counter::LookupHit);
        m.tripped(ErrorKind::Timeout);
        m.observe(Duration::from_millis(1));
        m.claim(1);
        assert_eq!(m.counts()[Counter::LookupHit as usize], 1);
        assert_eq!(m.last_trip_kind(), Some("timeout"));
        m.claim(2); // a child forked without Python's hooks
        assert_eq!(m.counts(), [0; COUNTERS]);
        assert_eq!(m.histogram(), ([0; BUCKETS], 0.0));
        assert_eq!(m.last_trip_kind(), None);
    }

    #[test]
    fn garbage_is_undecodable_plus_bad_mac() {
        let m = Metrics::new();
        m.bump(Counter::LookupUndecodable);
        m.add(Counter::LookupBadMac, 2);
        m.bump(Counter::LookupMiss);
        assert_eq!(garbage(&m.counts()), 3);
    }
}
