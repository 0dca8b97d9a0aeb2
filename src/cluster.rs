//! Redis Cluster: which primary serves a key, as the cluster itself says.
//!
//! A key hashes to one of 16,384 slots: CRC16 of its name or, if the name has a hash tag (the
//! part between the first `{` and the next `}`, when not empty), of the tag alone. Each
//! primary serves ranges of slots. The map of those ranges comes from `CLUSTER SLOTS`, asked of
//! a node already known or of a seed (`REDIS_CLUSTER_NODES`), each under the connect and socket
//! timeouts, and is corrected by the cluster's own answers to a command sent to the wrong node:
//!
//! - `MOVED slot host:port`: the slot lives there now (a failover, a finished migration):
//!   the map is corrected for that slot at once, the whole map asked again on the next use,
//!   and the command re-sent there;
//! - `ASK slot host:port`: the slot is migrating and this key has already gone: the command
//!   is re-sent there once, after `ASKING` on the same connection, and the map is kept;
//! - `TRYAGAIN`: a multi-key command whose keys are split by a migration in progress: sent
//!   again shortly, within the call's deadline;
//! - `CLUSTERDOWN`: the cluster can't serve the slot now (a primary lost, no replica promoted
//!   yet): a failure, as when Redis is unreachable.
//!
//! Every node is reached through a pool of its own (pool.rs), so each connection learns the
//! incarnation of its node (incarnation.rs) and every script checks it, as on a single server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redis::{ConnectionAddr, ConnectionInfo, RedisError, RedisResult, Value};

use crate::pool::{Pool, PoolConfig};

pub const SLOTS: u16 = 16_384;
/// The map is asked for again at most this often (each MOVED asks for it).
const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// And at least this often: it also says which replicas each primary has (the cluster lists
/// those it would promote), which a revocation waits for.
const MAX_AGE: Duration = Duration::from_secs(1);
/// Redirections one call follows at most (a slot moves once; a few more cover a failover
/// seen mid-call), all within the call's socket timeout.
pub const MAX_REDIRECTS: usize = 5;
/// The pause before a command answered TRYAGAIN is sent again.
pub const TRY_AGAIN: Duration = Duration::from_millis(10);

/// The slot of a key: CRC16 (XMODEM) of its hash tag if it has one, else of the whole name.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// The part of `key` that is hashed: between the first `{` and the next `}` if that is not
/// empty, else the whole key (Redis' rule, to the byte).
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Which primary (`host:port`) serves each slot; None where no primary does (yet).
#[derive(Clone, Default)]
pub struct SlotMap {
    owners: Vec<Option<Arc<str>>>,
    /// How many replicas `CLUSTER SLOTS` lists for each primary (a revocation there waits for one).
    replicas: HashMap<Arc<str>, usize>,
}

impl SlotMap {
    pub fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        self.owners.get(usize::from(slot)).and_then(Option::as_ref)
    }

    pub fn is_empty(&self) -> bool {
        self.owners.iter().all(Option::is_none)
    }

    /// From a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    /// A primary announced without an endpoint (`""` or `"?"`) is the node that answered
    /// (`asked`'s host). Anything malformed is an error: a half-read map is not used.
    pub fn parse(reply: &Value, asked: &str) -> RedisResult<SlotMap> {
        let Value::Array(ranges) = reply else { return Err(malformed("not an array")) };
        let mut owners: Vec<Option<Arc<str>>> = vec![None; usize::from(SLOTS)];
        let mut replicas = HashMap::new();
        for range in ranges {
            let Value::Array(fields) = range else { return Err(malformed("a range is not an array")) };
            let (Some(start), Some(end), Some(Value::Array(primary))) =
                (fields.first().and_then(int), fields.get(1).and_then(int), fields.get(2))
            else {
                return Err(malformed("a range without start, end and primary"));
            };
            // A NULL endpoint (`cluster-preferred-endpoint-type unknown-endpoint`): the node asked.
            let host = match primary.first() {
                Some(Value::Nil) => Some(String::new()),
                other => other.and_then(text),
            };
            let (Some(host), Some(port)) = (host, primary.get(1).and_then(int)) else {
                return Err(malformed("a primary without host and port"));
            };
            if start > end || end >= i64::from(SLOTS) || start < 0 || !(1..=65_535).contains(&port) {
                return Err(malformed("a range out of bounds"));
            }
            let host = if host.is_empty() || host == "?" { asked_host(asked) } else { host };
            let owner: Arc<str> = Arc::from(address(&host, port));
            replicas.insert(Arc::clone(&owner), fields.len().saturating_sub(3));
            for slot in start..=end {
                owners[usize::try_from(slot).map_err(|_| malformed("slot"))?] = Some(Arc::clone(&owner));
            }
        }
        Ok(SlotMap { owners, replicas })
    }

    pub fn replicas(&self, primary: &str) -> usize {
        self.replicas.get(primary).copied().unwrap_or(0)
    }

    fn set(&mut self, slot: u16, owner: &str) {
        if self.owners.is_empty() {
            self.owners = vec![None; usize::from(SLOTS)];
        }
        self.owners[usize::from(slot)] = Some(Arc::from(owner));
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn malformed(what: &str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, "malformed CLUSTER SLOTS reply", what.to_owned()))
}

