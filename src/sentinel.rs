//! Redis Sentinel: which node is the primary of a service, asked of the sentinels under this
//! client's own timeouts (redis-rs' `SentinelClient` has none: a silent sentinel blocks it for
//! seconds), and checked before use: a new connection is used only once the node itself
//! answers `ROLE` with `master`. A replica is never used, whatever a sentinel says.
//!
//! The answer is kept, and asked again:
//! - at once when a connection to the primary fails, or its `ROLE` is not `master`
//!   (`Resolver::connect`), or a command on it answers `READONLY` (`Resolver::resolve_now`);
//! - on the next use after `RECHECK` (`Resolver::refresh`): a primary cut off from the
//!   sentinels, replaced by a failover on the other side, may go on answering as a primary
//!   (no `READONLY`, no error) and only the sentinels can tell. While none answers, this
//!   backs off to every `RECHECK_MAX`.
//!
//! A primary is *confirmed* only when a majority of the configured sentinels (`n / 2 + 1`)
//! name it in one asking: a sentinel stranded with the old primary on a minority side goes on
//! naming it, and must not be believed. One answer is enough to find a node to connect to
//! (when none is known, or the known one fails or stepped down; always `ROLE`-checked), never
//! to confirm it. Confirmations are kept with the primary's generation: they settle only the
//! revocations sent to that primary (journal.rs).
//!
//! A primary not confirmed for `TRUSTED_FOR` (the sentinels unreachable or split: this process
//! may be on the old primary's side of a partition while a new one takes the revocations) is
//! not trusted: lookups don't read it (`Resolver::trusted`; they fail as if Redis were down,
//! and the Python side falls back to the database), and the in-process cache's listener ends
//! its session (flushing the cache). Revocations are still sent to it, and journaled.
//!
//! One thread asks at a time; the others go on with the primary known meanwhile (`refresh`)
//! or wait for the answer (`connect` after a failure). The sentinels are asked in turn (the
//! last one that answered first) until a majority agree: each asking costs at most, per
//! sentinel, one connect timeout and one socket timeout.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, RedisError, RedisResult,
    TlsCertificates,
};

use crate::conn::Conn;

/// How long a primary's address is used before the sentinels are asked again.
pub const RECHECK: Duration = Duration::from_secs(1);
/// How long after the last majority confirmation a primary is trusted for lookups: three
/// re-checks (`RECHECK`), so that one or two lost askings cost nothing.
pub const TRUSTED_FOR: Duration = Duration::from_secs(3);
/// While no majority answers, the re-check backs off, doubling up to this (each try may cost
/// a call a connect timeout per sentinel).
const RECHECK_MAX: Duration = Duration::from_secs(8);

/// The sentinels of one service, and how to talk to them (their credentials and TLS may differ
/// from the data nodes').
#[derive(Clone)]
pub struct SentinelConfig {
    pub sentinels: Vec<(String, u16)>,
    pub service_name: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    /// PEM roots to trust for the sentinels' certificates, instead of the system's.
    pub root_cert: Option<Vec<u8>>,
}

/// A primary as the sentinels named it, and a client for it.
#[derive(Clone)]
struct Primary {
    host: String,
    port: u16,
    client: Client,
    /// Bumped each time the sentinels name another node: connections opened to an older one
    /// are not reused.
    generation: u64,
}

#[derive(Default)]
struct State {
    primary: Option<Primary>,
    /// When the sentinels were last asked (answered or not).
    asked_at: Option<Instant>,
    /// When a majority of them last named a primary, and its generation.
    confirmed: Option<(u64, Instant)>,
    /// Ask again on the next use: a connection to the primary was lost.
    due: bool,
    /// How many times they have been asked: a thread that saw a failure asks again only if no
    /// other thread has since.
    askings: u64,
    /// Askings in a row that no majority answered.
    unanswered: u32,
}

pub struct Resolver {
    service: String,
    sentinels: Vec<(String, Client)>,
    /// The data nodes' settings (database, credentials, TLS); the address is the sentinels'.
    node: ConnectionInfo,
    node_root_cert: Option<Vec<u8>>,
    connect_timeout: Duration,
    io_timeout: Duration,
    state: Mutex<State>,
    /// Held while asking the sentinels (network I/O): never while holding `state`.
    asking: Mutex<()>,
    /// The sentinel that answered last: asked first next time.
    preferred: AtomicUsize,
    generation: AtomicU64,
}

