//! A pooled connection: a `Stream` (stream.rs) this crate reads itself, speaking RESP2 under
//! redis-rs' command types (`ConnectionLike`: `Cmd::query`, `Script::invoke`, pipelines).
//!
//! Why not redis-rs' own `Connection`: it sleeps in `recv` for every reply and exposes no
//! socket to wait on otherwise. This one waits as `BUSY_POLL_US` says (`busy_poll.rs`): its
//! socket is non-blocking, and a reply is read by polling it for a short window, then by
//! sleeping in `poll()` until the socket timeout.
//!
//! The rules that keep a connection's replies matched to its commands:
//! - a reply's deadline is the read timeout from when its read began (redis-rs bounds each
//!   `recv`; this bounds the reply, however it trickles in);
//! - any error but an error reply (I/O, a timeout, a malformed reply) closes the connection
//!   for good (`is_open` turns false, and the pool drops it): a late reply is never read as
//!   the next command's. A caller that stops reading replies it is owed (a deadline of its
//!   own) says so with `abandon`, which closes it the same way;
//! - bytes read past a complete reply are kept for the next (RESP2 sends none unasked).
//!
//! The handshake: `AUTH` (the URL's credentials) and `SELECT` (its database), sent at once;
//! connecting, TLS and these replies all within one connect timeout. Never RESP3.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{ConnectionInfo, ConnectionLike, RedisError, RedisResult, Value};
use rustls::ClientConfig;

use crate::busy_poll::{BusyPoll, Turn};
use crate::resp;
use crate::stream::{self, Stream, CHUNK};

pub struct Conn {
    stream: Stream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    scratch: Vec<u8>,
    read_timeout: Cell<Duration>,
    write_timeout: Duration,
    db: i64,
    open: bool,
    busy_poll: Arc<BusyPoll>,
}

/// Where a reply's wait is.
enum Waiting {
    /// Nothing was missing yet.
    NotYet,
    /// Polling the socket until then, on this thread's turn (held, given back when dropped).
    Polling { until: Instant, _turn: Turn },
    /// Sleeping in `poll()` (the window ran out, or there was none).
    Sleeping,
}

/// A buffer grown past this by a large reply is shrunk back once it is read.
const KEEP_BUFFER: usize = 64 * 1024;