/// `host:port`, with an IPv6 host in brackets.
pub fn address(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn asked_host(asked: &str) -> String {
    split_address(asked).map(|(host, _)| host.to_owned()).unwrap_or_default()
}

/// Where a redirection or the map sends a command: `to` itself, or, for a node named without
/// a host (`:port`), that port on the host of the node that answered (`asked`).
pub fn resolve(to: &str, asked: &str) -> String {
    match (to.strip_prefix(':'), split_address(asked)) {
        (Some(port), Some((host, _))) => format!("{}:{port}", address(host, 0).trim_end_matches(":0")),
        _ => to.to_owned(),
    }
}

/// `host:port` (or `[v6]:port`) back into its parts.
pub fn split_address(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((host, port.parse().ok()?))
}

/// A redirection the cluster answered with, instead of running a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    Moved { slot: u16, to: String },
    Ask { slot: u16, to: String },
    TryAgain,
}

impl Redirect {
    pub fn of(err: &RedisError) -> Option<Redirect> {
        match err.code()? {
            "TRYAGAIN" => Some(Redirect::TryAgain),
            code @ ("MOVED" | "ASK") => {
                // "MOVED 3999 127.0.0.1:6381": redis-rs keeps what follows the code.
                let detail = err.detail()?;
                let mut parts = detail.split_whitespace();
                let slot: u16 = parts.next()?.parse().ok()?;
                let to = parts.next()?;
                let (host, port) = split_address(to)?;
                // An empty host (an unknown endpoint): `:port`, on the host that answered
                // (`resolve`).
                let to = address(host, i64::from(port));
                if slot >= SLOTS {
                    return None;
                }
                Some(if code == "MOVED" { Redirect::Moved { slot, to } } else { Redirect::Ask { slot, to } })
            }
            _ => None,
        }
    }
}

/// The cluster's nodes as this process knows them: the slot map, and a pool per primary.
pub struct Cluster {
    /// Where to ask for the map when no known node answers (`REDIS_CLUSTER_NODES`).
    seeds: Vec<ConnectionInfo>,
    /// Database 0, credentials, TLS and timeouts: what every node's pool is made with.
    template: PoolConfig,
    map: RwLock<SlotMap>,
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
    /// When the map was last asked for, and whether a redirection made it stale.
    refreshed: Mutex<(Option<Instant>, bool)>,
    /// Nodes that failed a call lately: asked for the map last.
    lost: Mutex<HashMap<Arc<str>, Instant>>,
    /// Token key -> the user key its record named last (`USER_CACHE`): a repeat hit reads the
    /// row beside the record, on the two nodes at once. A guess, checked against the record.
    users: Mutex<HashMap<String, String>>,
    /// Index entries (index key, field, the entry as the revocation saw it) of tokens revoked,
    /// pruned by the next revocation if still unchanged.
    prunes: Mutex<Vec<IndexEntry>>,
}

/// An entry of a user's index: the index key, the field (a token's id), the entry it held.
pub type IndexEntry = (String, Vec<u8>, Vec<u8>);