impl Resolver {
    /// Builds a client per sentinel; connects to nothing.
    pub fn new(
        config: SentinelConfig,
        node: ConnectionInfo,
        node_root_cert: Option<Vec<u8>>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> RedisResult<Self> {
        if config.sentinels.is_empty() {
            return Err(invalid("no sentinels given"));
        }
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(username) = &config.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &config.password {
            settings = settings.set_password(password);
        }
        let mut sentinels = Vec::with_capacity(config.sentinels.len());
        for (host, port) in config.sentinels {
            let addr = if config.tls {
                ConnectionAddr::TcpTls { host: host.clone(), port, insecure: false, tls_params: None }
            } else {
                ConnectionAddr::Tcp(host.clone(), port)
            };
            let info = addr.into_connection_info()?.set_redis_settings(settings.clone());
            sentinels.push((format!("{host}:{port}"), client(info, config.root_cert.as_ref())?));
        }
        Ok(Resolver {
            service: config.service_name,
            sentinels,
            node,
            node_root_cert,
            connect_timeout,
            io_timeout,
            state: Mutex::new(State::default()),
            asking: Mutex::new(()),
            preferred: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
        })
    }

    /// A new connection to the primary, verified by `ROLE`, and the generation it belongs to.
    /// `open` connects with the pool's timeouts. If the known primary can't be reached or is
    /// no longer one, the sentinels are asked again and their answer tried once (a majority's,
    /// else the node most of those that answered name).
    pub fn connect(&self, open: impl Fn(&Client) -> RedisResult<Conn>) -> RedisResult<(Conn, u64)> {
        let (primary, askings) = self.known_or_asked()?;
        let first = match self.open_verified(&primary, &open) {
            Ok(conn) => return Ok((conn, primary.generation)),
            Err(err) => err,
        };
        let fresh = match self.ask_unless_asked_since(askings) {
            Ok(fresh) => fresh,
            Err(again) => return Err(unavailable(format!("{first}; asking the sentinels again: {again}"))),
        };
        if fresh.generation == primary.generation {
            return Err(first); // they still name it: no primary to use until a failover ends
        }
        self.open_verified(&fresh, &open).map(|conn| (conn, fresh.generation))
    }

    /// On each use of the pool: after `RECHECK` (or sooner after a lost connection), ask the
    /// sentinels whether the primary is still the one they name. One thread asks; the others
    /// don't wait. Without a majority the known primary is kept (connections to it still
    /// verify), unconfirmed: after `TRUSTED_FOR` lookups no longer read it.
    pub fn refresh(&self) {
        {
            let state = self.state.lock();
            let interval = (RECHECK * 2u32.pow(state.unanswered.min(3))).min(RECHECK_MAX);
            let fresh = state.asked_at.is_some_and(|at| at.elapsed() < interval);
            if fresh && !state.due {
                return;
            }
        }
        if let Some(_asking) = self.asking.try_lock() {
            let _ = self.ask_and_store(false);
        }
    }

    /// A command answered READONLY: the node stepped down. Ask the sentinels now (waiting for
    /// a thread already asking).
    pub fn resolve_now(&self) {
        let askings = self.state.lock().askings;
        let _ = self.ask_unless_asked_since(askings);
    }

    /// A connection to the primary failed: ask the sentinels on the next use.
    pub fn mark_due(&self) {
        self.state.lock().due = true;
    }

    /// Changes whenever the sentinels name another node.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When a majority of the sentinels last named a primary, and its generation.
    pub fn confirmed(&self) -> Option<(u64, Instant)> {
        self.state.lock().confirmed
    }

    /// May lookups read the primary of `generation`: is it the current one, confirmed by a
    /// majority of the sentinels within `TRUSTED_FOR`?
    pub fn trusted(&self, generation: u64) -> bool {
        let state = self.state.lock();
        let current = state.primary.as_ref().is_some_and(|p| p.generation == generation);
        current && state.confirmed.is_some_and(|(g, at)| g == generation && at.elapsed() < TRUSTED_FOR)
    }

    /// The generation of the primary known now, if any.
    pub fn known_generation(&self) -> Option<u64> {
        self.state.lock().primary.as_ref().map(|p| p.generation)
    }

    /// The primary known now (its connection settings and generation), for a connection opened
    /// by other means than `connect` (tracking.rs' feed), which verifies `ROLE` itself.
    pub fn current(&self) -> Option<(ConnectionInfo, u64)> {
        self.state.lock().primary.as_ref().map(|p| (p.client.get_connection_info().clone(), p.generation))
    }

    /// `host:port` of the primary last named, if any.
    pub fn primary(&self) -> Option<String> {
        self.state.lock().primary.as_ref().map(|p| format!("{}:{}", p.host, p.port))
    }

    fn known_or_asked(&self) -> RedisResult<(Primary, u64)> {
        let askings = {
            let state = self.state.lock();
            if let Some(primary) = &state.primary {
                return Ok((primary.clone(), state.askings));
            }
            state.askings
        };
        let primary = self.ask_unless_asked_since(askings)?;
        let askings = self.state.lock().askings;
        Ok((primary, askings))
    }

    /// Ask the sentinels, unless another thread has since `askings`: then use its outcome,
    /// answered or not (so a call waits for at most the one asking in flight, never for a
    /// queue of them behind hung sentinels).
    fn ask_unless_asked_since(&self, askings: u64) -> RedisResult<Primary> {
        let _asking = self.asking.lock();
        {
            let state = self.state.lock();
            if state.askings != askings {
                return match &state.primary {
                    Some(primary) => Ok(primary.clone()),
                    None => Err(unavailable(format!(
                        "no sentinel named the primary of {:?} when last asked (by another call, just now)",
                        self.service
                    ))),
                };
            }
        }
        self.ask_and_store(true)
    }

    /// Ask the sentinels (see `ask_sentinels`). A majority's answer confirms the primary it
    /// names (a new one gets a new generation). Without a majority, the known primary is kept
    /// (unconfirmed) unless `switch` (it failed, or none is known) and those that answered
    /// name another node: then that one is the candidate, unconfirmed. The caller holds
    /// `asking`.
    fn ask_and_store(&self, switch: bool) -> RedisResult<Primary> {
        let answer = self.ask_sentinels();
        let known = {
            let mut state = self.state.lock();
            state.askings += 1;
            state.asked_at = Some(Instant::now());
            state.due = false;
            let majority = answer.as_ref().is_ok_and(|answer| answer.majority);
            state.unanswered = if majority { 0 } else { state.unanswered.saturating_add(1) };
            state.primary.clone()
        };
        let Answer { host, port, majority } = answer?;
        let same = known.as_ref().is_some_and(|p| p.host == host && p.port == port);
        if let Some(primary) = known.filter(|_| same || !(majority || switch)) {
            if same && majority {
                self.state.lock().confirmed = Some((primary.generation, Instant::now()));
            }
            return Ok(primary);
        }
        let addr = match self.node.addr() {
            ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                ConnectionAddr::TcpTls { host: host.clone(), port, insecure: *insecure, tls_params: tls_params.clone() }
            }
            _ => ConnectionAddr::Tcp(host.clone(), port),
        };
        let client = client(self.node.clone().set_addr(addr), self.node_root_cert.as_ref())?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let primary = Primary { host, port, client, generation };
        let mut state = self.state.lock();
        state.primary = Some(primary.clone());
        if majority {
            state.confirmed = Some((generation, Instant::now()));
        }
        Ok(primary)
    }

