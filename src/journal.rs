//! Sentinel failover: revocations this process sent to a primary that was being replaced are
//! sent again to the new one before this process uses it.
//!
//! Replication is asynchronous, and a failover promotes a replica while the old primary may go
//! on taking writes: the sentinels name the new primary only once it reports its new role (up
//! to about a second later), this process asks them once a second (`sentinel::RECHECK`), and
//! the old primary is emptied when it rejoins as a replica. A revocation sent to it in that
//! window would be lost, and the token's record, copied to the new primary before the
//! promotion, accepted again. So every revocation is kept until a majority of the sentinels
//! have named the primary it went to (that primary: its generation) at least `MARGIN` after
//! it was sent (it had reached the replicas by then, or they would name another); a
//! confirmation of another primary settles nothing. The first connection to a newer primary
//! re-sends the ones kept, and no other is used before that is done.
//!
//! A revocation is idempotent (a record deleted again, a new generation, a tombstone), so
//! sending one twice costs server time, never a wrong answer. The catch-up pipelines them
//! (`BATCH_CALLS` calls or `BATCH_KEYS` keys a round trip): a process that logged out a
//! thousand tokens in the seconds before a failover pays a few round trips on its first call
//! to the new primary, not a thousand.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Cmd, RedisResult};

use crate::client::REVOKE;
use crate::conn::Conn;
use crate::fanout::pipeline;

/// How long after a revocation the sentinels must still name its primary before it is
/// dropped: above their delay in naming a promoted replica, plus replication's.
pub const MARGIN: Duration = Duration::from_secs(5);
/// At most this many revocations are kept (the oldest go first).
const CAPACITY: usize = 100_000;
/// A catch-up's round trip carries at most this many calls, or as many as add up to
/// `BATCH_KEYS` keys (a logoutall is one call naming every token of a user): its replies come
/// back well within one socket timeout.
const BATCH_CALLS: usize = 256;
const BATCH_KEYS: usize = 4096;

/// One call of revoke.lua, as `TokenCache::revoke` builds it.
pub struct Revocation {
    /// The script's KEYS, in its order (see revoke.lua).
    pub keys: Vec<String>,
    pub n: usize,
    pub tombstone_ms: u64,
    pub seed: String,
    pub prefix: String,
    pub pairs: usize,
    /// The user rows' tombstone to lift ("" for none).
    pub lift: String,
    pub ids: Vec<String>,
    pub id_fields: Vec<Vec<u8>>,
    pub legacy_members: Vec<String>,
}

impl Revocation {
    /// `(records deleted, the user rows' tombstone, replicas online)` (revoke.lua).
    pub fn invoke(&self, conn: &mut Conn) -> RedisResult<(i64, String, i64)> {
        self.invoke_lifting(conn, &self.lift)
    }

    /// Sent again to a new primary: the same revocation, lifting no tombstone (a lift is
    /// only ever right once, just after the write it guarded committed).
    pub fn replay(&self, conn: &mut Conn) -> RedisResult<()> {
        self.invoke_lifting(conn, "").map(|_: (i64, String, i64)| ())
    }

    fn invoke_lifting(&self, conn: &mut Conn, lift: &str) -> RedisResult<(i64, String, i64)> {
        let mut invocation = REVOKE.prepare_invoke();
        invocation.key(&self.keys);
        invocation.arg(self.n).arg(self.tombstone_ms).arg(&self.seed).arg(&self.prefix).arg(self.pairs).arg(lift);
        invocation.arg(&self.ids).arg(&self.id_fields).arg(&self.legacy_members);
        invocation.invoke(conn)
    }

    /// `replay` as one command of a pipeline (`EVALSHA`: the caller loads the script first).
    fn replay_cmd(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(REVOKE.get_hash()).arg(self.keys.len()).arg(&self.keys);
        cmd.arg(self.n).arg(self.tombstone_ms).arg(&self.seed).arg(&self.prefix).arg(self.pairs).arg("");
        cmd.arg(&self.ids).arg(&self.id_fields).arg(&self.legacy_members);
        cmd
    }
}

