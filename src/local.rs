//! The in-process cache (`LOCAL_CACHE_SIZE`): lookup replies kept in this process, so a repeat
//! hit makes no network call. Kept coherent by Redis' client-side caching (tracking.rs: Redis
//! pushes every change to a key under the prefix to this process's feed), under five rules:
//!
//! - no entry is served while the feed may hold an invalidation not yet applied: `get` first
//!   drains the feed itself (`Feed::settle`: one `recv` that finds nothing, in the common
//!   case), and if it can't (the listener thread is draining it at that moment, or only part
//!   of a reply has arrived) the request is a local miss and asks Redis;
//! - an entry fetched before an invalidation of one of its keys is never stored after it: a
//!   fetch takes a ticket (the invalidation count) before its round trip, and the store is
//!   refused if any invalidation since then names one of the entry's keys, or if the log that
//!   tells has been trimmed past the ticket. (A push that reaches the socket during the fetch
//!   and is applied only after the store still drops the entry: the first rule applies it
//!   before anything is served.);
//! - entries are served only while the listener is live (a heartbeat sent through Redis came
//!   back within the last second); otherwise the cache is flushed and bypassed;
//! - a flush (FLUSHDB/FLUSHALL, a reconnect) empties it;
//! - only found records are stored: an unknown token never takes a slot.
//!
//! Locks, always taken in this order: the feed slot, the feed, the entries (`state`); the
//! listener takes the feed alone, then the entries. Bounded: at capacity, the oldest entry
//! goes (FIFO). Every method checks the pid first: a forked child never touches what the
//! parent's threads may have held locked at the fork (the feed's lock included: a child
//! serves nothing locally from a parent's cache, and closes its copy of the feed's socket
//! without the lock, `close_inherited`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::{Py, PyAny};

use crate::feed::Feed;
use crate::incarnation::Incarnation;
use crate::metrics::{Counter, PROCESS};
use crate::slot::{find, slot, Slot};

/// How long a heartbeat vouches for the listener: the worst-case delay before this process
/// stops serving an entry that another process revoked.
pub const LIVENESS: Duration = Duration::from_secs(1);
/// Invalidations remembered for stores in flight; a store whose ticket is older is refused.
const LOG_LEN: usize = 4096;

/// A lookup reply as it came from Redis, with the keys it depends on.
#[derive(Clone)]
pub struct Entry {
    /// As Redis sent it (verified again by a repeat hit that has nothing `built`).
    pub reply: Arc<Vec<Option<Vec<u8>>>>,
    pub token_key: String,
    pub user_key: String,
    /// What the caller built from the verified reply (the Python `Lookup`: immutable), served
    /// as it is by a repeat hit; it goes with the entry, so it is never older than the reply.
    pub built: Option<Arc<Py<PyAny>>>,
    /// Whether the reply held a usable user row (`USER_CACHE`), for a repeat hit's counters.
    pub row_found: Option<bool>,
    /// The incarnation of Redis that sent the reply (it was verified against it). Entries of
    /// an incarnation that is gone are never served: its connections died with it, so the
    /// listener's did too, and a new session starts by flushing (a store whose ticket is older
    /// than that flush is refused).
    pub incarnation: Incarnation,
}

/// What a repeat hit takes from an entry (no copy of its key names).
pub struct Hit {
    pub reply: Arc<Vec<Option<Vec<u8>>>>,
    pub built: Option<Arc<Py<PyAny>>>,
    pub row_found: Option<bool>,
    pub incarnation: Incarnation,
}

#[derive(Default)]
struct State {
    /// Each entry with the stamp of its place in `order`.
    entries: HashMap<Slot, (u64, Entry)>,
    /// Redis key name -> the slots whose entry depends on it.
    by_key: HashMap<String, Vec<Slot>>,
    /// Insertion order for eviction; a position whose stamp no longer matches its entry's (the
    /// entry was invalidated, or stored again) is stale and skipped.
    order: VecDeque<(u64, Slot)>,
    stamps: u64,
    /// Invalidations so far (also the next ticket).
    seq: u64,
    /// The most recent invalidations: (seq, key name); None for a flush.
    log: VecDeque<(u64, Option<String>)>,
}

