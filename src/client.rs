//! `TokenCache`: the Redis side of `knox_redis`. Every network call releases the GIL, runs under
//! connect and read timeouts, and goes through the circuit breaker; every multi-key write is a
//! single Lua script, so a hung server costs one timeout, not one per command.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyString};
use redis::io::tcp::TcpSettings;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult, Script};

use crate::cluster::{self, Cluster, Redirect};
use crate::conn::Conn;
use crate::decoded::Decoded;
use crate::errors::{is_connectivity, Error, Result};
use crate::fanout::{fan_out, Routed};
use crate::hashing::field_id;
use crate::incarnation::{is_role_changed, Incarnation, Server};
use crate::journal::{Journal, Revocation};
use crate::local::{Entry, Hit, Local};
use crate::metrics::{ClientMetrics, Counter, ErrorKind, PROCESS};
use crate::pool::{is_untrusted, Checkout, Pool, PoolConfig};
use crate::record::{whole_seconds, Record, RecordKey, Rejected, UserPk, GENERATION_LEN};
use crate::sentinel::{is_read_only, SentinelConfig};
use crate::tracking::Listener;
use crate::user_row::{UserRow, Value};

// Each script that trusts or writes a record first checks that the server has not changed
// role since the connection learned its incarnation (its last argument: the master_replid).
const LOOKUP_SOURCE: &str = concat!(include_str!("lua/same_server.lua"), include_str!("lua/lookup.lua"));
const FILL_SOURCE: &str = concat!(include_str!("lua/same_server.lua"), include_str!("lua/fill.lua"));
const CLAIM_SOURCE: &str = concat!(include_str!("lua/same_server.lua"), include_str!("lua/claim.lua"));
const INDEX_SOURCE: &str = include_str!("lua/index.lua");
const UNINDEX_SOURCE: &str = include_str!("lua/unindex.lua");
pub(crate) static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP_SOURCE));
pub(crate) static FILL: LazyLock<Script> = LazyLock::new(|| Script::new(FILL_SOURCE));
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_SOURCE));
pub(crate) static REVOKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/revocation.lua"), include_str!("lua/revoke.lua"))));
// Redis Cluster only: a revocation's part in one slot, and a token's user index entry.
/// Loaded (`SCRIPT LOAD`) at the head of each node's pipeline, then run by `EVALSHA`.
const REVOKE_SLOT_SOURCE: &str = concat!(include_str!("lua/revocation.lua"), include_str!("lua/revoke_slot.lua"));
pub(crate) static REVOKE_SLOT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE_SLOT_SOURCE));
pub(crate) static INDEX: LazyLock<Script> = LazyLock::new(|| Script::new(INDEX_SOURCE));
pub(crate) static UNINDEX: LazyLock<Script> = LazyLock::new(|| Script::new(UNINDEX_SOURCE));
/// The length of a fill's own characters before the `token_key` in a Cluster's index entry.
const ENTRY_NONCE_LEN: usize = 2 * GENERATION_LEN;

/// lookup.lua on a user's key alone (`USER_CACHE` on a Cluster), sent raw (the caller falls
/// back to `Script::invoke`, which loads it, on NOSCRIPT): its row and generation, with
/// `create` the generation created if missing.
fn row_lookup(user_key: &str, candidate: &str, lease_ms: u64, create: bool, replid: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(LOOKUP.get_hash()).arg(1).arg(user_key).arg("u").arg("ug").arg(candidate).arg(lease_ms);
    cmd.arg(u8::from(create)).arg("").arg("").arg(replid);
    cmd
}

/// Cluster: before a command is sent after `ASKING` to a node that may never have run these
/// scripts (redis-rs would load one after NOSCRIPT and send it again, without `ASKING`: the
/// node would answer MOVED, back to where the slot still officially lives).
fn load_scripts(conn: &mut Conn) -> RedisResult<()> {
    // One at a time (a pipeline would pay a hung node's timeout once per command).
    for source in [LOOKUP_SOURCE, FILL_SOURCE, CLAIM_SOURCE, INDEX_SOURCE] {
        redis::cmd("SCRIPT").arg("LOAD").arg(source).exec(conn)?;
    }
    Ok(())
}

/// `(fresh_until_us, [(tag, primitive), ...])`, as `decode_user_row` returns it to Python.
type DecodedUserRow = (i64, Vec<(String, Py<PyAny>)>);

/// `(record tuple or None, generation or None, user row or None, user row generation or
/// None)`, as `lookup` returns it to Python.
type LookupReply = (Option<Py<PyAny>>, Option<Py<PyBytes>>, Option<DecodedUserRow>, Option<Py<PyBytes>>);

/// lookup.lua's reply, the incarnation of the server that gave it, and that of the server
/// that gave the user row (another node on a Cluster).
type RawLookup = (Vec<Option<Vec<u8>>>, Incarnation, Incarnation);

/// `(user row or None, generation or None)`, as `lookup_user` returns it to Python.
type UserLookupReply = (Option<DecodedUserRow>, Option<Py<PyBytes>>);

/// Client for the token records of one key prefix on one Redis primary.
#[pyclass(name = "TokenCache", module = "knox_redis._knox_redis", frozen)]
pub struct TokenCache {
    /// The server (or the Sentinel primary); on a Cluster, the first seed's (for `command`).
    pool: Arc<Pool>,
    /// `REDIS_CLUSTER_NODES`: calls go to the primary serving their key's slot.
    cluster: Option<Cluster>,
    prefix: String,
    lease_ms: u64,
    /// The signing key first, then the fallbacks that still verify during a rotation.
    record_keys: Vec<RecordKey>,
    metrics: ClientMetrics,
    /// `LOCAL_CACHE_SIZE`: lookup replies kept in this process, and the thread keeping them
    /// coherent.
    local: Option<Arc<Local>>,
    /// Replies decoded before, and what they were built into (decoded.rs).
    decoded: Decoded,
    listener: Option<Listener>,
    /// Sentinel: recent revocations, re-sent to a new primary (journal.rs).
    journal: Journal,
    /// How long a revocation waits for a replica to acknowledge it (`WAIT 1`): half the socket
    /// timeout, so the wait's reply always comes before the read times out.
    wait_ms: u64,
}

impl TokenCache {
    fn token_key_name(&self, token_key: &str) -> String {
        format!("{}:token:{}", self.prefix, token_key)
    }

    /// The user's index of cached tokens: a HASH, field id (16 raw bytes) -> `token_key`.
    fn user_key_name(&self, user_pk: &UserPk) -> String {
        format!("{}:user:{}:ix", self.prefix, user_pk_text(user_pk))
    }

    /// The previous release's index: a SET of `{id}{token_key}`, still read by revocations.
    fn legacy_user_key_name(&self, user_pk: &UserPk) -> String {
        format!("{}:user:{}:tokens", self.prefix, user_pk_text(user_pk))
    }