impl Conn {
    pub fn open(
        info: &ConnectionInfo,
        tls: Option<&Arc<ClientConfig>>,
        connect_timeout: Duration,
        io_timeout: Duration,
        busy_poll: Arc<BusyPoll>,
    ) -> RedisResult<Conn> {
        let deadline = Instant::now() + connect_timeout;
        let stream = Stream::connect(info, tls, connect_timeout, io_timeout)?;
        stream.set_nonblocking(true)?;
        let settings = info.redis_settings();
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            scratch: vec![0; CHUNK],
            read_timeout: Cell::new(io_timeout),
            write_timeout: io_timeout,
            db: settings.db(),
            open: true,
            busy_poll,
        };
        let mut handshake: Vec<(&'static str, redis::Cmd)> = Vec::with_capacity(2);
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            handshake.push(("AUTH", auth.arg(password).clone()));
        }
        if settings.db() != 0 {
            handshake.push(("SELECT", redis::cmd("SELECT").arg(settings.db()).clone()));
        }
        if !handshake.is_empty() {
            let packed: Vec<u8> = handshake.iter().flat_map(|(_, cmd)| cmd.get_packed_command()).collect();
            conn.send_by(&packed, deadline)?;
            for (name, _) in &handshake {
                conn.reply_by(deadline).and_then(Value::extract_error).map_err(|e| refused(name, e))?;
            }
        }
        Ok(conn)
    }

    /// How long a reply may take from when its read begins (`WAIT` raises it for one call).
    #[allow(clippy::unnecessary_wraps)] // redis-rs' signature, which callers share
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> RedisResult<()> {
        self.read_timeout.set(timeout.unwrap_or(Duration::MAX));
        Ok(())
    }

    pub fn send_packed_command(&mut self, cmd: &[u8]) -> RedisResult<()> {
        self.send_by(cmd, deadline_after(self.write_timeout))
    }

    pub fn recv_response(&mut self) -> RedisResult<Value> {
        self.reply_by(deadline_after(self.read_timeout.get()))
    }

    /// The caller won't read the replies this connection is still owed (its own deadline
    /// passed): it is closed, never pooled again.
    pub fn abandon(&mut self) {
        self.open = false;
    }

    fn send_by(&mut self, bytes: &[u8], deadline: Instant) -> RedisResult<()> {
        if !self.open {
            return Err(closed());
        }
        self.stream.send_within(bytes, deadline).map_err(|err| self.failed(err.into()))
    }

    fn reply_by(&mut self, deadline: Instant) -> RedisResult<Value> {
        if !self.open {
            return Err(closed());
        }
        let reply = self.read_reply(deadline).map_err(|err| self.failed(err));
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        reply
    }

    fn failed(&mut self, err: RedisError) -> RedisError {
        self.open = false;
        err
    }

    fn read_reply(&mut self, deadline: Instant) -> RedisResult<Value> {
        let mut waiting = Waiting::NotYet;
        // Scanned again only when bytes came (a large reply arrives in many reads).
        let mut fresh = true;
        loop {
            if fresh {
                if let Some(value) = self.parse()? {
                    if let Waiting::Polling { .. } = waiting {
                        self.busy_poll.polled(true);
                    }
                    return Ok(value);
                }
                fresh = false;
                // A reply that keeps trickling in never waits: bound it here too.
                if Instant::now() >= deadline {
                    return Err(stream::timed_out_reading());
                }
            }
            match self.stream.receive(&mut self.buf, &mut self.scratch) {
                Ok(0) => {
                    return Err(RedisError::from(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the server",
                    )))
                }
                Ok(_) => fresh = true,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    waiting = self.wait(waiting, deadline)?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The complete reply at the start of the buffer, taken out of it; None if there isn't one yet.
    fn parse(&mut self) -> RedisResult<Option<Value>> {
        let complete = resp::frame_len(&self.buf)
            .map_err(|e| RedisError::from((redis::ErrorKind::UnexpectedReturnType, "connection", e.to_string())))?;
        let Some(len) = complete else { return Ok(None) };
        let value = redis::parse_redis_value(&self.buf[..len])?;
        self.buf.drain(..len);
        Ok(Some(value))
    }

    /// Nothing more to read yet: poll again (yielding the CPU first), or sleep until the
    /// socket is readable. Never past `deadline`.
    fn wait(&self, waiting: Waiting, deadline: Instant) -> RedisResult<Waiting> {
        let now = Instant::now();
        let waiting = match waiting {
            Waiting::NotYet => match self.busy_poll.start() {
                Some((window, turn)) => Waiting::Polling { until: (now + window).min(deadline), _turn: turn },
                None => Waiting::Sleeping,
            },
            Waiting::Polling { until, _turn: turn } if now >= until => {
                self.busy_poll.polled(false);
                drop(turn); // given back before the sleep, not after it
                Waiting::Sleeping
            }
            other => other,
        };
        match waiting {
            Waiting::Polling { .. } => {
                // SAFETY: no arguments; it only lets another runnable thread go first.
                unsafe { libc::sched_yield() };
            }
            _ => stream::wait_until(self.stream.fd(), libc::POLLIN, deadline)?,
        }
        Ok(waiting)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send_packed_command(cmd)?;
        self.recv_response()
    }

    /// A pipeline: `offset + count` replies, the last `count` returned. An error reply among
    /// the first `offset` (a transaction's queued commands) fails the whole, as redis-rs does.
    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        self.send_packed_command(cmd)?;
        let mut replies = Vec::with_capacity(count);
        let mut refused = None;
        for index in 0..offset + count {
            let reply = self.recv_response()?;
            if index >= offset {
                replies.push(reply);
            } else if let Value::ServerError(err) = reply {
                refused.get_or_insert(err);
            }
        }
        match refused {
            Some(err) => Err(err.into()),
            None => Ok(replies),
        }
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

/// A handshake command's error reply, in the words redis-rs uses (the Python side and
/// `check --deploy` tell refused credentials and a refused database by them), with Redis' own.
fn refused(command: &'static str, err: RedisError) -> RedisError {
    if err.is_io_error() {
        return err;
    }
    let detail = format!("{} {}", err.code().unwrap_or("error"), err.detail().unwrap_or_default());
    let detail = detail.trim().to_owned();
    match command {
        "AUTH" => RedisError::from((redis::ErrorKind::AuthenticationFailed, "Password authentication failed", detail)),
        _ => RedisError::from((err.kind(), "Redis server refused to switch database", detail)),
    }
}

fn closed() -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::NotConnected, "the connection was closed after an error"))
}

