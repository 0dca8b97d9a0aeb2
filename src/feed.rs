//! The feed: the tracking listener's subscribed connection (tracking.rs), which carries Redis'
//! invalidations and this process's heartbeats, opened and read by this crate itself.
//!
//! Why not redis-rs: its sync `Connection` neither exposes its socket nor says whether its
//! parser holds bytes it has read, so nothing but the thread reading it could tell that an
//! invalidation is waiting. Here the socket, the bytes read from it and not yet applied, and
//! the TLS state are behind one lock, under one rule: **whoever holds the lock leaves with
//! every byte that was readable applied** (`Inner::drain`: read without blocking until the
//! socket has nothing more, TLS plaintext included, and apply each complete reply). So a
//! request can check, in one `recv` that finds nothing (`Feed::settle`), that no invalidation
//! has reached this process without being applied: the listener thread may not have run for
//! milliseconds on a loaded machine, but the push is in the socket (see tracking.rs for why it
//! is there before the revoking call returns).
//!
//! The connection: plain TCP (`TCP_NODELAY`), a unix socket, or TLS (rustls, verifying the
//! server's certificate and name against the same roots as the pool: `tls_ca_certs` if given,
//! else the system's; this product has no setting that turns verification off and no client
//! certificates). The handshake, by hand: `AUTH` (the pool's credentials), `CLIENT ID`
//! (Sentinel mode: `ROLE`, which must say `master`), then `CLIENT TRACKING ON REDIRECT <id>
//! BCAST PREFIX {prefix}:` and `SUBSCRIBE __redis__:invalidate <heartbeat channel>`, each
//! batch sent at once. Connecting and the TLS handshake are bounded by the pool's connect
//! timeout, each batch's replies by its socket timeout. Then the socket is made non-blocking
//! for good: the listener waits for it with `poll()` (`Feed::wait`), without the lock.
//! No `SELECT`: invalidations and heartbeats don't depend on the database.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{ConnectionAddr, ConnectionInfo, RedisError, RedisResult, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::local::{Local, LIVENESS};
use crate::resp;

/// The channel Redis publishes a RESP2 client's redirected invalidations on.
pub const INVALIDATE: &str = "__redis__:invalidate";
/// What one `recv` asks for.
const CHUNK: usize = 16 * 1024;

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
        let mut stream = connect(target)?;
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
        let replies = round_trip(&mut stream, &mut buf, &first, target.io_timeout)?;
        let mut id = None;
        for ((name, _), reply) in first.iter().zip(replies) {
            match (*name, reply) {
                ("CLIENT ID", Value::Int(value)) => id = Some(value),
                ("AUTH" | "CLIENT ID", _) => {}
                (_, role) => match crate::sentinel::role_name(&role) {
                    Some("master") => {}
                    role => {
                        return Err(io_error(
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
        round_trip(&mut stream, &mut buf, &second, target.io_timeout)?;
        // SUBSCRIBE confirms each channel in a reply of its own: the second one is read here.
        let deadline = Instant::now() + target.io_timeout;
        read_reply(&mut stream, &mut buf, deadline)
            .and_then(Value::extract_error)
            .map_err(|e| context("SUBSCRIBE", e))?;
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

/// The roots to verify a `rediss://` server with, as the pool does (redis-rs): the PEM
/// `root_cert` alone if given, else the system's (any error loading them is an error, as
/// there).
pub fn tls_config(root_cert: Option<&[u8]>) -> io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    if let Some(pem) = root_cert {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| io::Error::other(format!("unable to parse root certificate PEM: {e}")))?;
            roots.add(cert).map_err(|e| io::Error::other(format!("unable to use a root certificate: {e}")))?;
        }
    } else {
        let loaded = rustls_native_certs::load_native_certs();
        if let Some(err) = loaded.errors.into_iter().next() {
            return Err(io::Error::other(format!("loading the system's root certificates: {err}")));
        }
        for cert in loaded.certs {
            roots.add(cert).map_err(|e| io::Error::other(format!("unable to use a root certificate: {e}")))?;
        }
    }
    Ok(Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

fn connect(target: &Target<'_>) -> RedisResult<Stream> {
    let deadline = Instant::now() + target.connect_timeout;
    let stream = match target.info.addr() {
        ConnectionAddr::Tcp(host, port) => Stream::Tcp(tcp(host, *port, deadline)?),
        // `insecure` is never set by this product (client.rs, sentinel.rs): always verified.
        ConnectionAddr::TcpTls { host, port, .. } => {
            let Some(config) = &target.tls else {
                return Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "TLS without a configuration")));
            };
            let name = ServerName::try_from(host.clone()).map_err(|e| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "not a TLS server name", e.to_string()))
            })?;
            let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
            let mut tls = Tls { conn, sock: tcp(host, *port, deadline)?, records: Records::default() };
            while tls.conn.is_handshaking() {
                tls.sock.set_read_timeout(Some(left(deadline)?))?;
                tls.sock.set_write_timeout(Some(left(deadline)?))?;
                tls.conn.complete_io(&mut Counted { sock: &mut tls.sock, records: &mut tls.records }).map_err(|e| {
                    match e.kind() {
                        io::ErrorKind::WouldBlock => timed_out(),
                        _ => RedisError::from(e),
                    }
                })?;
            }
            Stream::Tls(Box::new(tls))
        }
        ConnectionAddr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        _ => return Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "unsupported address"))),
    };
    stream.set_write_timeout(Some(target.io_timeout))?;
    Ok(stream)
}