    /// Ask the sentinels in turn (the last one that answered first), until a majority of them
    /// (`n / 2 + 1`) name the same node, or all have been asked: that node, or else the one
    /// named most often (the first named, on a tie), unconfirmed.
    fn ask_sentinels(&self) -> RedisResult<Answer> {
        let count = self.sentinels.len();
        let needed = count / 2 + 1;
        let start = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::with_capacity(count);
        let mut named: Vec<((String, u16), usize)> = Vec::with_capacity(count);
        let mut answered = false;
        for index in (start..count).chain(0..start) {
            let (name, client) = &self.sentinels[index];
            match self.ask(client) {
                Ok(Some(addr)) => {
                    if !answered {
                        self.preferred.store(index, Ordering::Relaxed);
                        answered = true;
                    }
                    let votes = if let Some((_, votes)) = named.iter_mut().find(|(known, _)| *known == addr) {
                        *votes += 1;
                        *votes
                    } else {
                        named.push((addr.clone(), 1));
                        1
                    };
                    if votes >= needed {
                        let (host, port) = addr;
                        return Ok(Answer { host, port, majority: true });
                    }
                }
                Ok(None) => failures.push(format!("{name}: knows no primary named {:?}", self.service)),
                Err(err) => failures.push(format!("{name}: {err}")),
            }
        }
        let mut best: Option<&((String, u16), usize)> = None;
        for entry in &named {
            if !best.is_some_and(|(_, votes)| *votes >= entry.1) {
                best = Some(entry);
            }
        }
        match best {
            Some(((host, port), _)) => Ok(Answer { host: host.clone(), port: *port, majority: false }),
            None => Err(unavailable(format!(
                "no sentinel named the primary of {:?} ({})",
                self.service,
                failures.join("; ")
            ))),
        }
    }