    /// A user row's values as Python gives them, ready to sign.
    fn user_row(fresh_until_us: i64, values: &[(String, Bound<'_, PyAny>)]) -> PyResult<UserRow> {
        let values =
            values.iter().map(|(tag, value)| Ok((tag_byte(tag)?, value_from_py(value)?))).collect::<PyResult<_>>()?;
        Ok(UserRow { fresh_until_s: whole_seconds(fresh_until_us), values })
    }

    /// A stored user row (its generation, then the signed row) for the user named
    /// `user_key`, as Python sees it; None for anything else (garbage, forged, another user's,
    /// written to another incarnation of Redis).
    fn user_row_to_py(
        &self,
        py: Python<'_>,
        stored: &[u8],
        user_key: &str,
        incarnation: Incarnation,
    ) -> PyResult<Option<DecodedUserRow>> {
        match stored.get(GENERATION_LEN..) {
            Some(signed) => self.signed_row_to_py(py, signed, user_key, incarnation),
            None => Ok(None),
        }
    }

    fn signed_row_to_py(
        &self,
        py: Python<'_>,
        signed: &[u8],
        user_key: &str,
        incarnation: Incarnation,
    ) -> PyResult<Option<DecodedUserRow>> {
        // A row that fails is a user-row miss (the caller counts it), never a token lookup's
        // outcome: `lookups_*` count each token lookup once.
        let Ok(row) = UserRow::decode(signed, &self.record_keys, user_key, incarnation) else {
            return Ok(None);
        };
        let values = row
            .values
            .into_iter()
            .map(|(tag, value)| Ok((tag_string(tag), value_to_py(py, value)?)))
            .collect::<PyResult<_>>()?;
        Ok(Some((i64::from(row.fresh_until_s) * 1_000_000, values)))
    }

    /// lookup.lua's reply for this token (see `lookup`), the incarnation of the server that
    /// gave it, and that of the server that gave the user row (the same one, except on a
    /// Cluster).
    fn lookup_in_redis(
        &self,
        py: Python<'_>,
        key: &str,
        token_key: &str,
        id: &str,
        create: bool,
        with_user: bool,
    ) -> Result<RawLookup> {
        let fields = [format!("r:{id}"), format!("g:{id}")];
        let candidates = [new_generation(), new_generation()];
        let lease_ms = self.lease_ms;
        // On a Cluster the user's row lives in another slot: read it in a second call.
        let in_script = with_user && self.cluster.is_none();
        let prefix = if in_script { self.prefix.as_str() } else { "" };
        py.detach(|| {
            if let (false, Some(cluster)) = (in_script || !with_user, &self.cluster) {
                let started = Instant::now();
                let pair = self.lookup_pair_in_cluster(cluster, key, token_key, id, &fields, &candidates, create);
                if !matches!(pair, Ok(None)) {
                    PROCESS.observe(started.elapsed());
                }
                if let Some(pair) = pair? {
                    return Ok(pair);
                }
            }
            let (reply, incarnation): (Vec<Option<Vec<u8>>>, Incarnation) = self.call_in(key, |conn, server| {
                LOOKUP
                    .key(key)
                    .arg(&fields)
                    .arg(&candidates[0])
                    .arg(lease_ms)
                    .arg(u8::from(create))
                    .arg(prefix)
                    .arg(&candidates[1])
                    .arg(&server.replid)
                    .invoke(conn)
                    .map(|reply| (reply, server.incarnation))
            })?;
            if !with_user || in_script {
                return Ok((reply, incarnation, incarnation));
            }
            Ok(self.row_in_cluster(key, token_key, id, reply, incarnation, &candidates[1]))
        })
    }

    /// Cluster, `USER_CACHE`: a lookup of the token alone, then of the row of the user its
    /// record names (on that user's node; its generation created if missing, as lookup.lua
    /// does). A row that can't be read makes a hit without the row (the user is read from the
    /// database), not a failed lookup.
    fn row_in_cluster(
        &self,
        key: &str,
        token_key: &str,
        id: &str,
        mut reply: Vec<Option<Vec<u8>>>,
        incarnation: Incarnation,
        candidate: &str,
    ) -> RawLookup {
        let record = reply.first().and_then(Option::as_deref);
        let Some(user) = record.and_then(|raw| Record::decode(raw, &self.record_keys, token_key, id, incarnation).ok())
        else {
            return (reply, incarnation, incarnation);
        };
        let user_key = self.user_key_name(&user.user_pk);
        if let Some(cluster) = &self.cluster {
            cluster.remember_user(key, &user_key);
        }
        let row = self.row_in_redis(&user_key, candidate, true);
        reply.truncate(2);
        reply.resize(2, None);
        match row {
            Ok((row, row_incarnation)) => {
                let row: Vec<Option<Vec<u8>>> = row;
                let mut row = row.into_iter();
                reply.extend([Some(user_key.into_bytes()), row.next().flatten(), row.next().flatten()]);
                (reply, incarnation, row_incarnation)
            }
            Err(_) => (reply, incarnation, incarnation),
        }
    }

    /// lookup.lua on a user's key alone: its row and generation (with `create`, the generation
    /// created if missing), and the incarnation of the server that answered.
    fn row_in_redis(
        &self,
        user_key: &str,
        candidate: &str,
        create: bool,
    ) -> Result<(Vec<Option<Vec<u8>>>, Incarnation)> {
        self.call_in(user_key, |conn, server| {
            LOOKUP
                .key(user_key)
                .arg("u")
                .arg("ug")
                .arg(candidate)
                .arg(self.lease_ms)
                .arg(u8::from(create))
                .arg("")
                .arg("")
                .arg(&server.replid)
                .invoke(conn)
                .map(|row| (row, server.incarnation))
        })
    }

    /// Cluster, `USER_CACHE`, a token seen before by this process: its lookup and its user's
    /// row sent to their two nodes at once (one round trip's time, not two), the user taken
    /// from the record it had then, and the row's generation not created (an unknown or
    /// revoked token's request writes nothing: if the verified record needs one, it is
    /// created in a call of its own). `Ok(None)`: the caller goes the sequential way, which
    /// follows redirections and loads scripts (a redirection, a script not loaded, a breaker
    /// not letting a call through, the record naming another user now). A node that doesn't
    /// answer fails the lookup, as the sequential way would, its breaker told.
    #[allow(clippy::too_many_arguments)]
    fn lookup_pair_in_cluster(
        &self,
        cluster: &Cluster,
        key: &str,
        token_key: &str,
        id: &str,
        fields: &[String; 2],
        candidates: &[String; 2],
        create: bool,
    ) -> Result<Option<RawLookup>> {
        let Some(user_key) = cluster.remembered_user(key) else { return Ok(None) };
        let (Ok((token_pool, _)), Ok((row_pool, _))) =
            (cluster.pool_for(cluster::slot(key.as_bytes())), cluster.pool_for(cluster::slot(user_key.as_bytes())))
        else {
            return Ok(None);
        };
        // Only while both breakers are closed (claiming a probe here and then not sending it,
        // or sending it on a pool the sequential way would not, would keep a node cut off):
        // the sequential way probes a node whose breaker is open.
        if !token_pool.breaker().is_closed() || !row_pool.breaker().is_closed() {
            return Ok(None);
        }
        // Both out, then both in (on an error both connections are dropped, not pooled: one
        // may still owe a reply).
        let sent = |pool: &Pool, cmd: &dyn Fn(&Server) -> redis::Cmd| -> RedisResult<Checkout> {
            let mut checkout = pool.checkout(true)?;
            checkout.conn.send_packed_command(&cmd(&checkout.server).get_packed_command())?;
            Ok(checkout)
        };
        let token_cmd = |server: &Server| {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(LOOKUP.get_hash()).arg(1).arg(key).arg(fields).arg(&candidates[0]).arg(self.lease_ms);
            cmd.arg(u8::from(create)).arg("").arg(&candidates[1]).arg(&server.replid);
            cmd
        };
        let row_cmd = |server: &Server| row_lookup(&user_key, &candidates[1], self.lease_ms, false, &server.replid);
        let mut token_conn = sent(&token_pool, &token_cmd).map_err(|err| self.failed_on(&token_pool, &err))?;
        // The row's node not answering costs the row, not the lookup (as the sequential way).
        let mut row_conn = sent(&row_pool, &row_cmd).map_err(|err| self.failed_on(&row_pool, &err)).ok();
        let token_reply = token_conn.conn.recv_response().map_err(|err| self.failed_on(&token_pool, &err))?;
        let row_reply = row_conn
            .as_mut()
            .and_then(|row| row.conn.recv_response().map_err(|err| self.failed_on(&row_pool, &err)).ok());
        let Ok(token_reply) = token_reply.extract_error() else {
            return Ok(None); // MOVED, ASK, NOSCRIPT, a role change...: the sequential way
        };
        let incarnation = token_conn.server.incarnation;
        token_pool.checkin(token_conn);
        let Ok(mut reply) = redis::from_redis_value::<Vec<Option<Vec<u8>>>>(token_reply) else {
            return Ok(None);
        };
        let row = match (row_conn, row_reply.map(redis::Value::extract_error)) {
            (Some(row_conn), Some(Ok(row_reply))) => {
                let row_incarnation = row_conn.server.incarnation;
                row_pool.checkin(row_conn);
                redis::from_redis_value::<Vec<Option<Vec<u8>>>>(row_reply).ok().map(|row| (row, row_incarnation))
            }
            _ => None,
        };
        let Some((row, row_incarnation)) = row else {
            // A record without its row (the row read from the database), or, without a
            // usable record, the lookup's answer as it is.
            return Ok(Some((reply, incarnation, incarnation)));
        };
        let record = reply.first().and_then(Option::as_deref);
        let user = record.and_then(|raw| Record::decode(raw, &self.record_keys, token_key, id, incarnation).ok());
        match user {
            // No usable record: the lookup's answer as it is (the row goes unused).
            None => Ok(Some((reply, incarnation, incarnation))),
            Some(user) if self.user_key_name(&user.user_pk) == user_key => {
                let mut row = row.into_iter();
                let (stored, generation) = (row.next().flatten(), row.next().flatten());
                if stored.is_none() && generation.is_none() {
                    // The row needs a generation before anyone reads it from the database.
                    return Ok(Some(self.row_in_cluster(key, token_key, id, reply, incarnation, &candidates[1])));
                }
                reply.truncate(2);
                reply.resize(2, None);
                reply.extend([Some(user_key.into_bytes()), stored, generation]);
                Ok(Some((reply, incarnation, row_incarnation)))
            }
            Some(_) => Ok(None),
        }
    }

    /// A lookup reply from the server of `incarnation` as Python sees it (each generation
    /// prefixed with that incarnation: a fill presenting it is sent only to the same one), and
    /// the key of the user its verified record names.
    fn decode_reply(
        &self,
        py: Python<'_>,
        reply: &[Option<Vec<u8>>],
        token_key: &str,
        id: &str,
        with_user: bool,
        (incarnation, row_incarnation): (Incarnation, Incarnation),
    ) -> PyResult<(LookupReply, Option<String>, Option<bool>)> {
        let mut values = reply.iter().cloned();
        let (raw, generation) = (values.next().flatten(), values.next().flatten());
        let (user_key, raw_row, row_generation) =
            (values.next().flatten(), values.next().flatten(), values.next().flatten());
        let generation = generation.map(|g| PyBytes::new(py, &incarnation.prefix(&g)).unbind());
        let raw_missing = raw.is_none();
        let record =
            raw.and_then(|bytes| match Record::decode(&bytes, &self.record_keys, token_key, id, incarnation) {
                Ok(record) => Some(record),
                Err(Rejected::OtherIncarnation) => {
                    // Restored from an older snapshot, or replicated before a failover: a miss.
                    PROCESS.bump(Counter::LookupOtherIncarnation);
                    PROCESS.bump(Counter::LookupMiss);
                    None
                }
                Err(Rejected::Undecodable) => {
                    PROCESS.bump(Counter::LookupUndecodable);
                    None
                }
                Err(Rejected::BadMac) => {
                    PROCESS.bump(Counter::LookupBadMac);
                    None
                }
            });
        let Some(record) = record else {
            if raw_missing {
                PROCESS.bump(Counter::LookupMiss);
            }
            return Ok(((None, generation, None, None), None, None));
        };
        let (mut row, mut row_generation_py, mut row_found) = (None, None, None);
        // The row counts only under the user key the verified record names: the script named
        // it from bytes it could not authenticate.
        let expected = self.user_key_name(&record.user_pk);
        if with_user && user_key.as_deref() == Some(expected.as_bytes()) {
            let name = user_pk_text(&record.user_pk);
            row = match raw_row {
                Some(stored) => self.user_row_to_py(py, &stored, &name, row_incarnation)?,
                None => None,
            };
            row_generation_py = row_generation.map(|g| PyBytes::new(py, &row_incarnation.prefix(&g)).unbind());
            row_found = Some(row.is_some());
        }
        counted_hit(row_found);
        let user_pk = user_pk_to_py(py, record.user_pk)?;
        let tuple = (user_pk, record.created_us, record.expiry_us, record.fresh_until_us);
        let record = Some(tuple.into_pyobject(py)?.into_any().unbind());
        Ok(((record, generation, row, row_generation_py), Some(expected), row_found))
    }

    /// This process is about to change (or has changed) these keys: its own cached replies
    /// that depend on them go now, not when Redis' push arrives.
    fn forget_locally(&self, keys: &[&String]) {
        if let Some(local) = &self.local {
            for key in keys {
                local.invalidate(key);
            }
        }
    }

    /// Run `op` on a pooled connection under the breaker. A connection that errs is dropped;
    /// a reused one that turns out to be closed (Redis restarted) is retried once on a new one.
    ///
    /// Sentinel: refused, connecting to nothing, while the primary is not trusted (see
    /// `sentinel::TRUSTED_FOR`): what these calls read or write would be served from a node
    /// that may no longer be the primary (the caller falls back as when Redis is down).
    fn call<T>(&self, op: impl Fn(&mut Conn) -> RedisResult<T>) -> Result<T> {
        self.call_tagged(true, true, None, |conn, _| op(conn)).map(|(value, _)| value)
    }

    /// Revocations pass `use_breaker = false`: they must always try (refusing a logout because
    /// an earlier lookup failed would turn a blip into a 503), and their success closes it.
    fn call_with<T>(&self, use_breaker: bool, op: impl Fn(&mut Conn) -> RedisResult<T>) -> Result<T> {
        self.call_tagged(use_breaker, false, None, |conn, _| op(conn)).map(|(value, _)| value)
    }

    /// `call` of a command on `key` (on a Cluster, sent to the primary serving its slot), with
    /// `op` told the incarnation of the server on the connection it runs on (each try: a retry
    /// after a restart goes to another one).
    fn call_in<T>(&self, key: &str, op: impl Fn(&mut Conn, &Server) -> RedisResult<T>) -> Result<T> {
        self.call_tagged(true, true, Some(key), op).map(|(value, _)| value)
    }

    /// `call_in`, and the generation of the primary that answered (Sentinel; else 0); with
    /// `trusted_only`, only on a trusted primary (see `call`).
    fn call_tagged<T>(
        &self,
        use_breaker: bool,
        trusted_only: bool,
        key: Option<&str>,
        op: impl Fn(&mut Conn, &Server) -> RedisResult<T>,
    ) -> Result<(T, u64)> {
        // One observation per call that goes to Redis: connecting and the retry included.
        let started = Instant::now();
        let result = self.attempt(use_breaker, trusted_only, key, op);
        // (A call its node's breaker short-circuited sent nothing.)
        if !matches!(result, Err(Error::CircuitOpen)) {
            PROCESS.observe(started.elapsed());
        }
        result
    }

    /// A revocation. On a primary with replicas online, it waits (`WAIT 1`, `wait_ms`) until
    /// one of them has it, and fails if none acknowledges it in time: the caller refuses the
    /// deletion (503) rather than let a failover lose it. In Sentinel mode it is also kept a
    /// while (journal.rs), and sent again if the catch-up of a newer primary missed it.
    fn call_revocation(&self, use_breaker: bool, call: &Arc<Revocation>) -> Result<(i64, String)> {
        let (wait_ms, io_timeout) = (self.wait_ms, self.pool.io_timeout());
        let (revoked, generation) = self.call_tagged(use_breaker, false, None, |conn, _| {
            let (removed, tombstone, replicas) = call.invoke(conn)?;
            if replicas > 0 {
                // Redis answers a timed-out WAIT at its next tick (up to 1000/hz ms late): the
                // read may take the wait plus a socket timeout; a late reply is a refusal, not
                // a connection failure.
                conn.set_read_timeout(Some(Duration::from_millis(wait_ms) + io_timeout))?;
                let acknowledged: RedisResult<i64> = redis::cmd("WAIT").arg(1).arg(wait_ms).query(conn);
                conn.set_read_timeout(Some(io_timeout))?;
                let acknowledged = acknowledged?;
                if acknowledged < 1 {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "no replica acknowledged the revocation in time (WAIT 1)",
                        format!("{replicas} online, waited {wait_ms} ms"),
                    )));
                }
            }
            Ok((removed, tombstone))
        })?;
        if self.pool.is_sentinel() && self.journal.record(generation, Arc::clone(call), self.pool.settled()) {
            self.call_tagged(false, false, None, |conn, _| call.replay(conn))?;
        }
        Ok(revoked)
    }

    /// A revocation on a Cluster (see fanout.rs): one round trip to the nodes of the users'
    /// indexes to read the tokens they list (logoutall), then one to every node holding a key
    /// to revoke (in parallel, a script per slot, each node's indexes pruned in the same
    /// pipeline, `WAIT 1` where a primary has replicas), all within one deadline: the socket
    /// timeout per round trip, plus the wait.
    /// (It always tries, ignoring the nodes' breakers: a logout must, and which nodes it
    /// needs is known only once the indexes are read.)
    fn revoke_in_cluster(&self, cluster: &Cluster, call: &Revocation) -> Result<(i64, String)> {
        let started = Instant::now();
        let io_timeout = self.pool.io_timeout();
        let deadline = started + 2 * io_timeout + Duration::from_millis(self.wait_ms);
        let result = self.revoke_in_cluster_by(cluster, call, deadline);
        PROCESS.observe(started.elapsed());
        result.map_err(|err| {
            PROCESS.error(ErrorKind::of(&err));
            if is_connectivity(&err) {
                cluster.node_lost("");
            }
            Error::from_redis(&err)
        })
    }

    fn revoke_in_cluster_by(
        &self,
        cluster: &Cluster,
        call: &Revocation,
        deadline: Instant,
    ) -> RedisResult<(i64, String)> {
        let n = call.n;
        // Tokens: (token key, hex id); their index entries: (index key, raw id, the entry if
        // read from the index, else None: read in the revocation's own round).
        let mut tokens: Vec<(String, String)> = (0..n).map(|i| (call.keys[i].clone(), call.ids[i].clone())).collect();
        let mut entries: Vec<(String, Vec<u8>, Option<Vec<u8>>)> =
            (0..n).map(|i| (call.keys[n + i].clone(), call.id_fields[i].clone(), None)).collect();
        // The users whose indexed tokens all go (KEYS pairs: the index, then the previous
        // release's SET, which never existed on a Cluster).
        let indexes: Vec<String> = (0..call.pairs).map(|p| call.keys[3 * n + 2 * p].clone()).collect();
        if !indexes.is_empty() {
            let reads: Vec<Routed> = indexes
                .iter()
                .map(|key| Routed { key: key.clone(), cmd: redis::cmd("HGETALL").arg(key).clone() })
                .collect();
            for (key, reply) in indexes.iter().zip(fan_out(cluster, &reads, deadline, None, &[])?) {
                let items: Vec<redis::Value> = match reply {
                    Ok(redis::Value::Array(items)) => items,
                    Ok(redis::Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                    // Another tool's value under our name lists nothing of ours; any other
                    // error (CLUSTERDOWN, NOPERM, LOADING) fails the revocation, as revoke.lua's.
                    Err(err) if err.code() == Some("WRONGTYPE") => continue,
                    Err(err) => return Err(err),
                    Ok(_) => continue,
                };
                for pair in items.chunks(2) {
                    if let [redis::Value::BulkString(field), redis::Value::BulkString(entry)] = pair {
                        if field.len() == 16 && entry.len() > ENTRY_NONCE_LEN {
                            let token_key = String::from_utf8_lossy(&entry[ENTRY_NONCE_LEN..]);
                            tokens.push((self.token_key_name(&token_key), crate::hashing::lower_hex(field)));
                            entries.push((key.clone(), field.clone(), Some(entry.clone())));
                        }
                    }
                }
            }
        }
        // A script per key (a slot mid-migration answers TRYAGAIN to a call on several of its
        // keys, some moved and some not): the tokens, then the user rows.
        let rows = &call.keys[3 * n + 2 * call.pairs..];
        let mut commands: Vec<Routed> = Vec::with_capacity(tokens.len() + rows.len() + n);
        for (key, id) in &tokens {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(REVOKE_SLOT.get_hash()).arg(1).arg(key).arg(1).arg(call.tombstone_ms).arg(&call.seed);
            cmd.arg(&call.lift).arg(id);
            commands.push(Routed { key: key.clone(), cmd });
        }
        for key in rows {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(REVOKE_SLOT.get_hash()).arg(1).arg(key).arg(0).arg(call.tombstone_ms).arg(&call.seed);
            cmd.arg(&call.lift);
            commands.push(Routed { key: key.clone(), cmd });
        }
        let scripts = commands.len();
        // The index entries of the tokens named here, as they stand now (pruned later, only
        // if unchanged: see below).
        for (key, field, _) in entries.iter().filter(|(_, _, entry)| entry.is_none()) {
            commands.push(Routed { key: key.clone(), cmd: redis::cmd("HGET").arg(key).arg(field).clone() });
        }
        // Index entries of tokens revoked by earlier calls (that succeeded): forgotten if they
        // still hold what those calls saw. Their replies don't matter: an entry left names a
        // revoked token, and revoking it again costs nothing.
        let earlier = cluster.take_prunes();
        let mut by_index: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        for (key, field, entry) in &earlier {
            match by_index.iter_mut().find(|(known, _)| known == key) {
                Some((_, args)) => args.extend([field.clone(), entry.clone()]),
                None => by_index.push((key.clone(), vec![field.clone(), entry.clone()])),
            }
        }
        for (key, args) in by_index {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(UNINDEX.get_hash()).arg(1).arg(&key).arg(args);
            commands.push(Routed { key, cmd });
        }
        let load = [
            redis::cmd("SCRIPT").arg("LOAD").arg(REVOKE_SLOT_SOURCE).clone(),
            redis::cmd("SCRIPT").arg("LOAD").arg(UNINDEX_SOURCE).clone(),
        ];
        let replies = match fan_out(cluster, &commands, deadline, Some(self.wait_ms), &load) {
            Ok(replies) => replies,
            Err(err) => {
                cluster.restore_prunes(earlier);
                return Err(err);
            }
        };
        let mut replies = replies.into_iter();
        let (mut removed, mut tombstone) = (0, String::new());
        for reply in replies.by_ref().take(scripts) {
            let (deleted, user_tombstone, _replicas): (i64, String, i64) = redis::from_redis_value(reply?)?;
            removed += deleted;
            if tombstone.is_empty() {
                tombstone = user_tombstone;
            }
        }
        // Only now, every token revoked, may the indexes forget them (pruned in the same round,
        // an index would no longer list a token whose revocation failed on its own node, and
        // the retry would miss it): by the next revocation's round, at no round trip of its
        // own, and only entries unchanged since (a fill of the same token after its tombstone
        // lapsed writes a new one).
        let mut read =
            replies.map(|reply| reply.ok().and_then(|v| redis::from_redis_value::<Option<Vec<u8>>>(v).ok()).flatten());
        let seen: Vec<(String, Vec<u8>, Vec<u8>)> = entries
            .into_iter()
            .filter_map(|(key, field, entry)| match entry {
                Some(entry) => Some((key, field, entry)),
                None => read.next().flatten().map(|entry| (key, field, entry)),
            })
            .collect();
        cluster.defer_prunes(seen);
        Ok((removed, tombstone))
    }

    /// The pool a call on `key` goes to: the server's, or on a Cluster the primary's serving
    /// the key's slot (any primary for a call on no key).
    fn pool_for(&self, key: Option<&str>) -> RedisResult<Arc<Pool>> {
        match (&self.cluster, key) {
            (Some(cluster), Some(key)) => cluster.pool_for(cluster::slot(key.as_bytes())).map(|(pool, _)| pool),
            (Some(cluster), None) => cluster.any(),
            (None, _) => Ok(Arc::clone(&self.pool)),
        }
    }

    fn attempt<T>(
        &self,
        use_breaker: bool,
        trusted_only: bool,
        key: Option<&str>,
        op: impl Fn(&mut Conn, &Server) -> RedisResult<T>,
    ) -> Result<(T, u64)> {
        let mut retried = false;
        // Cluster: where a redirection sends the next try, and whether `ASKING` goes first.
        let mut redirected: Option<(Arc<Pool>, bool)> = None;
        let mut redirects = 0;
        let deadline = Instant::now() + self.pool.io_timeout();
        loop {
            let (pool, asking) = match redirected.take() {
                Some(target) => target,
                None => match self.pool_for(key) {
                    Ok(pool) => (pool, false),
                    Err(err) => return Err(self.failed(&err)),
                },
            };
            if use_breaker && !pool.breaker().allow() {
                PROCESS.bump(Counter::ErrorCircuitOpen);
                return Err(Error::CircuitOpen);
            }
            let mut checkout = match pool.checkout(trusted_only) {
                Ok(checkout) => checkout,
                // Not a connection failure: neither the breaker nor the resolver hears of it
                // (the sentinels are asked on their schedule; in-memory, this costs nothing).
                Err(err) if is_untrusted(&err) => {
                    PROCESS.error(ErrorKind::of(&err));
                    return Err(Error::from_redis(&err));
                }
                // Charged to that node (on a Cluster, not to the first seed's pool).
                Err(err) => return Err(self.failed_on(&pool, &err)),
            };
            // Sentinel: a newer primary first gets the revocations the old one may have lost.
            if let Err(err) = self.journal.catch_up(&mut checkout.conn, checkout.generation, pool.io_timeout()) {
                return Err(self.failed_on(&pool, &err));
            }
            let result = if asking {
                load_scripts(&mut checkout.conn)
                    .and_then(|()| redis::cmd("ASKING").exec(&mut checkout.conn))
                    .and_then(|()| op(&mut checkout.conn, &checkout.server))
            } else {
                op(&mut checkout.conn, &checkout.server)
            };
            match result {
                Ok(value) => {
                    let generation = checkout.generation;
                    pool.checkin(checkout);
                    pool.breaker().record_success();
                    if pool.is_sentinel() {
                        self.journal.settle(pool.settled());
                    }
                    return Ok((value, generation));
                }
                Err(err) => {
                    let reused = checkout.reused;
                    drop(checkout);
                    if reused && !retried && err.is_connection_dropped() && !err.is_timeout() {
                        pool.clear();
                        retried = true;
                        continue;
                    }
                    // Sentinel: a failover demoted the node (a replica writes nothing: the
                    // command had no effect); once more, on the primary the sentinels name now.
                    if !retried && is_read_only(&err) && pool.primary_stepped_down() {
                        retried = true;
                        continue;
                    }
                    // A REPLICAOF sent by hand since this connection opened (the script ran
                    // nothing): the other idle connections learned the same stale incarnation.
                    if !retried && is_role_changed(&err) {
                        PROCESS.bump(Counter::RoleChanged);
                        pool.clear();
                        pool.connection_lost(); // Sentinel: ask where the primary is
                        retried = true;
                        continue;
                    }
                    // Cluster: the slot lives elsewhere (MOVED), is migrating (ASK), or its
                    // keys are split by a migration (TRYAGAIN): within the socket timeout.
                    if let (Some(cluster), Some(redirect)) = (&self.cluster, Redirect::of(&err)) {
                        if redirects < cluster::MAX_REDIRECTS && Instant::now() < deadline {
                            redirects += 1;
                            redirected = match redirect {
                                Redirect::Moved { slot, to } => {
                                    let to = cluster::resolve(&to, &pool.address());
                                    cluster.moved(slot, &to);
                                    // There (a call on no key, `command`, learns it this way too).
                                    cluster.pool_at(&to).ok().map(|target| (target, false))
                                }
                                Redirect::Ask { to, .. } => {
                                    match cluster.pool_at(&cluster::resolve(&to, &pool.address())) {
                                        Ok(target) => Some((target, true)),
                                        Err(err) => return Err(self.failed(&err)),
                                    }
                                }
                                Redirect::TryAgain => {
                                    std::thread::sleep(
                                        cluster::TRY_AGAIN.min(deadline.saturating_duration_since(Instant::now())),
                                    );
                                    None
                                }
                            };
                            continue;
                        }
                    }
                    return Err(self.failed_on(&pool, &err));
                }
            }
        }
    }

    fn failed(&self, err: &redis::RedisError) -> Error {
        self.failed_on(&self.pool, err)
    }

    fn failed_on(&self, pool: &Pool, err: &redis::RedisError) -> Error {
        let kind = ErrorKind::of(err);
        PROCESS.error(kind);
        if is_connectivity(err) {
            pool.connection_lost(); // Sentinel: ask where the primary is on the next use
            if let Some(cluster) = &self.cluster {
                cluster.node_lost(&pool.address()); // a failover may be under way: ask for the map again
            }
            if pool.breaker().record_failure() {
                PROCESS.tripped(kind);
            }
        } else {
            // Redis answered: it is reachable, whatever it said.
            pool.breaker().record_success();
        }
        Error::from_redis(err)
    }
}

