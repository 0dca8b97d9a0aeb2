//! A connection's byte stream, opened and read by this crate itself: plain TCP (`TCP_NODELAY`),
//! a unix socket, or TLS (rustls, verifying the server's certificate and name against
//! `tls_ca_certs` if given, else the system's roots; this product has no setting that turns
//! verification off and no client certificates). Connecting and the TLS handshake are bounded
//! by the connect timeout.
//!
//! Two users: the tracking listener's feed (feed.rs), and every pooled connection (conn.rs).
//! Why not redis-rs' `Connection`: it neither exposes its socket nor says whether its parser
//! holds bytes it has read, so a reader can't poll it, and nothing else could tell that an
//! invalidation is waiting.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, RedisError, RedisResult, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::resp;

/// What one `recv` asks for.
pub const CHUNK: usize = 16 * 1024;

/// The roots to verify a `rediss://` server with, as redis-rs does for the sentinels' own
/// connections: the PEM `root_cert` alone if given, else the system's (any error loading them
/// is an error, as there).
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

impl Stream {
    /// Connect (and for TLS, complete the handshake) within `connect_timeout`; writes then
    /// time out after `io_timeout`. The socket is blocking until `set_nonblocking`.
    pub fn connect(
        info: &ConnectionInfo,
        tls: Option<&Arc<ClientConfig>>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> RedisResult<Stream> {
        let deadline = Instant::now() + connect_timeout;
        let stream = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Stream::Tcp(tcp(host, *port, deadline)?),
            // `insecure` is never set by this product (client.rs, sentinel.rs): always verified.
            ConnectionAddr::TcpTls { host, port, .. } => {
                let Some(config) = tls else {
                    return Err(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "TLS without a configuration",
                    )));
                };
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    RedisError::from((redis::ErrorKind::InvalidClientConfig, "not a TLS server name", e.to_string()))
                })?;
                let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
                let mut tls = Tls { conn, sock: tcp(host, *port, deadline)?, records: Records::default() };
                while tls.conn.is_handshaking() {
                    // Each read and write of the handshake within what is left (a server that
                    // trickles its bytes can't stretch it).
                    let mut sock = Counted { sock: &mut tls.sock, records: &mut tls.records, deadline: Some(deadline) };
                    tls.conn.complete_io(&mut sock).map_err(|e| match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
                        _ => RedisError::from(e),
                    })?;
                }
                Stream::Tls(Box::new(tls))
            }
            ConnectionAddr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            _ => return Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "unsupported address"))),
        };
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(stream)
    }
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
pub fn round_trip(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    commands: &[(&'static str, redis::Cmd)],
    io_timeout: Duration,
) -> RedisResult<Vec<Value>> {
    let packed: Vec<u8> = commands.iter().flat_map(|(_, cmd)| cmd.get_packed_command()).collect();
    let deadline = Instant::now() + io_timeout;
    stream.send_within(&packed, deadline)?;
    let mut replies = Vec::with_capacity(commands.len());
    for (name, _) in commands {
        let reply = read_reply(stream, buf, deadline).and_then(Value::extract_error).map_err(|e| context(name, e))?;
        replies.push(reply);
    }
    Ok(replies)
}

pub fn read_reply(stream: &mut Stream, buf: &mut Vec<u8>, deadline: Instant) -> RedisResult<Value> {
    let mut scratch = vec![0; CHUNK];
    loop {
        let complete = resp::frame_len(buf)
            .map_err(|e| RedisError::from((redis::ErrorKind::UnexpectedReturnType, "connection", e.to_string())))?;
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
pub fn left(deadline: Instant) -> RedisResult<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(timed_out)
}

/// A reply that didn't come within its deadline.
pub fn timed_out_reading() -> RedisError {
    RedisError::from(no_reply())
}

fn no_reply() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no reply within the socket timeout")
}

pub fn timed_out() -> RedisError {
    io_error(io::ErrorKind::TimedOut, "timed out opening a connection".into())
}

pub fn io_error(kind: io::ErrorKind, message: String) -> RedisError {
    RedisError::from(io::Error::new(kind, message))
}

/// An error reply, or a failure, naming the command it answered (never its arguments: AUTH's
/// are secret).
pub fn context(command: &'static str, err: RedisError) -> RedisError {
    if err.is_io_error() {
        return err;
    }
    let detail = format!("{} {}", err.code().unwrap_or("error"), err.detail().unwrap_or_default());
    RedisError::from((err.kind(), command, detail.trim().to_owned()))
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<Tls>),
}

pub struct Tls {
    conn: ClientConnection,
    sock: TcpStream,
    records: Records,
}

impl Stream {
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(sock) => sock.as_raw_fd(),
            Stream::Unix(sock) => sock.as_raw_fd(),
            Stream::Tls(tls) => tls.sock.as_raw_fd(),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_nonblocking(on),
            Stream::Unix(sock) => sock.set_nonblocking(on),
            Stream::Tls(tls) => tls.sock.set_nonblocking(on),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_read_timeout(timeout),
            Stream::Unix(sock) => sock.set_read_timeout(timeout),
            Stream::Tls(tls) => tls.sock.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(sock) => sock.set_write_timeout(timeout),
            Stream::Unix(sock) => sock.set_write_timeout(timeout),
            Stream::Tls(tls) => tls.sock.set_write_timeout(timeout),
        }
    }

    /// Send all of `bytes` by `deadline`, on a blocking or a non-blocking socket (waiting in
    /// `poll()` while it takes nothing). TLS: rustls takes the plaintext, then its records go.
    pub fn send_within(&mut self, bytes: &[u8], deadline: Instant) -> io::Result<()> {
        let fd = self.fd();
        match self {
            Stream::Tcp(sock) => write_within(sock, fd, bytes, deadline),
            Stream::Unix(sock) => write_within(sock, fd, bytes, deadline),
            Stream::Tls(_) if bytes.is_empty() => Ok(()),
            Stream::Tls(tls) => {
                let mut rest = bytes;
                loop {
                    // rustls takes at most 64 KiB of plaintext before its records are sent:
                    // what it takes, then its records, until all of it is out.
                    let taken = tls.conn.writer().write(rest)?;
                    rest = &rest[taken..];
                    if taken == 0 && !tls.conn.wants_write() {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS took no bytes"));
                    }
                    while tls.conn.wants_write() {
                        match tls.conn.write_tls(&mut tls.sock) {
                            Ok(_) => {}
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                                wait_until(fd, libc::POLLOUT, deadline)?;
                            }
                            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                            Err(err) => return Err(err),
                        }
                    }
                    if rest.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Append what can be read now to `buf`: `Ok(0)` once the peer has closed, `WouldBlock`
    /// when nothing is waiting (a non-blocking socket) or the read timed out (a blocking one).
    /// TLS: plaintext rustls already holds first, then records from the socket.
    pub fn receive(&mut self, buf: &mut Vec<u8>, scratch: &mut [u8]) -> io::Result<usize> {
        let n = match self {
            Stream::Tcp(sock) => sock.read(scratch)?,
            Stream::Unix(sock) => sock.read(scratch)?,
            Stream::Tls(tls) => loop {
                match tls.conn.reader().read(scratch) {
                    Ok(n) => break n, // 0: the server closed the session (close_notify)
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
                let read = tls.conn.read_tls(&mut Counted {
                    sock: &mut tls.sock,
                    records: &mut tls.records,
                    deadline: None,
                })?;
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
    pub fn partial(&self) -> bool {
        match self {
            Stream::Tls(tls) => tls.records.partial(),
            _ => false,
        }
    }
}

fn write_within(sock: &mut impl Write, fd: RawFd, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        match sock.write(bytes) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the connection took no bytes")),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => wait_until(fd, libc::POLLOUT, deadline)?,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Wait in `poll()` until `fd` is ready for `events` (or has failed, or was closed: the next
/// read or write says which); a `TimedOut` error once `deadline` has passed.
pub fn wait_until(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            return Err(no_reply());
        };
        // Rounded up: a wait of less than a millisecond must not be a zero-timeout poll.
        let ms = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        let mut pollfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd, for a descriptor its stream owns while this runs.
        match unsafe { libc::poll(&mut pollfd, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => {}
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
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
    /// The handshake's: each read and write (of a blocking socket) waits only what is left.
    deadline: Option<Instant>,
}

impl Counted<'_> {
    fn within_deadline(&self) -> io::Result<()> {
        let Some(deadline) = self.deadline else { return Ok(()) };
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake took too long"))?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.set_write_timeout(Some(left))
    }
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.within_deadline()?;
        let n = self.sock.read(buf)?;
        self.records.saw(&buf[..n]);
        Ok(n)
    }
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.within_deadline()?;
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