pub struct Local {
    capacity: usize,
    owner_pid: u32,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which entries may be served (set by the listener).
    live_until: AtomicU64,
    state: Mutex<State>,
    /// Why the listener's last session ended, if it failed (cleared by a heartbeat).
    last_error: Mutex<Option<String>>,
    /// The live session's feed (tracking.rs), set once it has subscribed and cleared before
    /// its socket closes.
    feed: Mutex<Option<Arc<Feed>>>,
    /// Its socket's descriptor (-1: none), readable without a lock by a forked child.
    feed_fd: AtomicI32,
    /// The generation of the primary the feed listens to (Sentinel; always 0 otherwise).
    feed_generation: AtomicU64,
}

impl Local {
    pub fn new(capacity: usize) -> Self {
        Local {
            capacity,
            owner_pid: crate::process::id(),
            epoch: Instant::now(),
            live_until: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            last_error: Mutex::new(None),
            feed: Mutex::new(None),
            feed_fd: AtomicI32::new(-1),
            feed_generation: AtomicU64::new(0),
        }
    }

    /// A session has subscribed, on the primary of `generation`: requests drain its feed
    /// before serving (`get`).
    pub fn attach(&self, feed: Arc<Feed>, generation: u64) {
        if self.ours() {
            self.feed_generation.store(generation, Ordering::Release);
            self.feed_fd.store(feed.fd(), Ordering::Release);
            *self.feed.lock() = Some(feed);
        }
    }

    /// The session is ending (its feed already `end`ed, its socket not yet closed).
    pub fn detach(&self) {
        if self.ours() {
            self.feed_fd.store(-1, Ordering::Release);
            self.feed.lock().take();
        }
    }