/// A verified record served (from Redis, a kept reply, or the in-process cache), and with
/// `USER_CACHE` whether its user's row came with it.
fn counted_hit(row_found: Option<bool>) {
    PROCESS.bump(Counter::LookupHit);
    if let Some(found) = row_found {
        PROCESS.bump(if found { Counter::UserRowHit } else { Counter::UserRowMiss });
    }
}

fn user_pk_from_py(value: &Bound<'_, PyAny>) -> PyResult<UserPk> {
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<pyo3::types::PyBool>() {
        // Beyond i64 (a Decimal-like big key): keep its digits; Django's to_python reads them back.
        return Ok(match value.extract::<i64>() {
            Ok(pk) => UserPk::Int(pk),
            Err(_) => UserPk::Str(value.str()?.extract()?),
        });
    }
    if value.is_instance_of::<PyString>() {
        return Ok(UserPk::Str(value.extract()?));
    }
    Err(PyTypeError::new_err("user primary key must be an int or a str"))
}

fn user_pk_to_py(py: Python<'_>, pk: UserPk) -> PyResult<Py<PyAny>> {
    Ok(match pk {
        UserPk::Int(pk) => pk.into_pyobject(py)?.into_any().unbind(),
        UserPk::Str(pk) => pk.into_pyobject(py)?.into_any().unbind(),
    })
}