/// An error reply that says "not now" rather than "no": the server is loading its data, busy
/// with another client's script, or can't reach its replicas.
fn is_transient(err: &redis::RedisError) -> bool {
    matches!(err.code(), Some("BUSY" | "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "NOREPLICAS"))
}

/// Re-send `calls` on `conn`, pipelined (see `BATCH_CALLS`). A connection error stops it, and
/// so does a server that says "not now" (`is_transient`: the catch-up is tried again by the
/// next call); a call the server refuses is dropped (sending it again won't help), except
/// NOSCRIPT (the scripts were flushed meanwhile): the script is loaded again and the batch
/// re-sent once.
fn replay_all(conn: &mut Conn, calls: &[Arc<Revocation>], io_timeout: Duration) -> RedisResult<()> {
    if calls.is_empty() {
        return Ok(());
    }
    REVOKE.prepare_invoke().load(conn)?;
    for batch in batches(calls) {
        let mut pipe = redis::pipe();
        for call in batch {
            pipe.add_command(call.replay_cmd());
        }
        // Each batch's replies within a socket timeout (not one per reply: a hung primary).
        let mut replies = pipeline(conn, &pipe, Instant::now() + io_timeout, io_timeout)?;
        if replies.iter().any(|reply| reply.as_ref().is_err_and(|err| err.code() == Some("NOSCRIPT"))) {
            REVOKE.prepare_invoke().load(conn)?;
            replies = pipeline(conn, &pipe, Instant::now() + io_timeout, io_timeout)?;
        }
        if let Some(not_now) = replies.into_iter().find_map(|reply| reply.err().filter(is_transient)) {
            return Err(not_now);
        }
    }
    Ok(())
}

/// `calls` cut into round trips of at most `BATCH_CALLS` calls and, unless one call alone
/// exceeds it, `BATCH_KEYS` keys.
fn batches(calls: &[Arc<Revocation>]) -> Vec<&[Arc<Revocation>]> {
    let mut out = Vec::new();
    let (mut start, mut keys) = (0, 0);
    for (i, call) in calls.iter().enumerate() {
        let count = i - start;
        if count > 0 && (count == BATCH_CALLS || keys + call.keys.len() > BATCH_KEYS) {
            out.push(&calls[start..i]);
            (start, keys) = (i, 0);
        }
        keys += call.keys.len();
    }
    if start < calls.len() {
        out.push(&calls[start..]);
    }
    out
}

struct Entry {
    at: Instant,
    /// The primary it went to (`Connector::generation`).
    generation: u64,
    call: Arc<Revocation>,
}

#[derive(Default)]
struct Kept {
    entries: VecDeque<Entry>,
    /// The generation a catch-up has taken its list of revocations for: one recorded after
    /// that, for an older primary, is not in it (its caller sends it again).
    listed_for: u64,
}

#[derive(Default)]
pub struct Journal {
    kept: Mutex<Kept>,
    /// Connections of this generation (or older) may be used: the revocations are caught up.
    caught_up: AtomicU64,
    /// Held while re-sending: no other connection to the new primary is used meanwhile.
    gate: Mutex<()>,
}

impl Journal {
    /// Keep a revocation sent on a connection of `generation`. `settled`: the generation of
    /// the primary a majority of the sentinels last confirmed, and when (revocations sent to
    /// that primary `MARGIN` before that go; those sent to any other stay). Returns true if a
    /// newer primary's catch-up had already listed what to re-send without this one: the
    /// caller sends it again itself.
    pub fn record(&self, generation: u64, call: Arc<Revocation>, settled: Option<(u64, Instant)>) -> bool {
        let mut kept = self.kept.lock();
        self.prune(&mut kept, settled);
        if kept.entries.len() >= CAPACITY {
            kept.entries.pop_front();
        }
        kept.entries.push_back(Entry { at: Instant::now(), generation, call });
        generation < kept.listed_for
    }

    /// Before a connection of `generation` is first used: if it goes to a newer primary than
    /// the revocations were caught up with, re-send every revocation kept for an older one.
    /// A connection error stops (the caller fails, the next call tries again); a revocation
    /// the server refuses is dropped, not tried for ever. A call that finds another's
    /// catch-up in progress waits for it at most `wait`, then fails as if Redis were
    /// unreachable (its connection is not used before the catch-up is done).
    pub fn catch_up(&self, conn: &mut Conn, generation: u64, wait: Duration) -> RedisResult<()> {
        if generation <= self.caught_up.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(_gate) = self.gate.try_lock_for(wait) else {
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the revocations kept for the new primary are still being sent to it (by another call)",
            )));
        };
        if generation <= self.caught_up.load(Ordering::Acquire) {
            return Ok(());
        }
        let pending: Vec<Arc<Revocation>> = {
            let mut kept = self.kept.lock();
            kept.listed_for = kept.listed_for.max(generation);
            kept.entries.iter().filter(|e| e.generation < generation).map(|e| Arc::clone(&e.call)).collect()
        };
        if let Err(err) = replay_all(conn, &pending, wait) {
            // A connection closed by the failure (a malformed reply) can't go on either, nor
            // a server that will take the calls a moment later (loading, busy with a script).
            if crate::errors::is_connectivity(&err) || !redis::ConnectionLike::is_open(conn) || is_transient(&err) {
                return Err(err);
            }
            // Refused as a whole (not a connectivity problem): sending it again won't help.
        }
        // They are on the new primary now, as of now.
        let now = Instant::now();
        let mut kept = self.kept.lock();
        for entry in kept.entries.iter_mut().filter(|e| e.generation < generation) {
            entry.at = now;
            entry.generation = generation;
        }
        self.caught_up.store(generation, Ordering::Release);
        Ok(())
    }

    /// Drop the revocations `settled` settles (see `record`): called after each call on the
    /// primary too, so that a burst followed by quiet doesn't stay kept (to be re-sent, one
    /// batch of round trips, by the next failover's catch-up). Cheap when there is nothing to drop.
    pub fn settle(&self, settled: Option<(u64, Instant)>) {
        let mut kept = self.kept.lock();
        if !kept.entries.is_empty() {
            self.prune(&mut kept, settled);
        }
    }

    fn prune(&self, kept: &mut Kept, settled: Option<(u64, Instant)>) {
        // Only while no catch-up is pending: the kept ones are for the next primary.
        if let Some((confirmed, cutoff)) = settled.and_then(|(g, at)| Some((g, at.checked_sub(MARGIN)?))) {
            if self.caught_up.load(Ordering::Acquire) >= kept.listed_for {
                // In order of sending: one for another primary at the front waits for its
                // catch-up (which moves it to the new one) before those behind it go.
                while kept.entries.front().is_some_and(|e| e.at < cutoff && e.generation == confirmed) {
                    kept.entries.pop_front();
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.kept.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn revocation() -> Arc<Revocation> {
        Arc::new(Revocation {
            keys: vec!["knox:token:x".into()],
            n: 1,
            tombstone_ms: 1,
            seed: "s".into(),
            prefix: "knox".into(),
            pairs: 0,
            lift: String::new(),
            ids: vec![],
            id_fields: vec![],
            legacy_members: vec![],
        })
    }

    #[test]
    fn kept_until_the_primary_is_named_again_after_the_margin() {
        let journal = Journal::default();
        assert!(!journal.record(1, revocation(), None));
        assert!(!journal.record(1, revocation(), Some((1, Instant::now()))));
        assert_eq!(journal.len(), 2); // named just now: within the margin
        let later = Instant::now() + MARGIN + Duration::from_millis(1);
        assert!(!journal.record(1, revocation(), Some((1, later))));
        assert_eq!(journal.len(), 1); // the two older ones were settled
    }

    #[test]
    fn settled_without_a_new_revocation() {
        let journal = Journal::default();
        assert!(!journal.record(1, revocation(), None));
        journal.settle(Some((1, Instant::now())));
        assert_eq!(journal.len(), 1);
        journal.settle(Some((1, Instant::now() + MARGIN + Duration::from_millis(1))));
        assert_eq!(journal.len(), 0);
    }

    #[test]
    fn only_a_confirmation_of_their_own_primary_settles_revocations() {
        let journal = Journal::default();
        assert!(!journal.record(1, revocation(), None));
        let later = Instant::now() + MARGIN + Duration::from_millis(1);
        assert!(!journal.record(1, revocation(), Some((2, later))));
        assert_eq!(journal.len(), 2); // generation 2 confirmed: nothing sent to 1 is settled
        assert!(!journal.record(1, revocation(), Some((1, later))));
        assert_eq!(journal.len(), 1);
    }

    #[test]
    fn a_catch_up_pipelines_its_calls_in_bounded_round_trips() {
        let many: Vec<_> = (0..1000).map(|_| revocation()).collect();
        let sizes: Vec<usize> = batches(&many).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![256, 256, 256, 232]);
        let mut big = revocation();
        if let Some(call) = Arc::get_mut(&mut big) {
            call.keys = vec!["k".into(); BATCH_KEYS + 10];
        }
        let mixed = vec![revocation(), Arc::clone(&big), revocation(), big, revocation()];
        let sizes: Vec<usize> = batches(&mixed).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1, 1, 1]); // one call alone may exceed the key budget
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn a_revocation_recorded_after_a_catch_up_listed_is_sent_again_by_its_caller() {
        let journal = Journal::default();
        journal.kept.lock().listed_for = 2;
        assert!(journal.record(1, revocation(), None));
        assert!(!journal.record(2, revocation(), None));
    }
}

#[cfg(test)]
#[path = "journal_settled_by_another_primary_tests.rs"]
mod settled_by_another_primary_tests;