    /// In a forked child: close the child's copy of the parent's feed socket (the parent's
    /// stays open), without touching any lock. Otherwise the connection would outlive the
    /// parent's session in the child, and Redis would go on pushing to a socket nobody reads.
    pub fn close_inherited(&self) {
        if self.ours() {
            return;
        }
        let fd = self.feed_fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: the parent's feed socket, open in this process (its `Feed` is never
            // dropped here: the thread that owned it doesn't exist in a child), closed once.
            unsafe { libc::close(fd) };
        }
    }

    fn ours(&self) -> bool {
        crate::process::id() == self.owner_pid
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Does the feed listen to the primary of `generation`, the one requests go to? After a
    /// failover the sentinels name a new primary before the listener has left the old one,
    /// which may go on answering heartbeats while the writes go elsewhere: until the listener
    /// is there too, nothing is served or stored here.
    pub fn follows(&self, generation: u64) -> bool {
        self.feed_generation.load(Ordering::Acquire) == generation
    }

    pub fn is_live(&self) -> bool {
        self.ours() && self.nanos(Instant::now()) < self.live_until.load(Ordering::Acquire)
    }

    /// The listener got back a heartbeat it sent at `sent`: everything Redis changed before
    /// then has reached it, so entries may be served until `sent + LIVENESS`.
    pub fn heartbeat(&self, sent: Instant) {
        self.live_until.fetch_max(self.nanos(sent + LIVENESS), Ordering::AcqRel);
        if self.ours() {
            self.last_error.lock().take();
        }
    }

    /// The listener's session failed (Redis refused a command, the connection broke...).
    pub fn failed(&self, error: String) {
        if self.ours() {
            *self.last_error.lock() = Some(error);
        }
    }

    /// Why the listener is not live, if its last session failed.
    pub fn last_error(&self) -> Option<String> {
        if self.ours() {
            self.last_error.lock().clone()
        } else {
            None
        }
    }

    /// The listener lost its connection: serve nothing, keep nothing.
    pub fn dead(&self) {
        self.live_until.store(0, Ordering::Release);
        self.flush();
    }

    /// The entry for this token, if one may be served now.
    pub fn get(&self, token_key: &str, field: &str, with_user: bool) -> Option<Hit> {
        if !self.ours() {
            return None;
        }
        // Everything that reached the feed's socket before now is applied first (a flush or
        // an invalidation, a heartbeat too); if that can't be done now, this is a miss.
        {
            let feed = self.feed.lock();
            match &*feed {
                Some(feed) if feed.settle(self) => {}
                Some(_) => return None,
                None => {
                    drop(feed);
                    if !self.state.lock().entries.is_empty() {
                        self.flush();
                    }
                    return None;
                }
            }
        }
        if !self.is_live() {
            if self.ours() && !self.state.lock().entries.is_empty() {
                self.flush();
            }
            return None;
        }
        let hit = |(_, entry): &(u64, Entry)| Hit {
            reply: Arc::clone(&entry.reply),
            built: entry.built.clone(),
            row_found: entry.row_found,
            incarnation: entry.incarnation,
        };
        let found = find(&self.state.lock().entries, token_key, field, with_user).map(hit);
        if found.is_some() {
            PROCESS.bump(Counter::LocalHit);
        }
        found
    }

    /// A ticket for a fetch about to start, or None if nothing may be stored.
    pub fn ticket(&self) -> Option<u64> {
        self.is_live().then(|| self.state.lock().seq)
    }

    /// Store what a fetch that took `ticket` found, unless an invalidation since then names
    /// one of its keys (or can't be ruled out).
    pub fn store(&self, ticket: u64, token_key: &str, field: &str, with_user: bool, entry: Entry) {
        if !self.is_live() || self.capacity == 0 {
            return;
        }
        let mut state = self.state.lock();
        if state.seq != ticket {
            let covered = state.log.front().is_some_and(|(first, _)| *first <= ticket + 1);
            if !covered {
                return;
            }
            // Newest first: only the invalidations since the ticket matter.
            let touched = state.log.iter().rev().take_while(|(seq, _)| *seq > ticket).any(|(_, key)| match key {
                None => true,
                Some(key) => *key == entry.token_key || *key == entry.user_key,
            });
            if touched {
                return;
            }
        }
        let slot = slot(token_key, field, with_user);
        // Replacing (two requests for one token missed together): unindex the previous entry
        // *before* indexing this one, which shares its keys.
        if let Some((_, previous)) = state.entries.remove(&slot) {
            unlink(&mut state, &slot, &previous);
        }
        while state.entries.len() >= self.capacity {
            let Some((stamp, oldest)) = state.order.pop_front() else { break };
            if state.entries.get(&oldest).is_some_and(|(current, _)| *current == stamp) {
                if let Some((_, gone)) = state.entries.remove(&oldest) {
                    unlink(&mut state, &oldest, &gone);
                    PROCESS.bump(Counter::LocalEviction);
                }
            }
        }
        for key in [&entry.token_key, &entry.user_key] {
            state.by_key.entry(key.clone()).or_default().push(slot.clone());
        }
        state.stamps += 1;
        let stamp = state.stamps;
        state.entries.insert(slot.clone(), (stamp, entry));
        state.order.push_back((stamp, slot));
    }

    /// Redis says `key` changed (or this process is about to change it): drop what depends on it.
    pub fn invalidate(&self, key: &str) {
        if !self.ours() {
            return;
        }
        PROCESS.bump(Counter::LocalInvalidation);
        let mut state = self.state.lock();
        log(&mut state, Some(key.to_owned()));
        for slot in state.by_key.remove(key).unwrap_or_default() {
            if let Some((_, gone)) = state.entries.remove(&slot) {
                unlink(&mut state, &slot, &gone);
            }
        }
    }

    pub fn flush(&self) {
        if !self.ours() {
            return;
        }
        let mut state = self.state.lock();
        log(&mut state, None);
        state.entries.clear();
        state.by_key.clear();
        state.order.clear();
    }

    pub fn len(&self) -> usize {
        if self.ours() {
            self.state.lock().entries.len()
        } else {
            0
        }
    }
}

fn log(state: &mut State, key: Option<String>) {
    state.seq += 1;
    let seq = state.seq;
    state.log.push_back((seq, key));
    while state.log.len() > LOG_LEN {
        state.log.pop_front();
    }
}