fn tag_byte(tag: &str) -> PyResult<u8> {
    match tag.as_bytes() {
        [] => Ok(0),
        [b] if b.is_ascii_graphic() => Ok(*b),
        _ => Err(Error::Invalid(format!("a value's tag must be one ASCII character, not {tag:?}")).into()),
    }
}

fn tag_string(tag: u8) -> String {
    if tag == 0 {
        String::new()
    } else {
        char::from(tag).to_string()
    }
}

fn value_from_py(value: &Bound<'_, PyAny>) -> PyResult<Value> {
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        return value
            .extract::<i64>()
            .map(Value::Int)
            .map_err(|_| Error::Invalid("an integer beyond 64 bits can't be cached".into()).into());
    }
    if let Ok(f) = value.cast::<pyo3::types::PyFloat>() {
        return Ok(Value::Float(f.value()));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::Text(s.to_str()?.to_owned()));
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(Value::Bytes(b.as_bytes().to_vec()));
    }
    Err(Error::Invalid(format!("a value of type {} can't be cached", value.get_type().name()?)).into())
}

fn value_to_py(py: Python<'_>, value: Value) -> PyResult<Py<PyAny>> {
    Ok(match value {
        Value::Null => py.None(),
        Value::Bool(b) => pyo3::types::PyBool::new(py, b).to_owned().into_any().unbind(),
        Value::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Value::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::Text(s) => s.into_pyobject(py)?.into_any().unbind(),
        Value::Bytes(b) => PyBytes::new(py, &b).into_any().unbind(),
    })
}