/// Index entries kept to prune at most (the oldest go: an entry left costs a revocation of a
/// token already revoked, and the index's own TTL ends it).
const MAX_PRUNES: usize = 100_000;
/// Tokens whose user this process remembers at most.
const MAX_REMEMBERED: usize = 100_000;

impl Cluster {
    pub fn new(seeds: Vec<ConnectionInfo>, template: PoolConfig) -> Self {
        Cluster {
            seeds,
            template,
            map: RwLock::new(SlotMap::default()),
            pools: Mutex::new(HashMap::new()),
            refreshed: Mutex::new((None, true)),
            lost: Mutex::new(HashMap::new()),
            prunes: Mutex::new(Vec::new()),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// The pool of the primary serving `slot`, and its address; the map is asked for first if
    /// it is stale (at most every `REFRESH_EVERY`) or doesn't know the slot.
    pub fn pool_for(&self, slot: u16) -> RedisResult<(Arc<Pool>, Arc<str>)> {
        let stale = {
            let refreshed = self.refreshed.lock();
            let age = refreshed.0.map(|at| at.elapsed());
            age.map_or(true, |age| (refreshed.1 && age >= REFRESH_EVERY) || age >= MAX_AGE)
        };
        let unknown = self.map.read().owner(slot).is_none();
        // (A slot no primary serves doesn't make every call ask again: at most every REFRESH_EVERY.)
        let due = || self.refreshed.lock().0.map_or(true, |at| at.elapsed() >= REFRESH_EVERY);
        if stale || (unknown && due()) {
            // A failed refresh keeps the map it had: a known owner is still worth trying.
            if let Err(err) = self.refresh() {
                if self.map.read().owner(slot).is_none() {
                    return Err(err);
                }
            }
        }
        let owner = self.map.read().owner(slot).cloned().ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "no primary serves the slot",
            ))
        })?;
        Ok((self.pool_at(&owner)?, owner))
    }

    /// A primary's pool, for a call on no key (the first the map names).
    pub fn any(&self) -> RedisResult<Arc<Pool>> {
        let first = self.primaries().into_iter().next();
        match first {
            Some(owner) => self.pool_at(&owner),
            None => self.pool_for(0).map(|(pool, _)| pool),
        }
    }

    /// How many replicas the map lists for this primary.
    pub fn replicas(&self, primary: &str) -> usize {
        self.map.read().replicas(primary)
    }

    /// The pool of the node at `address` (made on first use).
    pub fn pool_at(&self, address: &str) -> RedisResult<Arc<Pool>> {
        if let Some(pool) = self.pools.lock().get(address) {
            return Ok(Arc::clone(pool));
        }
        let (host, port) = split_address(address)
            .ok_or_else(|| RedisError::from((redis::ErrorKind::InvalidClientConfig, "not a node address")))?;
        let info = self.template.info.clone().set_addr(with_host(self.template.info.addr(), host, port));
        let pool = Arc::new(Pool::new(PoolConfig { info, sentinel: None, ..self.template.clone() })?);
        Ok(Arc::clone(self.pools.lock().entry(Arc::from(address)).or_insert(pool)))
    }

    /// A redirection said `slot` lives at `to` now: use it from now on, and ask for the whole
    /// map again on the next use (a failover or a migration moves more than one slot).
    pub fn moved(&self, slot: u16, to: &str) {
        if !to.is_empty() {
            self.map.write().set(slot, to);
        }
        self.refreshed.lock().1 = true;
    }

    /// A node didn't answer: ask for the map again on the next use (a failover may be under
    /// way), that node last.
    pub fn node_lost(&self, address: &str) {
        self.refreshed.lock().1 = true;
        if !address.is_empty() {
            self.lost.lock().insert(Arc::from(address), Instant::now());
        }
    }

    /// Ask for the map: of each known node (those that failed lately last), then each seed,
    /// until one answers, for at most one connect and one socket timeout in all: a hung node
    /// must not make the calls on healthy ones wait for it.
    pub fn refresh(&self) -> RedisResult<()> {
        let started = Instant::now();
        *self.refreshed.lock() = (Some(started), false);
        let budget = self.template.connect_timeout + self.template.io_timeout;
        // The nodes known, then the seeds (one pool per address), those that failed lately last.
        let mut candidates: Vec<String> = self.pools.lock().keys().map(ToString::to_string).collect();
        for seed in self.seed_addresses() {
            if !candidates.contains(&seed) {
                candidates.push(seed);
            }
        }
        {
            let mut lost = self.lost.lock();
            lost.retain(|_, at| at.elapsed() < Duration::from_secs(10));
            candidates.sort_by_key(|candidate| lost.get(candidate.as_str()).copied());
        }
        let mut last_error = None;
        for candidate in candidates {
            if started.elapsed() >= budget {
                break;
            }
            match self.pool_at(&candidate).and_then(|pool| self.ask(&pool)) {
                Ok(()) => return Ok(()),
                Err(err) => {
                    if crate::errors::is_connectivity(&err) {
                        self.lost.lock().insert(Arc::from(candidate.as_str()), Instant::now());
                    }
                    last_error = Some(err);
                }
            }
        }
        self.refreshed.lock().1 = true;
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster node to ask for the slot map"))
        }))
    }

    fn ask(&self, pool: &Pool) -> RedisResult<()> {
        let mut checkout = pool.checkout(false)?;
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut checkout.conn)?;
        let asked = pool.address();
        let map = SlotMap::parse(&reply, &asked)?;
        pool.checkin(checkout);
        if map.is_empty() {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "the node serves no slot map",
            )));
        }
        // Pools of nodes the cluster no longer names as primaries (removed, demoted, a failed
        // master replaced) go, with their idle connections; the seeds' stay (the next refresh
        // may need them).
        let seeds = self.seed_addresses();
        self.pools.lock().retain(|address, _| {
            map.owners.iter().flatten().any(|owner| owner == address) || seeds.contains(&address.to_string())
        });
        *self.map.write() = map;
        Ok(())
    }

    fn seed_addresses(&self) -> Vec<String> {
        self.seeds
            .iter()
            .filter_map(|seed| match seed.addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Some(address(host, i64::from(*port)))
                }
                _ => None,
            })
            .collect()
    }

    /// Forget every idle connection to every node (settings changed, tests).
    pub fn clear(&self) {
        for pool in self.pools.lock().values() {
            pool.clear();
        }
    }

    /// The user key a token's record named (bounded: emptied when full).
    pub fn remember_user(&self, token_key: &str, user_key: &str) {
        let mut users = self.users.lock();
        if users.len() >= MAX_REMEMBERED && !users.contains_key(token_key) {
            users.clear();
        }
        users.insert(token_key.to_owned(), user_key.to_owned());
    }

    pub fn remembered_user(&self, token_key: &str) -> Option<String> {
        self.users.lock().get(token_key).cloned()
    }

    /// Index entries of tokens whose revocation succeeded, with the entry each held then, for
    /// the next revocation to prune (unindex.lua: only if unchanged).
    pub fn defer_prunes(&self, entries: Vec<IndexEntry>) {
        let mut prunes = self.prunes.lock();
        prunes.extend(entries);
        let excess = prunes.len().saturating_sub(MAX_PRUNES);
        prunes.drain(..excess);
    }

    pub fn take_prunes(&self) -> Vec<IndexEntry> {
        std::mem::take(&mut *self.prunes.lock())
    }

    /// Prunes taken by a revocation that then failed: for the next one.
    pub fn restore_prunes(&self, entries: Vec<IndexEntry>) {
        self.defer_prunes(entries);
    }

    /// Close every node's circuit breaker (settings changed, tests).
    pub fn reset_breakers(&self) {
        for pool in self.pools.lock().values() {
            pool.breaker().reset();
        }
    }

    /// Is some node's circuit breaker open?
    pub fn breaker_open(&self) -> bool {
        self.pools.lock().values().any(|pool| pool.breaker().is_open())
    }

    /// Idle connections to every node.
    pub fn idle_count(&self) -> usize {
        self.pools.lock().values().map(|pool| pool.idle_count()).sum()
    }

    /// Every primary's pool, as the map names them (for calls that go to each node).
    pub fn primaries(&self) -> Vec<Arc<str>> {
        let map = self.map.read();
        let mut out: Vec<Arc<str>> = Vec::new();
        for owner in map.owners.iter().flatten() {
            if !out.iter().any(|known| known == owner) {
                out.push(Arc::clone(owner));
            }
        }
        out
    }
}