/// Forget `slot` in the key index of `entry`'s keys (the FIFO order is pruned lazily).
fn unlink(state: &mut State, slot: &Slot, entry: &Entry) {
    for key in [&entry.token_key, &entry.user_key] {
        if let Some(slots) = state.by_key.get_mut(key) {
            slots.retain(|s| s != slot);
            if slots.is_empty() {
                state.by_key.remove(key);
            }
        }
    }
    if state.order.len() > 2 * state.entries.len() + 64 {
        let entries = &state.entries;
        state.order.retain(|(stamp, s)| entries.get(s).is_some_and(|(current, _)| current == stamp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A cache with a feed over a socket the test writes Redis' side of.
    struct Live {
        local: Local,
        feed: Arc<Feed>,
        redis: UnixStream,
    }

    impl std::ops::Deref for Live {
        type Target = Local;
        fn deref(&self) -> &Local {
            &self.local
        }
    }

    impl Live {
        fn push(&mut self, bytes: &[u8]) {
            let Ok(()) = self.redis.write_all(bytes) else { panic!("the test's socket refused a write") };
        }
    }

    fn attached(capacity: usize) -> Live {
        let Ok((ours, redis)) = UnixStream::pair() else { panic!("no socket pair") };
        let Ok(feed) = Feed::over(ours, "k:heartbeat:1") else { panic!("no feed") };
        let feed = Arc::new(feed);
        let local = Local::new(capacity);
        local.attach(Arc::clone(&feed), 0);
        Live { local, feed, redis }
    }

    fn invalidation(keys: &[&str]) -> Vec<u8> {
        let mut out = format!("*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*{}\r\n", keys.len()).into_bytes();
        for key in keys {
            out.extend_from_slice(format!("${}\r\n{key}\r\n", key.len()).as_bytes());
        }
        out
    }

    fn entry(token_key: &str, user_key: &str) -> Entry {
        Entry {
            reply: Arc::new(vec![Some(b"r".to_vec())]),
            token_key: token_key.into(),
            user_key: user_key.into(),
            built: None,
            row_found: None,
            incarnation: Incarnation::DETACHED,
        }
    }

    fn live(capacity: usize) -> Live {
        let live = attached(capacity);
        live.heartbeat(Instant::now());
        live
    }

    /// A ticket from a cache the test made live (none from a dead one: that is a test's bug).
    fn ticket_of(local: &Local) -> u64 {
        let Some(ticket) = local.ticket() else { panic!("the cache is not live") };
        ticket
    }

    #[test]
    fn a_fetch_that_raced_an_invalidation_is_never_stored() {
        let local = live(10);
        let ticket = ticket_of(&local);
        local.invalidate("k:user:1:ix"); // the push arrives while the fetch is in flight
        local.store(ticket, "tk", "id", true, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.get("tk", "id", true).is_none());
        // An unrelated key doesn't stop it; a flush does.
        let ticket = ticket_of(&local);
        local.invalidate("k:token:other");
        local.store(ticket, "tk", "id", true, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.get("tk", "id", true).is_some());
        let ticket = ticket_of(&local);
        local.flush();
        local.store(ticket, "tk2", "id", true, entry("k:token:tk2", "k:user:1:ix"));
        assert!(local.get("tk2", "id", true).is_none());
    }

    #[test]
    fn a_ticket_older_than_the_log_is_refused() {
        let local = live(10);
        let ticket = ticket_of(&local);
        for i in 0..=LOG_LEN {
            local.invalidate(&format!("k:token:{i}"));
        }
        local.store(ticket, "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.get("tk", "id", false).is_none());
    }

    #[test]
    fn invalidating_either_key_drops_the_entry() {
        let local = live(10);
        for key in ["k:token:tk", "k:user:1:ix"] {
            let ticket = ticket_of(&local);
            local.store(ticket, "tk", "id", true, entry("k:token:tk", "k:user:1:ix"));
            assert!(local.get("tk", "id", true).is_some());
            local.invalidate(key);
            assert!(local.get("tk", "id", true).is_none(), "{key}");
        }
    }

    #[test]
    fn nothing_is_served_or_stored_without_a_recent_heartbeat() {
        let local = attached(10);
        assert!(local.ticket().is_none());
        local.heartbeat(Instant::now());
        local.store(ticket_of(&local), "tk", "id", true, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.get("tk", "id", true).is_some());
        local.dead();
        assert!(local.get("tk", "id", true).is_none());
        assert_eq!(local.len(), 0);
        // A heartbeat sent long ago vouches for nothing now.
        let Some(long_ago) = Instant::now().checked_sub(LIVENESS * 2) else { return };
        local.heartbeat(long_ago);
        assert!(!local.is_live());
    }

    #[test]
    fn a_second_store_of_the_same_token_stays_invalidatable() {
        // Two requests for one token missed together; both store. (A review found the second
        // store unindexed the slot it had just indexed: no invalidation reached it.)
        let local = live(10);
        let (a, b) = (ticket_of(&local), ticket_of(&local));
        local.store(a, "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.store(b, "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.invalidate("k:token:tk");
        assert!(local.get("tk", "id", false).is_none(), "revoked entry still served");
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.invalidate("k:user:1:ix");
        assert!(local.get("tk", "id", false).is_none(), "revoked entry still served");
    }

    #[test]
    fn eviction_takes_the_oldest_after_a_store_again() {
        let local = live(2);
        let put = |tk: &str| {
            local.store(
                ticket_of(&local),
                tk,
                "id",
                false,
                entry(&format!("k:token:{tk}"), &format!("k:user:{tk}:ix")),
            );
        };
        put("a");
        put("b");
        local.invalidate("k:token:a");
        put("a"); // now the newest
        put("c"); // evicts b, the oldest
        assert!(local.get("a", "id", false).is_some());
        assert!(local.get("b", "id", false).is_none());
    }

    #[test]
    fn bounded_oldest_first() {
        let local = live(2);
        for tk in ["a", "b", "c"] {
            local.store(ticket_of(&local), tk, "id", false, entry(&format!("k:token:{tk}"), "k:user:1:ix"));
        }
        assert_eq!(local.len(), 2);
        assert!(local.get("a", "id", false).is_none());
        assert!(local.get("c", "id", false).is_some());
    }

    #[test]
    fn a_push_waiting_in_the_socket_is_applied_before_a_hit() {
        // No listener thread here at all: the request itself finds the push.
        let mut local = live(10);
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.get("tk", "id", false).is_some());
        local.push(&invalidation(&["k:other", "k:token:tk"]));
        assert!(local.get("tk", "id", false).is_none());
        assert_eq!(local.len(), 0);
    }

    #[test]
    fn part_of_a_push_is_a_miss_until_the_rest_comes() {
        let mut local = live(10);
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        let push = invalidation(&["k:token:tk"]);
        local.push(&push[..push.len() - 3]);
        assert!(local.get("tk", "id", false).is_none(), "served with a push half read");
        assert_eq!(local.len(), 1); // not applied yet: it can't be parsed
        local.push(&push[push.len() - 3..]);
        assert!(local.get("tk", "id", false).is_none());
        assert_eq!(local.len(), 0);
    }

    #[test]
    fn a_feed_someone_else_is_draining_is_a_miss() {
        let local = live(10);
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        assert!(local.feed.while_held(|| local.get("tk", "id", false)).is_none());
        assert!(local.get("tk", "id", false).is_some());
    }

    #[test]
    fn a_null_invalidation_flushes_and_a_heartbeat_drained_by_a_request_counts() {
        let mut local = attached(10);
        let Some(sent) = Instant::now().checked_sub(Duration::from_millis(5)) else { return };
        let Ok(()) = local.feed.beat_sent(1, sent) else { panic!("beat refused") };
        local.push(b"*3\r\n$7\r\nmessage\r\n$13\r\nk:heartbeat:1\r\n$1\r\n1\r\n");
        assert!(!local.is_live());
        assert!(local.get("tk", "id", false).is_none());
        assert!(local.is_live(), "the echo drained by a request vouches as the listener's would");
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.push(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n");
        assert!(local.get("tk", "id", false).is_none());
        assert_eq!(local.len(), 0);
    }

    #[test]
    fn a_broken_or_ended_feed_serves_nothing() {
        let mut local = live(10);
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.push(b"HTTP/1.1 400 Bad Request\r\n");
        assert!(local.get("tk", "id", false).is_none());
        assert!(!local.is_live());
        assert_eq!(local.len(), 0);

        let local = live(10);
        local.store(ticket_of(&local), "tk", "id", false, entry("k:token:tk", "k:user:1:ix"));
        local.feed.end("the session ended");
        assert!(local.get("tk", "id", false).is_none());
        local.detach();
        assert!(local.get("tk", "id", false).is_none());
        assert_eq!(local.len(), 0, "no feed: flushed");
    }
}
