//! A small connection pool: idle connections in a `Mutex<Vec<_>>`, each tagged with the pid
//! that opened it. A connection inherited through `fork()` is never used by the child (its
//! replies would interleave with the parent's); it is only closed there. In Sentinel mode each
//! is also tagged with the primary it was opened to (`sentinel.rs`): once the sentinels name
//! another, connections to the old one are closed, not reused. Each also carries the
//! incarnation of the server it goes to (incarnation.rs), learned once when it is opened.
//! The connections are this crate's own (conn.rs), which wait for replies as `BUSY_POLL_US`
//! says; one `BusyPoll` per pool, so its back-off follows that server's distance.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::{Client, ConnectionAddr, ConnectionInfo, RedisResult, TlsCertificates};
use rustls::ClientConfig;

use crate::breaker::Breaker;
use crate::busy_poll::BusyPoll;
use crate::conn::Conn;
use crate::incarnation::{self, Server};
use crate::metrics::{Counter, PROCESS};
use crate::sentinel::{Resolver, SentinelConfig};

#[derive(Clone)]
pub struct PoolConfig {
    /// The server; in Sentinel mode, the data nodes' settings (database, credentials, TLS),
    /// whose address the sentinels give.
    pub info: ConnectionInfo,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub max_idle: usize,
    /// PEM roots to trust instead of the system's, for `rediss://` with a private CA.
    pub root_cert: Option<Vec<u8>>,
    /// Connect to the primary these sentinels name, not to `info`'s address.
    pub sentinel: Option<SentinelConfig>,
    /// The cool-down of this pool's circuit breaker (0: never opens).
    pub breaker_cooldown_ms: u64,
    /// How long a connection polls for a reply before it sleeps (`busy_poll.rs`; 0: never).
    pub busy_poll: Duration,
}

struct Idle {
    conn: Conn,
    pid: u32,
    generation: u64,
    server: Server,
}

pub struct Pool {
    connector: Connector,
    /// Calls to this server fail fast for a cool-down after one failed (on a Cluster, each
    /// node has its own: a hung node costs the others nothing).
    breaker: Breaker,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

/// Opens connections with the pool's settings and timeouts (also for the tracking listener):
/// to the configured server, or to the primary the sentinels name.
#[derive(Clone)]
pub struct Connector {
    route: Route,
    connect_timeout: Duration,
    io_timeout: Duration,
    /// The data nodes' PEM roots (`PoolConfig::root_cert`).
    root_cert: Option<Arc<Vec<u8>>>,
    /// `rediss://`: the TLS settings built from them, once (loading the system's roots is slow).
    tls: Arc<Mutex<Option<Arc<ClientConfig>>>>,
    busy_poll: Arc<BusyPoll>,
}

#[derive(Clone)]
enum Route {
    Fixed(Box<Client>),
    Sentinel(Arc<Resolver>),
}

impl Connector {
    pub fn connect(&self) -> RedisResult<Conn> {
        self.connect_tagged().map(|(conn, _)| conn)
    }

    /// A new connection and the generation of the primary it goes to (always 0 without Sentinel).
    pub fn connect_tagged(&self) -> RedisResult<(Conn, u64)> {
        match &self.route {
            Route::Fixed(client) => self.open(client).map(|conn| (conn, 0)),
            Route::Sentinel(resolver) => resolver.connect(|client| self.open(client)),
        }
    }

    fn open(&self, client: &Client) -> RedisResult<Conn> {
        let info = client.get_connection_info();
        let tls = match info.addr() {
            ConnectionAddr::TcpTls { .. } => Some(self.tls_config()?),
            _ => None,
        };
        let conn = Conn::open(info, tls.as_ref(), self.connect_timeout, self.io_timeout, Arc::clone(&self.busy_poll))?;
        PROCESS.bump(Counter::ConnectionOpened);
        Ok(conn)
    }