/// What a Cluster can't be used with: another topology (sentinels, a unix socket), a database
/// other than 0, the in-process cache (its tracking would be per node), a key prefix with a
/// hash tag in it (every key in one slot).
pub fn check_settings(
    other_topology: bool,
    db: i64,
    local_cache_size: usize,
    key_prefix: &str,
) -> crate::errors::Result<()> {
    use crate::errors::Error;
    if other_topology {
        return Err(Error::Invalid("cluster_nodes go alone: no sentinels, no unix_path".into()));
    }
    if db != 0 {
        return Err(Error::Invalid("a Redis Cluster has database 0 only".into()));
    }
    if local_cache_size > 0 {
        return Err(Error::Invalid(
            "LOCAL_CACHE_SIZE is not supported on a Redis Cluster yet (its tracking is per node)".into(),
        ));
    }
    if key_prefix.contains('{') || key_prefix.contains('}') {
        return Err(Error::Invalid(
            "on a Redis Cluster the key prefix can't hold '{' or '}': a hash tag there would put every key in one slot"
                .into(),
        ));
    }
    Ok(())
}

/// `addr` with another host and port, of the same kind (TLS or not, with its TLS settings).
pub fn with_host(addr: &ConnectionAddr, host: &str, port: u16) -> ConnectionAddr {
    match addr {
        ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
            ConnectionAddr::TcpTls { host: host.to_owned(), port, insecure: *insecure, tls_params: tls_params.clone() }
        }
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_own() {
        // The reference vectors of the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}")); // an empty tag: the whole key
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(slot(b"{"), slot(b"{")); // no closing brace: the whole key
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn a_slot_map_is_read_from_cluster_slots() -> RedisResult<()> {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("10.0.0.1", 7000), node("10.0.0.4", 7003)]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("", 7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("::1", 7002)]),
        ]);
        let map = SlotMap::parse(&reply, "127.0.0.1:7001")?;
        assert_eq!(map.owner(0).map(|o| &**o), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(5460).map(|o| &**o), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(5461).map(|o| &**o), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(16383).map(|o| &**o), Some("[::1]:7002"));
        assert_eq!(split_address("[::1]:7002"), Some(("::1", 7002)));
        for bad in [
            Value::Int(1),
            Value::Array(vec![Value::Array(vec![Value::Int(5), Value::Int(1), node("h", 1)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(16384), node("h", 1)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(1), node("h", 0)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(1)])]),
        ] {
            assert!(SlotMap::parse(&bad, "h:1").is_err());
        }
        Ok(())
    }

    fn server_error(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).and_then(Value::extract_error) {
            Err(err) => err,
            Ok(value) => panic!("not an error: {value:?}"),
        }
    }

    #[test]
    fn redirections_are_read() {
        let moved = server_error("MOVED 3999 127.0.0.1:6381");
        assert_eq!(Redirect::of(&moved), Some(Redirect::Moved { slot: 3999, to: "127.0.0.1:6381".into() }));
        let ask = server_error("ASK 12 [::1]:7000");
        assert_eq!(Redirect::of(&ask), Some(Redirect::Ask { slot: 12, to: "[::1]:7000".into() }));
        let unknown_host = server_error("MOVED 1 :7000");
        assert_eq!(Redirect::of(&unknown_host), Some(Redirect::Moved { slot: 1, to: ":7000".into() }));
        assert_eq!(resolve(":7000", "10.0.0.9:7002"), "10.0.0.9:7000");
        assert_eq!(resolve(":7000", "[::1]:7002"), "[::1]:7000");
        assert_eq!(resolve("10.0.0.1:7000", "10.0.0.9:7002"), "10.0.0.1:7000");
        assert_eq!(
            Redirect::of(&server_error("TRYAGAIN Multiple keys request during rehashing")),
            Some(Redirect::TryAgain)
        );
        assert_eq!(Redirect::of(&server_error("MOVED 99999 h:1")), None);
        assert_eq!(Redirect::of(&server_error("MOVED x h:1")), None);
        assert_eq!(Redirect::of(&server_error("ERR nope")), None);
    }
}
