//! The feed: the tracking listener's subscribed connection (tracking.rs), which carries Redis'
//! invalidations and this process's heartbeats, opened and read by this crate itself.
//!
//! The socket (stream.rs), the bytes read from it and not yet applied, and the TLS state are
//! behind one lock, under one rule: **whoever holds the lock leaves with
//! every byte that was readable applied** (`Inner::drain`: read without blocking until the
//! socket has nothing more, TLS plaintext included, and apply each complete reply). So a
//! request can check, in one `recv` that finds nothing (`Feed::settle`), that no invalidation
//! has reached this process without being applied: the listener thread may not have run for
//! milliseconds on a loaded machine, but the push is in the socket (see tracking.rs for why it
//! is there before the revoking call returns).
//!
//! The connection: a `Stream` (stream.rs: TCP, a unix socket or TLS, verified against the
//! same roots as the pool's). The handshake, by hand: `AUTH` (the pool's credentials), `CLIENT ID`
//! (Sentinel mode: `ROLE`, which must say `master`), then `CLIENT TRACKING ON REDIRECT <id>
//! BCAST PREFIX {prefix}:` and `SUBSCRIBE __redis__:invalidate <heartbeat channel>`, each
//! batch sent at once. Connecting and the TLS handshake are bounded by the pool's connect
//! timeout, each batch's replies by its socket timeout. Then the socket is made non-blocking
//! for good: the listener waits for it with `poll()` (`Feed::wait`), without the lock.
//! No `SELECT`: invalidations and heartbeats don't depend on the database.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
#[cfg(test)]
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{ConnectionInfo, RedisError, RedisResult, Value};
use rustls::ClientConfig;

use crate::local::{Local, LIVENESS};
use crate::resp;
use crate::stream::{self, Stream, CHUNK};

/// The channel Redis publishes a RESP2 client's redirected invalidations on.
pub const INVALIDATE: &str = "__redis__:invalidate";

/// Where and how to open the feed.
pub struct Target<'a> {
    pub info: &'a ConnectionInfo,
    /// For `rediss://`: the roots and settings to verify the server with (`tls_config`).
    pub tls: Option<Arc<ClientConfig>>,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Sentinel mode: the node must answer `ROLE` with `master`.
    pub check_role: bool,
}

pub struct Feed {
    /// The socket's descriptor, fixed for the feed's life: for `poll()` without the lock, and
    /// for a forked child to close its copy without touching the lock (local.rs).
    fd: RawFd,
    inner: Mutex<Inner>,
}

struct Inner {
    stream: Stream,
    /// Bytes read and not yet applied: at most the start of one reply once a drain is done.
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// This session's heartbeat channel, and the beats published on it not yet back (number,
    /// when sent).
    channel: String,
    sent: VecDeque<(u64, Instant)>,
    /// Why nothing more is applied from this feed: it failed, or its session ended.
    ended: Option<String>,
}