    /// The TLS settings for a `rediss://` data node: its PEM roots if given, else the system's.
    pub fn tls_config(&self) -> RedisResult<Arc<ClientConfig>> {
        let mut built = self.tls.lock();
        if let Some(config) = &*built {
            return Ok(Arc::clone(config));
        }
        let config = crate::stream::tls_config(self.root_cert.as_deref().map(Vec::as_slice))?;
        Ok(Arc::clone(built.insert(config)))
    }

    /// Where `connect_tagged` connects now, and the generation of that primary: for a
    /// connection this crate opens itself (tracking.rs' feed). In Sentinel mode, the primary
    /// known (None before any), unverified: the caller checks `ROLE` on its connection, and
    /// calls this after `connect_tagged` so that the resolver has found and verified one.
    pub fn target(&self) -> Option<(ConnectionInfo, u64)> {
        match &self.route {
            Route::Fixed(client) => Some((client.get_connection_info().clone(), 0)),
            Route::Sentinel(resolver) => resolver.current(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.route, Route::Sentinel(_))
    }

    /// Sentinel mode: ask the sentinels again if it is time to (see `Resolver::refresh`).
    pub fn refresh(&self) {
        if let Route::Sentinel(resolver) = &self.route {
            resolver.refresh();
        }
    }

    /// May lookups read the primary of `generation` (Sentinel: confirmed by a majority of the
    /// sentinels within `sentinel::TRUSTED_FOR`; always without Sentinel)?
    pub fn trusted(&self, generation: u64) -> bool {
        match &self.route {
            Route::Fixed(_) => true,
            Route::Sentinel(resolver) => resolver.trusted(generation),
        }
    }

    /// Changes when the sentinels name another primary: connections of an older generation go.
    pub fn generation(&self) -> u64 {
        match &self.route {
            Route::Fixed(_) => 0,
            Route::Sentinel(resolver) => resolver.generation(),
        }
    }
}

/// A connection, whether it came from the pool (a reused one may be stale after a restart),
/// the generation of the primary it goes to, and what it learned of the server that answers
/// on it (its incarnation).
pub struct Checkout {
    pub conn: Conn,
    pub reused: bool,
    pub generation: u64,
    pub server: Server,
}

impl Pool {
    pub fn new(config: PoolConfig) -> RedisResult<Self> {
        let root_cert = config.root_cert.clone().map(Arc::new);
        let route = match config.sentinel {
            Some(sentinel) => Route::Sentinel(Arc::new(Resolver::new(
                sentinel,
                config.info,
                config.root_cert,
                config.connect_timeout,
                config.io_timeout,
            )?)),
            None => Route::Fixed(Box::new(match config.root_cert {
                Some(root_cert) => Client::build_with_tls(
                    config.info,
                    TlsCertificates { client_tls: None, root_cert: Some(root_cert) },
                )?,
                None => Client::open(config.info)?,
            })),
        };
        Ok(Pool {
            breaker: Breaker::new(config.breaker_cooldown_ms),
            connector: Connector {
                route,
                connect_timeout: config.connect_timeout,
                io_timeout: config.io_timeout,
                root_cert,
                tls: Arc::new(Mutex::new(None)),
                busy_poll: Arc::new(BusyPoll::new(config.busy_poll)),
            },
            max_idle: config.max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// With `trusted_only` (lookups), fails at once, connecting to nothing, while the primary
    /// known is not trusted (`Connector::trusted`), and if the one connected to is not.
    pub fn checkout(&self, trusted_only: bool) -> RedisResult<Checkout> {
        let pid = crate::process::id();
        self.connector.refresh();
        if trusted_only {
            if let Route::Sentinel(resolver) = &self.connector.route {
                if resolver.known_generation().is_some_and(|generation| !resolver.trusted(generation)) {
                    return Err(untrusted());
                }
            }
        }
        let checkout = self.checkout_any(pid)?;
        if trusted_only && !self.connector.trusted(checkout.generation) {
            self.checkin(checkout);
            return Err(untrusted());
        }
        Ok(checkout)
    }

    fn checkout_any(&self, pid: u32) -> RedisResult<Checkout> {
        let current = self.connector.generation();
        loop {
            let idle = self.idle.lock().pop();
            match idle {
                Some(Idle { conn, pid: owner, generation, server }) if owner == pid && generation == current => {
                    return Ok(Checkout { conn, reused: true, generation, server });
                }
                // Inherited from the parent (dropping closes only the child's descriptor), or
                // opened to a node that is no longer the primary.
                Some(_) => {}
                None => break,
            }
        }
        let (mut conn, generation) = self.connector.connect_tagged()?;
        let server = incarnation::learn(&mut conn)?;
        Ok(Checkout { conn, reused: false, generation, server })
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The socket timeout: what a call may wait, at most, for another's work on a connection.
    pub fn io_timeout(&self) -> Duration {
        self.connector.io_timeout
    }

    /// The generation of the primary this pool's connections go to now (`Connector::generation`).
    pub fn generation(&self) -> u64 {
        self.connector.generation()
    }

    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    pub fn checkin(&self, checkout: Checkout) {
        let Checkout { conn, generation, server, .. } = checkout;
        if !redis::ConnectionLike::is_open(&conn) {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { conn, pid: crate::process::id(), generation, server });
        }
    }

    /// Sentinel mode: a command on the primary answered READONLY (a failover demoted it).
    /// Forget every idle connection and ask the sentinels now; true if the caller may retry
    /// (on whatever primary they name: each new connection verifies its role).
    pub fn primary_stepped_down(&self) -> bool {
        let Route::Sentinel(resolver) = &self.connector.route else { return false };
        self.clear();
        resolver.resolve_now();
        true
    }

    /// Sentinel mode: a connection to the primary failed; ask the sentinels on the next use.
    pub fn connection_lost(&self) {
        if let Route::Sentinel(resolver) = &self.connector.route {
            resolver.mark_due();
        }
    }

    /// `host:port` of the configured server (Cluster: the node this pool goes to); "" for a
    /// unix socket or under Sentinel.
    pub fn address(&self) -> String {
        match &self.connector.route {
            Route::Fixed(client) => match client.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                    crate::cluster::address(host, i64::from(*port))
                }
                _ => String::new(),
            },
            Route::Sentinel(_) => String::new(),
        }
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.connector.route, Route::Sentinel(_))
    }

