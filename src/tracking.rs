//! The listener that keeps the in-process cache (local.rs) coherent: a thread this client owns
//! (`knox_redis-trk`), never holding the GIL, stoppable, one per process.
//!
//! It opens two connections. The feed (feed.rs: a socket this crate reads itself) turns on
//! Redis' server-assisted client-side caching in broadcasting mode for the key prefix,
//! redirected to itself (`CLIENT TRACKING ON REDIRECT <own id> BCAST PREFIX {prefix}:`), and
//! subscribes to `__redis__:invalidate`: from then on Redis sends it the name of every key
//! under the prefix that anyone changes (or a null for FLUSHDB/FLUSHALL). The other connection
//! (conn.rs, from the pool's `Connector`) publishes a heartbeat to a channel the feed also
//! subscribes to (`{prefix}:heartbeat:{pid}:{random}`), every `HEARTBEAT`.
//!
//! The thread waits for the feed's socket with `poll()`, without its lock, then takes the lock
//! and applies what arrived. It is not the only reader: a request about to serve a local hit
//! drains the feed first (`Local::get`, `Feed::settle`), and if the thread holds the lock at
//! that moment the request goes to Redis instead. So how soon a process stops serving a
//! revoked token doesn't depend on when the OS runs this thread (milliseconds, on a loaded
//! machine), only on when the push reaches the socket; and it is there before the revoking
//! call returns. From Redis 7.0's source (7.0.15):
//!
//! - a write under a BCAST prefix only records the key (`trackingInvalidateKey` →
//!   `trackingRememberKeyToBroadcast`, src/tracking.c:332-351, :366-372); the pushes go out
//!   in `beforeSleep`, which calls `trackingBroadcastInvalidationMessages()`
//!   (src/server.c:1651) before `handleClientsWithPendingWritesUsingThreads()`
//!   (src/server.c:1669), which writes every reply of that event-loop iteration;
//! - adding the push to a client with nothing pending queues it at the head of
//!   `clients_pending_write` (`prepareClientToWrite` → `putClientInPendingWriteQueue`,
//!   src/networking.c:311-312, :258), and the queue is written head first
//!   (`handleClientsWithPendingWrites`, src/networking.c:2041-2067): the feed's push is
//!   written before the reply of the write that caused it, which was queued earlier in that
//!   iteration. (If the feed was already queued in that iteration, say by a heartbeat
//!   `PUBLISH`ed just before the write, it is written in the same pass, just after that reply:
//!   microseconds, before Redis reads another command. With `io-threads`, the same pass.)
//!
//! On one host (loopback) the bytes are in the feed's receive buffer when Redis' `write`
//! returns; across a network the push and the reply travel separate paths, and the window is
//! the difference. What the request path can't see is covered as before by the heartbeat:
//! Redis delivers messages to one connection in order, so when the heartbeat sent at `t` comes
//! back (drained by this thread or by a request), the invalidation of every write whose caller
//! had its reply before `t` has arrived. Entries may be served until `t + LIVENESS`: a
//! revocation that returned at `R` stops local hits everywhere by `R + 1 s` at worst. A dead
//! or slow path (Redis down, a partition, a stalled thread) therefore stops local hits within
//! `LIVENESS`, and any error ends the session: the feed is ended (nothing more is applied from
//! it), detached from the cache, the cache marked dead and flushed, and only then is its
//! socket closed; the thread reconnects with back-off.
//!
//! In Sentinel mode both connections go to the primary the sentinels name: the heartbeat
//! connection through the resolver (verified by `ROLE`), the feed to the same primary
//! (`Connector::target`, same generation) with `ROLE` in its own handshake. The session ends,
//! flushing the cache, as soon as they name another: a primary cut off by a failover may go on
//! answering heartbeats while the writes go elsewhere. For the same reason it ends (and no new
//! one starts) once a majority of the sentinels has not confirmed the primary for
//! `sentinel::TRUSTED_FOR`: this process may be on the old primary's side of a partition,
//! where nothing tells it of the failover.
//!
//! What tracking can't see: `SWAPDB` sends no invalidation (don't swap the cache's database),
//! and a write to the same key name in another database of the same server does (harmless).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{ConnectionAddr, RedisResult};

use crate::feed::{Feed, Target};
use crate::local::{Local, LIVENESS};
use crate::metrics::{Counter, PROCESS};
use crate::pool::Connector;

/// How often the heartbeat goes out: well inside `LIVENESS`, so one lost beat costs nothing.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// At most 15 bytes: what Linux shows of a thread's name.
pub const THREAD_NAME: &str = "knox_redis-trk";

pub struct Listener {
    stop: Arc<AtomicBool>,
    hold: Arc<Hold>,
    thread: Mutex<Option<JoinHandle<()>>>,
    owner_pid: u32,
    local: Arc<Local>,
}

/// For tests only (`TokenCache._hold_listener`): keep the thread where it would take the
/// feed's lock, as if the OS didn't run it, to show that requests don't depend on it.
#[derive(Default)]
struct Hold {
    requested: AtomicBool,
    parked: AtomicBool,
}

impl Hold {
    fn park_while_requested(&self, stop: &AtomicBool) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        self.parked.store(true, Ordering::Release);
        while self.requested.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.parked.store(false, Ordering::Release);
    }
}

impl Listener {
    pub fn spawn(connector: Connector, prefix: String, local: Arc<Local>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(Hold::default());
        let thread = std::thread::Builder::new().name(THREAD_NAME.into()).spawn({
            let (stop, hold, local) = (Arc::clone(&stop), Arc::clone(&hold), Arc::clone(&local));
            move || run(&connector, &prefix, &local, &stop, &hold)
        })?;
        Ok(Listener { stop, hold, thread: Mutex::new(Some(thread)), owner_pid: crate::process::id(), local })
    }