fn reply_to_py(py: Python<'_>, value: redis::Value) -> PyResult<Bound<'_, PyAny>> {
    use redis::Value as V;
    Ok(match value {
        V::Int(i) => i.into_pyobject(py)?.into_any(),
        V::BulkString(b) => PyBytes::new(py, &b).into_any(),
        V::SimpleString(s) => s.into_pyobject(py)?.into_any(),
        V::Okay => "OK".into_pyobject(py)?.into_any(),
        V::Double(f) => f.into_pyobject(py)?.into_any(),
        V::Boolean(b) => pyo3::types::PyBool::new(py, b).to_owned().into_any(),
        V::VerbatimString { text, .. } => text.into_pyobject(py)?.into_any(),
        V::BigNumber(n) => String::from_utf8_lossy(&n).into_owned().into_pyobject(py)?.into_any(),
        V::Array(items) | V::Set(items) => {
            let list = pyo3::types::PyList::empty(py);
            for item in items {
                list.append(reply_to_py(py, item)?)?;
            }
            list.into_any()
        }
        V::Map(pairs) => {
            let dict = PyDict::new(py);
            for (key, item) in pairs {
                dict.set_item(reply_to_py(py, key)?, reply_to_py(py, item)?)?;
            }
            dict.into_any()
        }
        V::Attribute { data, .. } => reply_to_py(py, *data)?,
        V::ServerError(err) => return Err(Error::Reply(format!("{err:?}")).into()),
        // Nil, push messages (they never answer a command), and whatever a newer protocol adds.
        _ => py.None().into_bound(py),
    })
}

fn user_pk_text(user_pk: &UserPk) -> String {
    match user_pk {
        UserPk::Int(pk) => pk.to_string(),
        UserPk::Str(pk) => pk.clone(),
    }
}

/// The field id as the 16 raw bytes the user index stores (half the size of its hex).
fn id_bytes(id: &str) -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(id, &mut out).map_err(|_| Error::Invalid("field id must be 32 hex characters".into()))?;
    Ok(out)
}

fn id_of(digest: &str) -> Result<&str> {
    field_id(digest).ok_or_else(|| Error::Invalid("digest must be at least 32 hex characters".into()))
}

/// 64 random bits (time and pid if the OS has no entropy): a generation only has to differ
/// from the ones a fill in flight may present.
fn random_generation() -> [u8; GENERATION_LEN] {
    let mut bytes = [0u8; GENERATION_LEN];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&((nanos as u64) ^ (u64::from(std::process::id()) << 40)).to_le_bytes());
    }
    bytes
}

/// A fresh generation for a `g:` field: 16 hex characters.
fn new_generation() -> String {
    crate::hashing::lower_hex(&random_generation())
}

fn read_ca(path: Option<String>, name: &str) -> Result<Option<Vec<u8>>> {
    match path {
        Some(path) => {
            std::fs::read(&path).map(Some).map_err(|e| Error::Invalid(format!("cannot read {name} {path:?}: {e}")))
        }
        None => Ok(None),
    }
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    if value.is_finite() && value > 0.0 && value <= 3600.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(PyTypeError::new_err(format!("{name} must be a number of seconds in (0, 3600]")))
    }
}