impl Feed {
    /// Connect and subscribe (see the module doc). Bytes that came after the subscription's
    /// replies are kept, applied by the first drain.
    pub fn open(target: &Target<'_>, prefix: &str, channel: &str) -> RedisResult<Feed> {
        let mut stream = Stream::connect(target.info, target.tls.as_ref(), target.connect_timeout, target.io_timeout)?;
        let mut buf = Vec::new();
        let settings = target.info.redis_settings();
        let mut first: Vec<(&'static str, redis::Cmd)> = Vec::with_capacity(3);
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            first.push(("AUTH", auth.arg(password).clone()));
        }
        first.push(("CLIENT ID", redis::cmd("CLIENT").arg("ID").clone()));
        if target.check_role {
            first.push(("ROLE (sent on each new connection in Sentinel mode)", redis::cmd("ROLE")));
        }
        let replies = stream::round_trip(&mut stream, &mut buf, &first, target.io_timeout)?;
        let mut id = None;
        for ((name, _), reply) in first.iter().zip(replies) {
            match (*name, reply) {
                ("CLIENT ID", Value::Int(value)) => id = Some(value),
                ("AUTH" | "CLIENT ID", _) => {}
                (_, role) => match crate::sentinel::role_name(&role) {
                    Some("master") => {}
                    role => {
                        return Err(stream::io_error(
                            io::ErrorKind::NotConnected,
                            format!("the node reports role {:?}, not master: not used", role.unwrap_or("unknown")),
                        ))
                    }
                },
            }
        }
        let Some(id) = id else {
            return Err(RedisError::from((redis::ErrorKind::UnexpectedReturnType, "CLIENT ID: not an integer")));
        };
        let tracking = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("REDIRECT")
            .arg(id)
            .arg("BCAST")
            .arg("PREFIX")
            .arg(format!("{prefix}:"))
            .clone();
        let subscribe = redis::cmd("SUBSCRIBE").arg(INVALIDATE).arg(channel).clone();
        let second = [("CLIENT TRACKING", tracking), ("SUBSCRIBE", subscribe)];
        stream::round_trip(&mut stream, &mut buf, &second, target.io_timeout)?;
        // SUBSCRIBE confirms each channel in a reply of its own: the second one is read here.
        let deadline = Instant::now() + target.io_timeout;
        stream::read_reply(&mut stream, &mut buf, deadline)
            .and_then(Value::extract_error)
            .map_err(|e| stream::context("SUBSCRIBE", e))?;
        stream.set_nonblocking(true)?;
        Ok(Feed {
            fd: stream.fd(),
            inner: Mutex::new(Inner {
                stream,
                buf,
                scratch: vec![0; CHUNK],
                channel: channel.to_owned(),
                sent: VecDeque::new(),
                ended: None,
            }),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The listener: wait until the socket has something to read (or `timeout`), without the
    /// lock. A request may drain it first: then the listener's drain finds nothing.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut pollfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for a descriptor this feed owns for as long as it lives.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }

    /// The listener: take the lock (a request holds it only for a non-blocking drain) and
    /// apply everything readable. An error ends the session.
    pub fn drain(&self, local: &Local) -> io::Result<()> {
        self.inner.lock().drain(local).map(|_| ()).map_err(io::Error::other)
    }

    /// A request about to serve a local hit: true if, by this call, everything that had
    /// reached the socket is applied. False if it can't tell now (the listener holds the
    /// lock, or part of a reply has arrived and the rest hasn't: the request asks Redis), or
    /// the feed failed (the cache is marked dead at once; the listener will end the session).
    pub fn settle(&self, local: &Local) -> bool {
        let Some(mut inner) = self.inner.try_lock() else { return false };
        if let Ok(settled) = inner.drain(local) {
            settled
        } else {
            local.dead();
            false
        }
    }

    /// The listener published heartbeat `number` at `at` (on its other connection): recorded
    /// first, so whoever drains the echo can tell when it was sent. An error if the oldest
    /// beat still awaited went out more than `LIVENESS` ago: the feed's side is stuck.
    pub fn beat_sent(&self, number: u64, at: Instant) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if inner.sent.front().is_some_and(|(_, sent)| at.duration_since(*sent) > LIVENESS) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "tracking heartbeat not delivered"));
        }
        inner.sent.push_back((number, at));
        Ok(())
    }

    /// The session ends: from now on nothing read from this feed is applied (a heartbeat
    /// drained late must not make a cache the listener is about to mark dead live again).
    pub fn end(&self, why: &str) {
        let mut inner = self.inner.lock();
        if inner.ended.is_none() {
            inner.ended = Some(why.to_owned());
        }
    }

    /// Tests: run `f` while another thread would hold the feed's lock.
    #[cfg(test)]
    pub fn while_held<R>(&self, f: impl FnOnce() -> R) -> R {
        let _held = self.inner.lock();
        f()
    }

    /// Tests: a feed over a socket the test writes to.
    #[cfg(test)]
    pub fn over(socket: UnixStream, channel: &str) -> io::Result<Feed> {
        socket.set_nonblocking(true)?;
        let stream = Stream::Unix(socket);
        Ok(Feed {
            fd: stream.fd(),
            inner: Mutex::new(Inner {
                stream,
                buf: Vec::new(),
                scratch: vec![0; CHUNK],
                channel: channel.to_owned(),
                sent: VecDeque::new(),
                ended: None,
            }),
        })
    }
}

impl Inner {
    /// Read until the socket has nothing more, then apply every complete reply. True if
    /// nothing read is left unapplied (no partial reply, no partial TLS record).
    fn drain(&mut self, local: &Local) -> Result<bool, String> {
        if let Some(why) = &self.ended {
            return Err(why.clone());
        }
        let result = self.read_and_apply(local);
        if let Err(why) = &result {
            self.ended = Some(why.clone());
        }
        result
    }

    fn read_and_apply(&mut self, local: &Local) -> Result<bool, String> {
        loop {
            match self.stream.receive(&mut self.buf, &mut self.scratch) {
                Ok(0) => return Err("the tracking connection was closed".into()),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(format!("tracking connection: {err}")),
            }
        }
        let mut start = 0;
        while let Some(len) = resp::frame_len(&self.buf[start..]).map_err(|e| e.to_string())? {
            let value = redis::parse_redis_value(&self.buf[start..start + len]).map_err(|e| e.to_string())?;
            start += len;
            self.apply(value, local)?;
        }
        self.buf.drain(..start);
        Ok(self.buf.is_empty() && !self.stream.partial())
    }

    fn apply(&mut self, value: Value, local: &Local) -> Result<(), String> {
        let items = match value {
            Value::Array(items) => items,
            Value::ServerError(err) => return Err(format!("tracking connection: {}", RedisError::from(err))),
            _ => return Ok(()),
        };
        let mut items = items.into_iter();
        let (Some(Value::BulkString(kind)), Some(Value::BulkString(channel))) = (items.next(), items.next()) else {
            return Ok(());
        };
        if kind != b"message" {
            return Ok(()); // the subscription's confirmations
        }
        if channel == INVALIDATE.as_bytes() {
            match items.next() {
                Some(Value::Array(keys)) => {
                    for key in keys {
                        match key {
                            Value::BulkString(key) => local.invalidate(&String::from_utf8_lossy(&key)),
                            // Not a key name: don't guess which entries it meant.
                            _ => local.flush(),
                        }
                    }
                }
                // FLUSHDB/FLUSHALL (a null), or a shape this code doesn't know: drop everything.
                _ => local.flush(),
            }
        } else if channel == self.channel.as_bytes() {
            let Some(Value::BulkString(number)) = items.next() else { return Ok(()) };
            let Some(number) = std::str::from_utf8(&number).ok().and_then(|n| n.parse::<u64>().ok()) else {
                return Ok(());
            };
            while let Some(&(n, at)) = self.sent.front() {
                if n > number {
                    break;
                }
                self.sent.pop_front();
                if n == number {
                    local.heartbeat(at);
                }
            }
        }
        Ok(())
    }
}