    /// Tests only: hold the thread before its next drain (true once it is held; false if it
    /// isn't within `within`: no session, or stuck connecting), or let it go.
    pub fn hold(&self, hold: bool, within: Duration) -> bool {
        self.hold.requested.store(hold, Ordering::Release);
        let deadline = Instant::now() + within;
        while hold && !self.hold.parked.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        hold && self.hold.parked.load(Ordering::Acquire)
    }

    /// Ask the thread to stop; with `wait`, join it: it notices within one `HEARTBEAT` once it is
    /// reading, or when the call it is in returns (each bounded by the connect or socket timeout).
    pub fn stop(&self, wait: bool) {
        self.stop.store(true, Ordering::Release);
        // In a forked child the thread doesn't exist, and its handle's lock may be held.
        if wait && crate::process::id() == self.owner_pid {
            if let Some(thread) = self.thread.lock().take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop(false);
        // A forked child's copy of the feed's socket (the parent's thread owns the feed).
        self.local.close_inherited();
    }
}

fn run(connector: &Connector, prefix: &str, local: &Local, stop: &AtomicBool, hold: &Hold) {
    let mut backoff = Duration::from_millis(50);
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        if let Err(err) = session(connector, prefix, local, stop, hold) {
            // For the Python side to log (rate-limited): this thread never takes the GIL.
            local.failed(err.to_string());
        }
        local.dead();
        if started.elapsed() > LIVENESS {
            backoff = Duration::from_millis(50); // it had worked for a while: retry soon
        }
        let until = Instant::now() + backoff;
        while !stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    local.dead();
}

/// One connected session; returns on error (or when asked to stop).
fn session(connector: &Connector, prefix: &str, local: &Local, stop: &AtomicBool, hold: &Hold) -> RedisResult<()> {
    // First the heartbeat connection: in Sentinel mode, the resolver finds the primary and
    // verifies it; the feed then goes to that same one.
    let (mut beat, generation) = connector.connect_tagged()?;
    let Some((info, target_generation)) = connector.target() else { return Err(primary_changed()) };
    if target_generation != generation {
        return Err(primary_changed());
    }
    if !connector.trusted(generation) {
        return Err(crate::pool::untrusted());
    }
    // The pool's TLS settings (built once per pool: the system's roots take a while to load).
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { .. } => Some(connector.tls_config()?),
        _ => None,
    };
    let channel = heartbeat_channel(prefix);
    let target = Target {
        info: &info,
        tls,
        connect_timeout: connector.connect_timeout(),
        io_timeout: connector.io_timeout(),
        check_role: connector.is_sentinel(),
    };
    let feed = Arc::new(Feed::open(&target, prefix, &channel)?);
    PROCESS.bump(Counter::ConnectionOpened);
    if connector.generation() != generation {
        return Err(primary_changed()); // the sentinels named another while it connected
    }
    let _attached = Attached::new(local, &feed, generation);
    let primary = Primary { connector, generation };
    listen(&feed, &mut beat, &channel, local, stop, hold, &primary)
}

/// A session's feed as the cache's: attached (the cache flushed: whatever was cached before
/// can't be vouched for), and at the end, in this order: ended (nothing more is applied from
/// it, so a heartbeat drained late can't make the cache live again), detached, the cache
/// marked dead; only then may the socket close (when the session drops its feed).
struct Attached<'a> {
    local: &'a Local,
    feed: &'a Feed,
}

impl<'a> Attached<'a> {
    fn new(local: &'a Local, feed: &'a Arc<Feed>, generation: u64) -> Self {
        local.attach(Arc::clone(feed), generation);
        local.flush();
        Attached { local, feed }
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.feed.end("the tracking session ended");
        self.local.detach();
        self.local.dead();
    }
}

/// The node this session's connections go to (Sentinel mode: the primary of `generation`).
struct Primary<'a> {
    connector: &'a Connector,
    generation: u64,
}

impl Primary<'_> {
    /// Still the primary the sentinels name (asked at most every `sentinel::RECHECK`), and
    /// confirmed by a majority of them lately?
    fn check(&self) -> RedisResult<()> {
        self.connector.refresh();
        if self.connector.generation() != self.generation {
            Err(primary_changed())
        } else if !self.connector.trusted(self.generation) {
            Err(crate::pool::untrusted())
        } else {
            Ok(())
        }
    }
}

fn primary_changed() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the sentinels name another primary: reconnecting",
    ))
}

fn listen(
    feed: &Feed,
    beat: &mut crate::conn::Conn,
    channel: &str,
    local: &Local,
    stop: &AtomicBool,
    hold: &Hold,
    primary: &Primary<'_>,
) -> RedisResult<()> {
    let mut count: u64 = 0;
    let mut next_beat = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= next_beat {
            primary.check()?;
            count += 1;
            // Recorded before it is sent: a request may drain the echo before this thread.
            // Beats go out but don't come back for LIVENESS: the feed's side is stuck.
            feed.beat_sent(count, now)?;
            redis::cmd("PUBLISH").arg(channel).arg(count).query::<i64>(beat)?;
            next_beat = now + HEARTBEAT;
        }
        feed.wait(next_beat.saturating_duration_since(Instant::now()))?;
        hold.park_while_requested(stop);
        feed.drain(local)?;
    }
}

/// Under the key prefix, so that one ACL channel rule (`&{prefix}:*`) covers it.
fn heartbeat_channel(prefix: &str) -> String {
    let mut random = [0u8; 8];
    let _ = getrandom::fill(&mut random);
    format!("{prefix}:heartbeat:{}:{}", std::process::id(), hex::encode(random))
}