#[pymethods]
impl TokenCache {
    #[new]
    #[pyo3(signature = (
        *, host = None, port = 6379, unix_path = None, db = 0, username = None, password = None,
        tls = false, tls_ca_certs = None, key_prefix = "knox", connect_timeout = 0.2, socket_timeout = 0.2,
        breaker_cooldown = 2.0, max_idle = 32, lease_ms = 60_000, record_secret, record_fallback_secrets = Vec::new(),
        local_cache_size = 0, sentinels = Vec::new(), sentinel_service_name = None, sentinel_username = None,
        sentinel_password = None, sentinel_tls = false, sentinel_tls_ca_certs = None, cluster_nodes = Vec::new(), busy_poll_us = 100
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: Option<String>,
        port: u16,
        unix_path: Option<String>,
        db: i64,
        username: Option<String>,
        password: Option<String>,
        tls: bool,
        tls_ca_certs: Option<String>,
        key_prefix: &str,
        connect_timeout: f64,
        socket_timeout: f64,
        breaker_cooldown: f64,
        max_idle: usize,
        lease_ms: u64,
        record_secret: &[u8],
        record_fallback_secrets: Vec<Vec<u8>>,
        local_cache_size: usize,
        sentinels: Vec<(String, u16)>,
        sentinel_service_name: Option<String>,
        sentinel_username: Option<String>,
        sentinel_password: Option<String>,
        sentinel_tls: bool,
        sentinel_tls_ca_certs: Option<String>,
        cluster_nodes: Vec<(String, u16)>,
        busy_poll_us: u64,
    ) -> PyResult<Self> {
        if !cluster_nodes.is_empty() {
            cluster::check_settings(!sentinels.is_empty() || unix_path.is_some(), db, local_cache_size, key_prefix)?;
        }
        // Cluster: `host` and `port` name the first seed.
        let (host, port) = match cluster_nodes.first() {
            Some((host, port)) => (Some(host.clone()), *port),
            None => (host, port),
        };
        // Sentinel mode: `host` and `port` are a placeholder; the sentinels give the address.
        let sentinel = if sentinels.is_empty() {
            None
        } else {
            let Some(service_name) = sentinel_service_name.filter(|name| !name.is_empty()) else {
                return Err(Error::Invalid("sentinels need a sentinel_service_name".into()).into());
            };
            if unix_path.is_some() {
                return Err(Error::Invalid("a Sentinel primary is reached over TCP, not unix_path".into()).into());
            }
            Some(SentinelConfig {
                sentinels,
                service_name,
                username: sentinel_username,
                password: sentinel_password,
                tls: sentinel_tls,
                root_cert: read_ca(sentinel_tls_ca_certs, "sentinel_tls_ca_certs")?,
            })
        };
        let host = host.unwrap_or_else(|| "127.0.0.1".into());
        let addr = match unix_path {
            Some(path) => ConnectionAddr::Unix(path.into()),
            None if tls => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
            None => ConnectionAddr::Tcp(host, port),
        };
        let root_cert = read_ca(tls_ca_certs, "tls_ca_certs")?;
        let mut redis_info = RedisConnectionInfo::default().set_db(db).set_skip_set_lib_name();
        if let Some(username) = username {
            redis_info = redis_info.set_username(username);
        }
        if let Some(password) = password {
            redis_info = redis_info.set_password(password);
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| Error::from_redis(&e))?
            .set_redis_settings(redis_info)
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let io_timeout = seconds(socket_timeout, "socket_timeout")?;
        if !(breaker_cooldown.is_finite() && breaker_cooldown >= 0.0) {
            return Err(PyTypeError::new_err("breaker_cooldown must be >= 0 seconds"));
        }
        let config = PoolConfig {
            breaker_cooldown_ms: (breaker_cooldown * 1000.0) as u64,
            info,
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            io_timeout,
            max_idle,
            root_cert,
            sentinel,
            busy_poll: Duration::from_micros(busy_poll_us),
        };
        let cluster = (!cluster_nodes.is_empty()).then(|| {
            let seeds = cluster_nodes
                .iter()
                .map(|(host, port)| config.info.clone().set_addr(cluster::with_host(config.info.addr(), host, *port)))
                .collect();
            Cluster::new(seeds, config.clone())
        });
        let pool = Arc::new(Pool::new(config).map_err(|e| Error::from_redis(&e))?);
        // Records are signed for this prefix and database: one copied from another namespace
        // that shares the secret (a staging site on the same Redis) fails its MAC here.
        let namespace = format!("{key_prefix}\0{db}");
        let (local, listener) = if local_cache_size > 0 {
            let local = Arc::new(Local::new(local_cache_size));
            let listener = Listener::spawn(pool.connector(), key_prefix.to_owned(), Arc::clone(&local))
                .map_err(|e| Error::Invalid(format!("can't start the tracking listener: {e}")))?;
            (Some(local), Some(listener))
        } else {
            (None, None)
        };
        Ok(TokenCache {
            cluster,
            journal: Journal::default(),
            wait_ms: (io_timeout.as_millis() as u64 / 2).max(1),
            local,
            decoded: Decoded::default(),
            listener,
            pool,
            prefix: key_prefix.to_owned(),
            lease_ms: lease_ms.max(1),
            record_keys: std::iter::once(record_secret)
                .chain(record_fallback_secrets.iter().map(Vec::as_slice))
                .map(|secret| RecordKey::derive(secret, &namespace))
                .collect(),
            metrics: ClientMetrics::new(),
        })
    }

    /// One round trip: `(record or None, generation or None, user row or None, user row
    /// generation or None)`. The record is `(user_pk, created_us, expiry_us or None,
    /// fresh_until_us)`, returned only if it decodes and its MAC verifies for this
    /// `token_key` and digest. Generations are opaque bytes; with `create`, a missing one is
    /// created. With `with_user` (`USER_CACHE`), the same round trip reads the row of the user
    /// the record names (see `decode_user_row`) and creates that row's generation if missing.
    ///
    /// With `build`, the reply is `build(*that tuple)` instead; with `LOCAL_CACHE_SIZE`, what
    /// it returned for a found record is kept with the entry and a repeat hit returns that
    /// same object without decoding or verifying again (so it must be immutable), whichever
    /// `build` the repeat call passes: one builder per client.
    #[pyo3(signature = (token_key, digest, create = false, with_user = false, build = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        token_key: &str,
        digest: &str,
        create: bool,
        with_user: bool,
        build: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let id = id_of(digest)?.to_owned();
        // LOCAL_CACHE_SIZE: a reply kept in this process (never for a lookup that may create
        // a generation: that one must reach Redis), while the listener follows the primary
        // requests go to.
        let local = self.local.as_deref().filter(|local| !create && local.follows(self.pool.generation()));
        let cached = local.and_then(|local| local.get(token_key, &id, with_user));
        if let (Some(Hit { built: Some(built), row_found, .. }), Some(_)) = (&cached, build) {
            counted_hit(*row_found);
            return Ok(built.clone_ref(py));
        }
        let ticket = if cached.is_none() { local.and_then(Local::ticket) } else { None };
        let key = self.token_key_name(token_key);
        let from_redis = cached.is_none();
        let (reply, incarnation, row_incarnation) = if let Some(entry) = cached {
            (entry.reply, entry.incarnation, entry.incarnation)
        } else {
            let (reply, incarnation, row_incarnation) =
                self.lookup_in_redis(py, &key, token_key, &id, create, with_user)?;
            (Arc::new(reply), incarnation, row_incarnation)
        };
        let slot = (token_key, id.as_str(), with_user);
        let incarnations = (incarnation, row_incarnation);
        // The very reply decoded before (decoded.rs): what was built from it.
        let seen =
            build.filter(|_| from_redis && !create).and_then(|_| self.decoded.get(py, slot, &reply, incarnations));
        let (result, user_key, row_found) = if let Some((built, user_key, row_found)) = seen {
            counted_hit(row_found);
            (built, Some(user_key), row_found)
        } else {
            let (decoded, user_key, row_found) =
                self.decode_reply(py, &reply, token_key, &id, with_user, incarnations)?;
            let result = match build {
                Some(build) => build.call1(decoded)?.unbind(),
                None => decoded.into_pyobject(py)?.into_any().unbind(),
            };
            if let (Some(_), true, false, Some(user_key)) = (build, from_redis, create, &user_key) {
                self.decoded.keep(
                    slot,
                    Arc::clone(&reply),
                    incarnations,
                    result.clone_ref(py),
                    user_key.clone(),
                    row_found,
                );
            }
            (result, user_key, row_found)
        };
        // Only found records are kept (a verified record names its user's key).
        if let (Some(local), Some(ticket), Some(user_key)) = (local, ticket, user_key) {
            let kept = build.map(|_| Arc::new(result.clone_ref(py)));
            let entry = Entry { reply, token_key: key, user_key, built: kept, row_found, incarnation };
            local.store(ticket, token_key, &id, with_user, entry);
        }
        Ok(result)
    }

    /// A user row alone (`USER_CACHE`, a re-read after commit): `(row or None, generation or
    /// None)`; with `create`, a missing generation is created.
    #[pyo3(signature = (user_pk, create = false))]
    fn lookup_user(&self, py: Python<'_>, user_pk: &Bound<'_, PyAny>, create: bool) -> PyResult<UserLookupReply> {
        let user_pk = user_pk_from_py(user_pk)?;
        let key = self.user_key_name(&user_pk);
        let candidate = new_generation();
        let (reply, incarnation) = py.detach(|| self.row_in_redis(&key, &candidate, create))?;
        let mut reply = reply.into_iter();
        let (raw_row, generation) = (reply.next().flatten(), reply.next().flatten());
        let row = match raw_row {
            Some(stored) => self.user_row_to_py(py, &stored, &user_pk_text(&user_pk), incarnation)?,
            None => None,
        };
        Ok((row, generation.map(|g| PyBytes::new(py, &incarnation.prefix(&g)).unbind())))
    }

    /// Store a record if the generation seen at lookup still stands and no tombstone does, on
    /// the incarnation of Redis the lookup read it from (the generation says which): after a
    /// restart or a failover the generation may be back, but the fill is refused.
    #[pyo3(signature = (token_key, digest, generation, user_pk, created_us, expiry_us, fresh_until_us, ttl_ms))]
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        py: Python<'_>,
        token_key: &str,
        digest: &str,
        generation: &[u8],
        user_pk: &Bound<'_, PyAny>,
        created_us: i64,
        expiry_us: Option<i64>,
        fresh_until_us: i64,
        ttl_ms: u64,
    ) -> PyResult<bool> {
        let user_pk = user_pk_from_py(user_pk)?;
        let id = id_of(digest)?.to_owned();
        let index_field = id_bytes(&id)?;
        let keys = [self.token_key_name(token_key), self.user_key_name(&user_pk)];
        let Some((seen, generation)) = Incarnation::split(generation) else {
            PROCESS.bump(Counter::FillRefused); // not a generation a lookup returned
            return Ok(false);
        };
        let record = Record { user_pk, created_us, expiry_us, fresh_until_us };
        let ttl_ms = ttl_ms.max(1);
        let lease_ms = self.lease_ms;
        let fields = [format!("r:{id}"), format!("g:{id}"), format!("t:{id}")];
        let stored: i64 = py.detach(|| {
            // Cluster: the user's index lists the token before its record exists (on the
            // token's node, which may be another: fill.lua can't add it in the same call).
            // It must outlive a failover of the user's node as the record does its own: with a
            // replica online there, a replica has it first (WAIT 1), or the token isn't cached.
            if self.cluster.is_some() {
                let entry = format!("{}{token_key}", new_generation());
                let (wait_ms, io_timeout) = (self.wait_ms, self.pool.io_timeout());
                let indexed = self.call_in(&keys[1], |conn, _| {
                    let replicas: i64 =
                        INDEX.key(&keys[1]).arg(&index_field[..]).arg(&entry).arg(ttl_ms).invoke(conn)?;
                    if replicas == 0 {
                        return Ok(true);
                    }
                    conn.set_read_timeout(Some(Duration::from_millis(wait_ms) + io_timeout))?;
                    let acknowledged: RedisResult<i64> = redis::cmd("WAIT").arg(1).arg(wait_ms).query(conn);
                    conn.set_read_timeout(Some(io_timeout))?;
                    Ok(acknowledged? >= 1)
                })?;
                if !indexed {
                    return Ok(0);
                }
            }
            self.call_in(&keys[0], |conn, server| {
                if server.incarnation != seen {
                    return Ok(0); // Redis restarted or failed over since the lookup
                }
                // Stored with a generation of its own: the next fill (a re-read) presents that one.
                let encoded =
                    record.encode(&self.record_keys[0], token_key, &id, random_generation(), server.incarnation);
                let mut invocation = FILL.key(&keys[0]);
                if self.cluster.is_none() {
                    invocation.key(&keys[1]);
                }
                invocation.arg(&fields).arg(generation).arg(&encoded).arg(ttl_ms).arg(lease_ms);
                if self.cluster.is_none() {
                    invocation.arg(&index_field[..]).arg(token_key);
                }
                invocation.arg(&server.replid).invoke(conn)
            })
        })?;
        PROCESS.bump(if stored == 1 { Counter::Fill } else { Counter::FillRefused });
        Ok(stored == 1)
    }

    /// Store a user row (`USER_CACHE`) if the generation seen at lookup still stands and no
    /// tombstone does: `values` as for `encode_user_row`, signed for this user.
    #[pyo3(signature = (user_pk, generation, fresh_until_us, values, ttl_ms))]
    fn fill_user<'py>(
        &self,
        py: Python<'py>,
        user_pk: &Bound<'py, PyAny>,
        generation: &[u8],
        fresh_until_us: i64,
        values: Vec<(String, Bound<'py, PyAny>)>,
        ttl_ms: u64,
    ) -> PyResult<bool> {
        let user_pk = user_pk_from_py(user_pk)?;
        let key = self.user_key_name(&user_pk);
        let name = user_pk_text(&user_pk);
        let row = Self::user_row(fresh_until_us, &values)?;
        let Some((seen, generation)) = Incarnation::split(generation) else {
            PROCESS.bump(Counter::UserRowFillRefused);
            return Ok(false);
        };
        let ttl_ms = ttl_ms.max(1);
        let lease_ms = self.lease_ms;
        let stored: i64 = py.detach(|| {
            self.call_in(&key, |conn, server| {
                if server.incarnation != seen {
                    return Ok(0); // Redis restarted or failed over since the lookup
                }
                let mut stored_row = random_generation().to_vec();
                stored_row.extend_from_slice(&row.encode(&self.record_keys[0], &name, server.incarnation));
                FILL.key(&key)
                    .arg("u")
                    .arg("ug")
                    .arg("ut")
                    .arg(generation)
                    .arg(&stored_row)
                    .arg(ttl_ms)
                    .arg(lease_ms)
                    .arg(&server.replid)
                    .invoke(conn)
            })
        })?;
        PROCESS.bump(if stored == 1 { Counter::UserRowFill } else { Counter::UserRowFillRefused });
        Ok(stored == 1)
    }

    /// Claim a fresh generation for a token about to be inserted (write-through at login),
    /// if Redis knows nothing of it yet: the fill after commit presents it (and is sent only to
    /// the incarnation of Redis that took the claim). None otherwise.
    fn claim(&self, py: Python<'_>, token_key: &str, digest: &str) -> PyResult<Option<Py<PyBytes>>> {
        let key = self.token_key_name(token_key);
        let id = id_of(digest)?.to_owned();
        let candidate = new_generation();
        let lease_ms = self.lease_ms;
        let claimed: Option<Vec<u8>> = py.detach(|| {
            self.call_in(&key, |conn, server| {
                let claimed: Option<Vec<u8>> =
                    CLAIM.key(&key).arg(&id).arg(&candidate).arg(lease_ms).arg(&server.replid).invoke(conn)?;
                Ok(claimed.map(|g| server.incarnation.prefix(&g)))
            })
        })?;
        Ok(claimed.map(|g| PyBytes::new(py, &g).unbind()))
    }

    /// Revoke `(token_key, digest, user_pk)` tokens and every token indexed under `users`, in
    /// one script: records deleted, generations renewed, tombstones written. Returns how many
    /// records were deleted. Revocations ignore the breaker (a logout must try) unless
    /// `use_breaker`: for tokens that may go without Redis anyway, failing fast is better.
    /// `user_rows`: users whose cached row (`USER_CACHE`) is revoked the same way; with
    /// `tombstone_ms` 0, `lift_tombstone` (what a first call returned, before the user's
    /// write) lifts their tombstone once that write has committed.
    /// Returns `(records deleted, the user rows' tombstone, or "")`.
    #[pyo3(signature = (
        tokens, users = Vec::new(), tombstone_ms = 60_000, use_breaker = false, user_rows = Vec::new(),
        lift_tombstone = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn revoke(
        &self,
        py: Python<'_>,
        tokens: Vec<(String, String, Bound<'_, PyAny>)>,
        users: Vec<Bound<'_, PyAny>>,
        tombstone_ms: u64,
        use_breaker: bool,
        user_rows: Vec<Bound<'_, PyAny>>,
        lift_tombstone: Option<String>,
    ) -> PyResult<(i64, String)> {
        let n = tokens.len();
        let (mut token_keys, mut index_keys, mut legacy_index_keys) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut ids, mut id_fields, mut legacy_members) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for (token_key, digest, user_pk) in &tokens {
            let id = id_of(digest)?.to_owned();
            let user_pk = user_pk_from_py(user_pk)?;
            token_keys.push(self.token_key_name(token_key));
            index_keys.push(self.user_key_name(&user_pk));
            legacy_index_keys.push(self.legacy_user_key_name(&user_pk));
            id_fields.push(id_bytes(&id)?.to_vec());
            legacy_members.push(format!("{id}{token_key}"));
            ids.push(id);
        }
        let mut user_keys = Vec::with_capacity(2 * users.len());
        for pk in &users {
            let pk = user_pk_from_py(pk)?;
            user_keys.push(self.user_key_name(&pk));
            user_keys.push(self.legacy_user_key_name(&pk));
        }
        let pairs = users.len();
        let row_keys =
            user_rows.iter().map(|pk| Ok(self.user_key_name(&user_pk_from_py(pk)?))).collect::<PyResult<Vec<_>>>()?;
        if token_keys.is_empty() && user_keys.is_empty() && row_keys.is_empty() {
            return Ok((0, String::new()));
        }
        let lift = lift_tombstone.unwrap_or_default();
        let seed = new_generation();
        // Before (no reply fetched from now on is kept) and after (none fetched meanwhile is).
        let touched: Vec<String> =
            token_keys.iter().chain(&index_keys).chain(&user_keys).chain(&row_keys).cloned().collect();
        let touched: Vec<&String> = touched.iter().collect();
        self.forget_locally(&touched);
        let keys = [token_keys, index_keys, legacy_index_keys, user_keys, row_keys].concat();
        let call = Arc::new(Revocation {
            keys,
            n,
            tombstone_ms,
            seed,
            prefix: self.prefix.clone(),
            pairs,
            lift,
            ids,
            id_fields,
            legacy_members,
        });
        let revoked: Result<(i64, String)> = py.detach(|| match &self.cluster {
            // A revocation that may fail fast doesn't wait for a node whose breaker is open.
            Some(cluster) if use_breaker && cluster.breaker_open() => {
                PROCESS.bump(Counter::ErrorCircuitOpen);
                Err(Error::CircuitOpen)
            }
            Some(cluster) => self.revoke_in_cluster(cluster, &call),
            None => self.call_revocation(use_breaker, &call),
        });
        self.forget_locally(&touched);
        let (removed, tombstone) = match revoked {
            Ok(revoked) => revoked,
            Err(err) => {
                PROCESS.bump(Counter::RevocationFailure);
                return Err(err.into());
            }
        };
        PROCESS.bump(Counter::Revocation);
        PROCESS.add(Counter::RevokedTokens, n as u64);
        PROCESS.add(Counter::RevokedRecords, removed.max(0) as u64);
        Ok((removed, tombstone))
    }

    /// A user row (`USER_CACHE`) as it is stored: `values` are `(tag, primitive)` pairs, the
    /// primitive None, bool, int (64-bit), float, str or bytes, the tag one character (or
    /// empty) that tells the Python side how to rebuild it. Signed for this user, outside any
    /// incarnation of Redis (`decode_user_row` reads it back; a lookup never accepts it).
    fn encode_user_row<'py>(
        &self,
        py: Python<'py>,
        user_pk: &Bound<'py, PyAny>,
        fresh_until_us: i64,
        values: Vec<(String, Bound<'py, PyAny>)>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let user_key = user_pk_text(&user_pk_from_py(user_pk)?);
        let row = Self::user_row(fresh_until_us, &values)?;
        Ok(PyBytes::new(py, &row.encode(&self.record_keys[0], &user_key, Incarnation::DETACHED)))
    }

    /// `(fresh_until_us, [(tag, primitive), ...])`, or None if `data` is not a row
    /// `encode_user_row` signed for this user (garbage, altered, forged, another user's).
    fn decode_user_row<'py>(
        &self,
        py: Python<'py>,
        user_pk: &Bound<'py, PyAny>,
        data: &[u8],
    ) -> PyResult<Option<DecodedUserRow>> {
        self.signed_row_to_py(py, data, &user_pk_text(&user_pk_from_py(user_pk)?), Incarnation::DETACHED)
    }

    /// One command, for operators' tools (`manage.py knox_redis`, system checks): INFO, SCAN,
    /// UNLINK, CONFIG GET, MEMORY USAGE... Under the same timeouts, not through the breaker
    /// (an operator asks now). Replies: None, int, bytes, str (status), float, bool, list,
    /// dict; an error reply raises `CacheError`. On a Cluster, `node` (one of `primaries`)
    /// says where; without it, a primary (a command on a key there is redirected to the
    /// key's node).
    #[pyo3(signature = (args, node = None))]
    fn command<'py>(&self, py: Python<'py>, args: Vec<Vec<u8>>, node: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
        let Some((name, rest)) = args.split_first() else {
            return Err(Error::Invalid("a command needs a name".into()).into());
        };
        let run = |conn: &mut Conn| {
            let mut cmd = redis::cmd(&String::from_utf8_lossy(name));
            for arg in rest {
                cmd.arg(arg);
            }
            cmd.query(conn)
        };
        let reply: redis::Value = py.detach(|| match (node, &self.cluster) {
            (None, _) => self.call_with(false, run),
            (Some(node), Some(cluster)) => {
                let pool = cluster.pool_at(node).map_err(|e| Error::from_redis(&e))?;
                let mut checkout = pool.checkout(false).map_err(|e| Error::from_redis(&e))?;
                let reply = run(&mut checkout.conn).map_err(|e| Error::from_redis(&e))?;
                pool.checkin(checkout);
                Ok(reply)
            }
            (Some(_), None) => Err(Error::Invalid("`node` is for a Redis Cluster only".into())),
        })?;
        reply_to_py(py, reply)
    }

    /// On a Cluster, `host:port` of every primary as the slot map names them (asked for first
    /// if none is known); empty otherwise.
    fn primaries(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let Some(cluster) = &self.cluster else { return Ok(Vec::new()) };
        py.detach(|| {
            if cluster.primaries().is_empty() {
                cluster.refresh().map_err(|e| Error::from_redis(&e))?;
            }
            Ok::<_, Error>(cluster.primaries().iter().map(ToString::to_string).collect())
        })
        .map_err(Into::into)
    }

    /// For `check --deploy` (`LOCAL_CACHE_SIZE`): may this user subscribe to these channels?
    /// Tried on a connection of its own, closed at once (a subscribed connection can't go back
    /// to the pool). Raises `CacheError` with Redis' refusal.
    fn probe_subscribe(&self, py: Python<'_>, channels: Vec<String>) -> PyResult<()> {
        let connector = self.pool.connector();
        py.detach(|| {
            let mut conn = connector.connect().map_err(|e| Error::from_redis(&e))?;
            redis::cmd("SUBSCRIBE").arg(&channels).query::<redis::Value>(&mut conn).map_err(|e| Error::from_redis(&e))
        })?;
        Ok(())
    }

    /// Round trip to Redis (through the breaker); raises `CacheUnavailable` if it can't.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.call(|conn| redis::cmd("PING").query::<()>(conn)))?;
        Ok(())
    }

    /// Drop pooled connections, close the breaker, stop the tracking listener and empty the
    /// in-process cache (settings changed, tests): the client is done with.
    fn reset(&self, py: Python<'_>) {
        self.pool.clear();
        if let Some(cluster) = &self.cluster {
            cluster.clear();
        }
        self.pool.breaker().reset();
        if let Some(cluster) = &self.cluster {
            cluster.reset_breakers();
        }
        if let Some(listener) = &self.listener {
            py.detach(|| listener.stop(true));
        }
        if let Some(local) = &self.local {
            local.dead();
        }
        self.decoded.clear();
    }

    /// For tests only (not part of the API): hold the tracking listener's thread just before
    /// it would read its socket, as if the OS didn't run it (`hold=True`; True once it is
    /// held, within a second), or let it go. Shows that requests apply Redis' pushes
    /// themselves. A method of this object rather than a setting, so nothing outside a test
    /// that calls it can turn it on.
    fn _hold_listener(&self, py: Python<'_>, hold: bool) -> bool {
        let Some(listener) = &self.listener else { return false };
        py.detach(|| listener.hold(hold, Duration::from_secs(1)))
    }

    /// Is the in-process cache serving hits (its listener live)? False without one.
    #[getter]
    fn local_cache_live(&self) -> bool {
        self.local.as_ref().is_some_and(|local| local.is_live())
    }

    /// Why the in-process cache's listener is not live, if its last session failed (None
    /// without one, or once a heartbeat came back).
    #[getter]
    fn local_cache_error(&self) -> Option<String> {
        self.local.as_ref().and_then(|local| local.last_error())
    }

    /// Sentinel mode: `host:port` of the primary the sentinels named last (None before the
    /// first connection, and without Sentinel).
    #[getter]
    fn primary_address(&self) -> Option<String> {
        self.pool.primary()
    }

    #[getter]
    fn breaker_open(&self) -> bool {
        self.pool.breaker().is_open() || self.cluster.as_ref().is_some_and(Cluster::breaker_open)
    }

    #[getter]
    fn key_prefix(&self) -> &str {
        &self.prefix
    }

    fn token_key(&self, token_key: &str) -> String {
        self.token_key_name(token_key)
    }

    fn user_key(&self, user_pk: &Bound<'_, PyAny>) -> PyResult<String> {
        Ok(self.user_key_name(&user_pk_from_py(user_pk)?))
    }

    /// This process's counters since this client was created (`knox_redis.stats()` has them
    /// all, since the process started).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in self.metrics.since_created() {
            dict.set_item(name, value)?;
        }
        let idle = self.pool.idle_count() + self.cluster.as_ref().map_or(0, Cluster::idle_count);
        dict.set_item("idle_connections", idle)?;
        if self.pool.is_sentinel() {
            dict.set_item("revocations_kept", self.journal.len())?;
        }
        if let Some(local) = &self.local {
            dict.set_item("local_entries", local.len())?;
            dict.set_item("local_live", u8::from(local.is_live()))?;
        }
        Ok(dict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_unique_hex() {
        let a = new_generation();
        let b = new_generation();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn scripts_reference_only_fields_they_document() {
        for src in [
            include_str!("lua/same_server.lua"),
            include_str!("lua/lookup.lua"),
            include_str!("lua/fill.lua"),
            include_str!("lua/claim.lua"),
            include_str!("lua/revoke.lua"),
        ] {
            assert!(!src.contains("KEYS[0]"), "Lua arrays start at 1");
        }
    }
}
