//! The listener that keeps the in-process cache (local.rs) coherent: a thread this client owns
//! (`knox_redis-trk`), never holding the GIL, stoppable, one per process.
//!
//! It opens two connections. The listener turns on Redis' server-assisted client-side caching
//! in broadcasting mode for the key prefix, redirected to itself (`CLIENT TRACKING ON REDIRECT
//! <own id> BCAST PREFIX {prefix}:`), and subscribes to `__redis__:invalidate`: from then on
//! Redis sends it the name of every key under the prefix that anyone changes (or a null
//! for FLUSHDB/FLUSHALL). The other connection publishes a heartbeat to a channel the listener
//! also subscribes to (`{prefix}:heartbeat:{pid}:{random}`), every `HEARTBEAT`. Redis sends a
//! write's invalidations (in broadcasting mode, at the end of its event-loop iteration) before
//! the reply to the write's caller, and delivers messages to one connection in order: so when
//! the heartbeat sent at `t` comes back, the invalidation of every write whose caller had its
//! reply before `t` has arrived (one from the same iteration as the heartbeat's PUBLISH may
//! come just after it, but that write hadn't returned at `t`). Entries may be served until
//! `t + LIVENESS`: a revocation that returned at `R` stops local hits everywhere by `R + 1 s`. A dead or slow path (Redis down, a
//! partition, a stalled thread) therefore stops local hits within `LIVENESS`, and any error
//! drops both connections, flushes the cache and reconnects with back-off.
//!
//! In Sentinel mode both connections go to the primary the sentinels name (each verified by
//! `ROLE`), and the session ends, flushing the cache, as soon as they name another: a primary
//! cut off by a failover may go on answering heartbeats while the writes go elsewhere. For the
//! same reason it ends (and no new one starts) once a majority of the sentinels has not
//! confirmed the primary for `sentinel::TRUSTED_FOR`: this process may be on the old primary's
//! side of a partition, where nothing tells it of the failover.
//!
//! What tracking can't see: `SWAPDB` sends no invalidation (don't swap the cache's database),
//! and a write to the same key name in another database of the same server does (harmless).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Connection, RedisResult, Value};

use crate::local::{Local, LIVENESS};
use crate::pool::Connector;

/// How often the heartbeat goes out: well inside `LIVENESS`, so one lost beat costs nothing.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// At most 15 bytes: what Linux shows of a thread's name.
pub const THREAD_NAME: &str = "knox_redis-trk";
const INVALIDATE: &str = "__redis__:invalidate";

pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    owner_pid: u32,
}

impl Listener {
    pub fn spawn(connector: Connector, prefix: String, local: Arc<Local>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name(THREAD_NAME.into()).spawn({
            let stop = Arc::clone(&stop);
            move || run(&connector, &prefix, &local, &stop)
        })?;
        Ok(Listener { stop, thread: Mutex::new(Some(thread)), owner_pid: std::process::id() })
    }

    /// Ask the thread to stop; with `wait`, join it: it notices within one `HEARTBEAT` once it is
    /// reading, or when the call it is in returns (each bounded by the connect or socket timeout).
    pub fn stop(&self, wait: bool) {
        self.stop.store(true, Ordering::Release);
        // In a forked child the thread doesn't exist, and its handle's lock may be held.
        if wait && std::process::id() == self.owner_pid {
            if let Some(thread) = self.thread.lock().take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop(false);
    }
}

fn run(connector: &Connector, prefix: &str, local: &Local, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(50);
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        if let Err(err) = session(connector, prefix, local, stop) {
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
fn session(connector: &Connector, prefix: &str, local: &Local, stop: &AtomicBool) -> RedisResult<()> {
    let (mut listener, generation) = connector.connect_tagged()?;
    let (mut beat, beat_generation) = connector.connect_tagged()?;
    if beat_generation != generation {
        return Err(primary_changed());
    }
    if !connector.trusted(generation) {
        return Err(crate::pool::untrusted());
    }
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut listener)?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("REDIRECT")
        .arg(id)
        .arg("BCAST")
        .arg("PREFIX")
        .arg(format!("{prefix}:"))
        .query::<()>(&mut listener)?;
    let channel = heartbeat_channel(prefix);
    let mut pubsub = listener.as_pubsub();
    pubsub.subscribe(&[INVALIDATE, channel.as_str()])?;
    // Whatever was cached before this session can't be vouched for.
    local.flush();
    let primary = Primary { connector, generation };
    listen(&mut pubsub, &mut beat, &channel, local, stop, &primary)
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
    pubsub: &mut redis::PubSub<'_>,
    beat: &mut Connection,
    channel: &str,
    local: &Local,
    stop: &AtomicBool,
    primary: &Primary<'_>,
) -> RedisResult<()> {
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
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
            redis::cmd("PUBLISH").arg(channel).arg(count).query::<i64>(beat)?;
            sent.push_back((count, now));
            next_beat = now + HEARTBEAT;
            if sent.front().is_some_and(|(_, at)| now.duration_since(*at) > LIVENESS) {
                // Beats go out but don't come back: the listener's side is stuck.
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "tracking heartbeat not delivered",
                )));
            }
        }
        let wait = next_beat.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        pubsub.set_read_timeout(Some(wait))?;
        let msg = match pubsub.get_message() {
            Ok(msg) => msg,
            Err(err) if err.is_timeout() => continue,
            Err(err) => return Err(err),
        };
        if msg.get_channel_name() == INVALIDATE {
            match msg.get_payload::<Value>()? {
                Value::Array(keys) | Value::Set(keys) => {
                    for key in keys {
                        match key {
                            Value::BulkString(key) => local.invalidate(&String::from_utf8_lossy(&key)),
                            // Not a key name: don't guess which entries it meant.
                            _ => local.flush(),
                        }
                    }
                }
                // FLUSHDB/FLUSHALL (or a shape this code doesn't know): drop everything.
                _ => local.flush(),
            }
        } else if msg.get_channel_name() == channel {
            let Ok(number) = msg.get_payload::<u64>() else { continue };
            while let Some(&(n, at)) = sent.front() {
                if n > number {
                    break;
                }
                sent.pop_front();
                if n == number {
                    local.heartbeat(at);
                }
            }
        }
    }
}

/// Under the key prefix, so that one ACL channel rule (`&{prefix}:*`) covers it.
fn heartbeat_channel(prefix: &str) -> String {
    let mut random = [0u8; 8];
    let _ = getrandom::fill(&mut random);
    format!("{prefix}:heartbeat:{}:{}", std::process::id(), hex::encode(random))
}