    fn ask(&self, sentinel: &Client) -> RedisResult<Option<(String, u16)>> {
        let mut conn = sentinel.get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(self.io_timeout))?;
        conn.set_write_timeout(Some(self.io_timeout))?;
        let reply: Option<(String, String)> =
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(&self.service).query(&mut conn)?;
        let Some((host, port)) = reply else { return Ok(None) };
        match port.parse::<u16>() {
            Ok(port) => Ok(Some((host, port))),
            Err(_) => Err(invalid_reply(format!("a port that is not one: {port:?}"))),
        }
    }

    fn open_verified(&self, primary: &Primary, open: impl Fn(&Client) -> RedisResult<Conn>) -> RedisResult<Conn> {
        let mut conn = open(&primary.client)?;
        let role: redis::Value = redis::cmd("ROLE").query(&mut conn).map_err(|err| {
            if crate::errors::is_connectivity(&err) {
                err
            } else {
                // Refused (an ACL without +role): say which command, for the operator.
                let detail = format!("{} {}", err.code().unwrap_or("error"), err.detail().unwrap_or_default());
                RedisError::from((err.kind(), "ROLE (sent on each new connection in Sentinel mode) failed", detail))
            }
        })?;
        match role_name(&role) {
            Some("master") => Ok(conn),
            role => Err(unavailable(format!(
                "the sentinels name {}:{} as the primary of {:?}, but it reports role {:?}: not used",
                primary.host,
                primary.port,
                self.service,
                role.unwrap_or("unknown"),
            ))),
        }
    }
}

/// What the sentinels asked named.
struct Answer {
    host: String,
    port: u16,
    /// Named by a majority of the configured sentinels: a confirmation.
    majority: bool,
}

/// The first element of a `ROLE` reply: "master", "slave" or "sentinel".
pub(crate) fn role_name(reply: &redis::Value) -> Option<&str> {
    let redis::Value::Array(items) = reply else { return None };
    match items.first()? {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        redis::Value::SimpleString(text) => Some(text.as_str()),
        _ => None,
    }
}

/// Did the command fail because the node is a replica now (READONLY, also as Redis 6.2 words
/// it from inside a script)?
pub fn is_read_only(err: &RedisError) -> bool {
    err.code() == Some("READONLY") || err.to_string().contains("READONLY")
}

fn client(info: ConnectionInfo, root_cert: Option<&Vec<u8>>) -> RedisResult<Client> {
    match root_cert {
        Some(root_cert) => {
            Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(root_cert.clone()) })
        }
        None => Client::open(info),
    }
}

/// No primary can be used right now: an I/O error, so the breaker and the Python side treat it
/// as Redis being unreachable (lookups fall back, revocations answer 503).
fn unavailable(message: String) -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::NotConnected, message))
}

fn invalid(message: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, message))
}

fn invalid_reply(message: String) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, "unexpected sentinel reply", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names() {
        let reply = |first: redis::Value| redis::Value::Array(vec![first, redis::Value::Int(0)]);
        assert_eq!(role_name(&reply(redis::Value::BulkString(b"master".to_vec()))), Some("master"));
        assert_eq!(role_name(&reply(redis::Value::BulkString(b"slave".to_vec()))), Some("slave"));
        assert_eq!(role_name(&reply(redis::Value::SimpleString("sentinel".into()))), Some("sentinel"));
        assert_eq!(role_name(&redis::Value::Nil), None);
        assert_eq!(role_name(&redis::Value::Array(vec![])), None);
    }

    #[test]
    fn no_sentinels_is_a_configuration_error() {
        let config = SentinelConfig {
            sentinels: vec![],
            service_name: "mymaster".into(),
            username: None,
            password: None,
            tls: false,
            root_cert: None,
        };
        let node = ConnectionAddr::Tcp("127.0.0.1".into(), 6379).into_connection_info();
        let built = node
            .and_then(|node| Resolver::new(config, node, None, Duration::from_millis(100), Duration::from_millis(100)));
        assert!(built.is_err());
    }
}