fn tcp(host: &str, port: u16, deadline: Instant) -> RedisResult<TcpStream> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, left(deadline)?) {
            Ok(sock) => {
                sock.set_nodelay(true)?;
                return Ok(sock);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.map_or_else(
        || io_error(io::ErrorKind::NotFound, format!("{host}:{port} resolves to no address")),
        RedisError::from,
    ))
}

/// Send `commands` at once and read one reply each (within `io_timeout`); an error reply is
/// an error that names its command.
fn round_trip(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    commands: &[(&'static str, redis::Cmd)],
    io_timeout: Duration,
) -> RedisResult<Vec<Value>> {
    let packed: Vec<u8> = commands.iter().flat_map(|(_, cmd)| cmd.get_packed_command()).collect();
    stream.send(&packed)?;
    let deadline = Instant::now() + io_timeout;
    let mut replies = Vec::with_capacity(commands.len());
    for (name, _) in commands {
        let reply = read_reply(stream, buf, deadline).and_then(Value::extract_error).map_err(|e| context(name, e))?;
        replies.push(reply);
    }
    Ok(replies)
}

fn read_reply(stream: &mut Stream, buf: &mut Vec<u8>, deadline: Instant) -> RedisResult<Value> {
    let mut scratch = vec![0; CHUNK];
    loop {
        let complete = resp::frame_len(buf).map_err(|e| {
            RedisError::from((redis::ErrorKind::UnexpectedReturnType, "tracking connection", e.to_string()))
        })?;
        if let Some(len) = complete {
            let value = redis::parse_redis_value(&buf[..len])?;
            buf.drain(..len);
            return Ok(value);
        }
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.receive(buf, &mut scratch) {
            Ok(0) => return Err(io_error(io::ErrorKind::UnexpectedEof, "connection closed by the server".into())),
            Ok(_) => {}
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(timed_out())
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
}

/// What is left until `deadline`; a timeout error once it has passed.
fn left(deadline: Instant) -> RedisResult<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(timed_out)
}

fn timed_out() -> RedisError {
    io_error(io::ErrorKind::TimedOut, "timed out opening the tracking connection".into())
}

fn io_error(kind: io::ErrorKind, message: String) -> RedisError {
    RedisError::from(io::Error::new(kind, message))
}

/// An error reply, or a failure, naming the command it answered (never its arguments: AUTH's
/// are secret).
fn context(command: &'static str, err: RedisError) -> RedisError {
    if err.is_io_error() {
        return err;
    }
    let detail = format!("{} {}", err.code().unwrap_or("error"), err.detail().unwrap_or_default());
    RedisError::from((err.kind(), command, detail.trim().to_owned()))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<Tls>),
}

struct Tls {
    conn: ClientConnection,
    sock: TcpStream,
    records: Records,
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(sock) => sock.as_raw_fd(),
            Stream::Unix(sock) => sock.as_raw_fd(),
            Stream::Tls(tls) => tls.sock.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_nonblocking(on),
            Stream::Unix(sock) => sock.set_nonblocking(on),
            Stream::Tls(tls) => tls.sock.set_nonblocking(on),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_read_timeout(timeout),
            Stream::Unix(sock) => sock.set_read_timeout(timeout),
            Stream::Tls(tls) => tls.sock.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_write_timeout(timeout),
            Stream::Unix(sock) => sock.set_write_timeout(timeout),
            Stream::Tls(tls) => tls.sock.set_write_timeout(timeout),
        }
    }

    /// Blocking (handshake only).
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.write_all(bytes),
            Stream::Unix(sock) => sock.write_all(bytes),
            Stream::Tls(tls) => {
                tls.conn.writer().write_all(bytes)?;
                while tls.conn.wants_write() {
                    tls.conn.write_tls(&mut tls.sock)?;
                }
                Ok(())
            }
        }
    }

    /// Append what can be read now to `buf`: `Ok(0)` once the peer has closed, `WouldBlock`
    /// when nothing is waiting (a non-blocking socket) or the read timed out (a blocking one).
    /// TLS: plaintext rustls already holds first, then records from the socket.
    fn receive(&mut self, buf: &mut Vec<u8>, scratch: &mut [u8]) -> io::Result<usize> {
        let n = match self {
            Stream::Tcp(sock) => sock.read(scratch)?,
            Stream::Unix(sock) => sock.read(scratch)?,
            Stream::Tls(tls) => loop {
                match tls.conn.reader().read(scratch) {
                    Ok(n) => break n, // 0: the server closed the session (close_notify)
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
                let read = tls.conn.read_tls(&mut Counted { sock: &mut tls.sock, records: &mut tls.records })?;
                if read == 0 {
                    return Ok(0);
                }
                let state =
                    tls.conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if state.tls_bytes_to_write() > 0 {
                    // Not expected from Redis (a key update, an alert); sent if the socket takes it.
                    match tls.conn.write_tls(&mut tls.sock) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        written => {
                            written?;
                        }
                    }
                }
            },
        };
        buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    }

    /// TLS: has a record begun to arrive and not all of it (rustls keeps those bytes where
    /// nothing else can see them)?
    fn partial(&self) -> bool {
        match self {
            Stream::Tls(tls) => tls.records.partial(),
            _ => false,
        }
    }
}

/// Where the TLS records read from the socket begin and end: each is a 5-byte header (type,
/// version, length) and that many bytes.
#[derive(Default)]
struct Records {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Records {
    fn saw(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 5 {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_len = 0;
            }
        }
    }

    fn partial(&self) -> bool {
        self.header_len > 0 || self.body_left > 0
    }
}

/// The socket as rustls reads it, with each byte counted into `records`.
struct Counted<'a> {
    sock: &'a mut TcpStream,
    records: &'a mut Records,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.records.saw(&buf[..n]);
        Ok(n)
    }
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_are_followed_across_reads() {
        let mut records = Records::default();
        assert!(!records.partial());
        records.saw(&[23, 3, 3]);
        assert!(records.partial());
        records.saw(&[0, 4, 1, 2]);
        assert!(records.partial());
        records.saw(&[3, 4, 23, 3, 3, 0, 0, 23]);
        assert!(records.partial()); // an empty record, then a new header begun
        records.saw(&[3, 3, 0, 1, 9]);
        assert!(!records.partial());
    }
}
