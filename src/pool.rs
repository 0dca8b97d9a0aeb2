//! A small connection pool: idle connections in a `Mutex<Vec<_>>`, each tagged with the pid
//! that opened it. A connection inherited through `fork()` is never used by the child (its
//! replies would interleave with the parent's); it is only closed there.

use std::time::Duration;

use parking_lot::Mutex;
use redis::{Client, Connection, ConnectionInfo, RedisResult, TlsCertificates};

use crate::metrics::{Counter, PROCESS};

pub struct PoolConfig {
    pub info: ConnectionInfo,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub max_idle: usize,
    /// PEM roots to trust instead of the system's, for `rediss://` with a private CA.
    pub root_cert: Option<Vec<u8>>,
}

struct Idle {
    conn: Connection,
    pid: u32,
}

pub struct Pool {
    connector: Connector,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

/// Opens connections with the pool's settings and timeouts (also for the tracking listener).
#[derive(Clone)]
pub struct Connector {
    client: Client,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl Connector {
    pub fn connect(&self) -> RedisResult<Connection> {
        let conn = self.client.get_connection_with_timeout(self.connect_timeout)?;
        // The connect helper bounds the handshake, then clears socket timeouts: set them again.
        conn.set_read_timeout(Some(self.io_timeout))?;
        conn.set_write_timeout(Some(self.io_timeout))?;
        PROCESS.bump(Counter::ConnectionOpened);
        Ok(conn)
    }
}

/// A connection and whether it came from the pool (a reused one may be stale after a restart).
pub struct Checkout {
    pub conn: Connection,
    pub reused: bool,
}

impl Pool {
    pub fn new(config: PoolConfig) -> RedisResult<Self> {
        let client = match config.root_cert {
            Some(root_cert) => {
                Client::build_with_tls(config.info, TlsCertificates { client_tls: None, root_cert: Some(root_cert) })?
            }
            None => Client::open(config.info)?,
        };
        Ok(Pool {
            connector: Connector { client, connect_timeout: config.connect_timeout, io_timeout: config.io_timeout },
            max_idle: config.max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn checkout(&self) -> RedisResult<Checkout> {
        let pid = std::process::id();
        loop {
            let idle = self.idle.lock().pop();
            match idle {
                Some(Idle { conn, pid: owner }) if owner == pid => return Ok(Checkout { conn, reused: true }),
                // Inherited from the parent: dropping closes only the child's descriptor.
                Some(_) => {}
                None => break,
            }
        }
        self.connector.connect().map(|conn| Checkout { conn, reused: false })
    }

    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    pub fn checkin(&self, conn: Connection) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { conn, pid: std::process::id() });
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