    /// Sentinel mode: the generation of the primary a majority of the sentinels last named,
    /// and when.
    pub fn settled(&self) -> Option<(u64, std::time::Instant)> {
        match &self.connector.route {
            Route::Fixed(_) => None,
            Route::Sentinel(resolver) => resolver.confirmed(),
        }
    }

    /// Sentinel mode: `host:port` of the primary the sentinels named last, if any.
    pub fn primary(&self) -> Option<String> {
        match &self.connector.route {
            Route::Fixed(_) => None,
            Route::Sentinel(resolver) => resolver.primary(),
        }
    }

    /// Forget every idle connection (after a dropped connection: the others are likely stale).
    pub fn clear(&self) {
        let drained: Vec<Idle> = std::mem::take(&mut *self.idle.lock());
        drop(drained);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

/// Sentinel: the primary has not been confirmed by a majority of the sentinels lately. An I/O
/// error (not connected), so the Python side treats it as Redis being unreachable: a lookup
/// falls back to the database.
pub fn untrusted() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, UNTRUSTED))
}

const UNTRUSTED: &str = "the primary has not been confirmed by a majority of the sentinels lately: not read";

/// Is this the error of a lookup refused by `Pool::checkout` (no connection failed)?
pub fn is_untrusted(err: &redis::RedisError) -> bool {
    err.is_io_error() && err.to_string().contains(UNTRUSTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_refusal_is_told_apart_from_a_connection_failure() {
        assert!(is_untrusted(&untrusted()));
        let refused = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(!is_untrusted(&refused));
        assert!(crate::errors::is_connectivity(&untrusted())); // the Python side falls back
    }
}