/// Now plus `timeout`; a year on for a timeout too long to add (`None`, `Duration::MAX`).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    /// A connection over one end of a socket pair; the test plays Redis on the other.
    fn over_pair(read_timeout: Duration, window: Duration) -> (Conn, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("a socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        let conn = Conn {
            stream: Stream::Unix(ours),
            buf: Vec::new(),
            scratch: vec![0; CHUNK],
            read_timeout: Cell::new(read_timeout),
            write_timeout: Duration::from_secs(1),
            db: 0,
            open: true,
            busy_poll: Arc::new(BusyPoll::new(window)),
        };
        (conn, theirs)
    }

    fn ping(conn: &mut Conn) -> RedisResult<Value> {
        conn.req_packed_command(&redis::cmd("PING").get_packed_command())
    }

    #[test]
    fn a_reply_that_arrives_in_pieces_is_read_whole_and_the_next_one_kept() {
        let (mut conn, mut redis) = over_pair(Duration::from_secs(5), Duration::from_micros(100));
        let server = std::thread::spawn(move || {
            let mut request = [0u8; 64];
            let _ = redis.read(&mut request).expect("the request");
            // Two replies, the first one a byte at a time: the second must wait for its call.
            for byte in b"*2\r\n$3\r\nabc\r\n$-1\r\n:7\r\n" {
                redis.write_all(&[*byte]).expect("a byte");
                std::thread::sleep(Duration::from_micros(200));
            }
            redis
        });
        let first = ping(&mut conn).expect("the first reply");
        assert_eq!(first, Value::Array(vec![Value::BulkString(b"abc".to_vec()), Value::Nil]));
        let _redis = server.join().expect("the server thread");
        assert_eq!(conn.recv_response().expect("the reply read early"), Value::Int(7));
    }

    #[test]
    fn an_error_reply_leaves_the_connection_usable() {
        let (mut conn, mut redis) = over_pair(Duration::from_secs(5), Duration::ZERO);
        redis.write_all(b"-NOSCRIPT No matching script\r\n+PONG\r\n").expect("replies");
        let refused = ping(&mut conn).expect("a reply").extract_error();
        assert_eq!(refused.map_err(|e| e.code().map(str::to_owned)), Err(Some("NOSCRIPT".to_owned())));
        assert!(conn.is_open());
        assert_eq!(ping(&mut conn).expect("the next reply"), Value::SimpleString("PONG".into()));
    }

    #[test]
    fn a_timed_out_reply_closes_the_connection_so_it_is_never_read_as_the_next_one() {
        let (mut conn, mut redis) = over_pair(Duration::from_millis(30), Duration::from_micros(100));
        let err = ping(&mut conn).expect_err("no reply came");
        assert!(err.is_timeout(), "{err}");
        assert!(!conn.is_open());
        redis.write_all(b"+LATE\r\n").expect("the late reply");
        let err = ping(&mut conn).expect_err("a closed connection sends nothing");
        assert!(crate::errors::is_connectivity(&err), "{err}");
    }

    #[test]
    fn a_reply_that_keeps_trickling_in_is_bounded_by_its_deadline() {
        let (mut conn, mut redis) = over_pair(Duration::from_millis(30), Duration::from_micros(100));
        let server = std::thread::spawn(move || {
            let _ = redis.write_all(b"$100000\r\n");
            for _ in 0..200 {
                // A byte every 2 ms: never silent long enough for a socket timeout per read.
                if redis.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let started = Instant::now();
        let err = ping(&mut conn).expect_err("the reply never completes");
        assert!(err.is_timeout(), "{err}");
        assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
        assert!(!conn.is_open());
        drop(conn);
        server.join().expect("the server thread");
    }

    #[test]
    fn a_wait_that_goes_to_sleep_gives_its_turn_to_poll_back_first() {
        let (mut conn, mut redis) = over_pair(Duration::from_secs(5), Duration::from_micros(100));
        let replier = std::thread::spawn(move || {
            // No reply until every turn can be taken at once (other tests poll too: retried).
            let deadline = Instant::now() + Duration::from_secs(5);
            let free = loop {
                std::thread::sleep(Duration::from_millis(1));
                if BusyPoll::all_turns_free() {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
            };
            redis.write_all(b"+PONG\r\n").expect("the reply");
            free
        });
        assert_eq!(ping(&mut conn).expect("the reply"), Value::SimpleString("PONG".into()));
        assert!(replier.join().expect("the replier"), "a sleeping wait kept its turn to poll");
    }

    #[test]
    fn an_abandoned_connection_is_never_used_again() {
        let (mut conn, _redis) = over_pair(Duration::from_secs(5), Duration::ZERO);
        conn.send_packed_command(b"*1\r\n$4\r\nPING\r\n").expect("sent");
        conn.abandon(); // its reply is owed
        assert!(!conn.is_open());
        assert!(ping(&mut conn).is_err());
    }

    #[test]
    fn a_closed_peer_is_a_dropped_connection() {
        let (mut conn, redis) = over_pair(Duration::from_secs(5), Duration::from_micros(100));
        drop(redis);
        let err = ping(&mut conn).expect_err("the peer is gone");
        assert!(err.is_connection_dropped(), "{err}");
        assert!(!conn.is_open());
    }

    #[test]
    fn a_malformed_reply_closes_the_connection() {
        let (mut conn, mut redis) = over_pair(Duration::from_secs(5), Duration::ZERO);
        redis.write_all(b"?what\r\n").expect("garbage");
        assert!(ping(&mut conn).is_err());
        assert!(!conn.is_open());
    }

    #[test]
    fn a_pipeline_returns_its_replies_after_the_offset() {
        let (mut conn, mut redis) = over_pair(Duration::from_secs(5), Duration::from_micros(100));
        redis.write_all(b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n").expect("replies");
        let replies = conn.req_packed_commands(b"whatever", 2, 1).expect("the replies");
        assert_eq!(replies, vec![Value::Array(vec![Value::Int(1)])]);
        redis.write_all(b"+OK\r\n-ERR queued wrong\r\n*-1\r\n").expect("replies");
        assert!(conn.req_packed_commands(b"whatever", 2, 1).is_err());
    }
}
