//! Which incarnation of the Redis dataset a connection talks to, so that a record is trusted
//! only by the incarnation that wrote it.
//!
//! A Redis that restarts from an older RDB/AOF, or a replica promoted before it received the
//! last writes, brings back records of tokens revoked since, with the generations they had.
//! Each new connection therefore asks the server, once, who it is (the `server` and
//! `replication` sections of one `INFO`: one round trip, pooled connections reuse the answer):
//!
//! - `run_id`: random at every start of the process, never persisted nor replicated, so a
//!   restart (whatever it loads) is another incarnation;
//! - `master_replid`: random again whenever a node becomes a primary (a promoted replica, an
//!   old primary promoted back after a failover to another node and back), so a node that
//!   goes A → replica → A again is another incarnation too, although its `run_id` is the same.
//!
//! A connection can't outlive its server process, but it does outlive a role change made by
//! hand (`REPLICAOF` sent by an operator or a script, not by Sentinel: Sentinel also sends
//! `CLIENT KILL TYPE normal`): the node then serves another dataset (its new primary's) on the
//! same connections, under another `master_replid`. So every script that trusts or writes a
//! record first compares the server's `master_replid` with the one the connection learned
//! (`lua/same_server.lua`, one `INFO replication` inside the script: about 2 µs of server time)
//! and refuses to run on a mismatch; the client then drops its idle connections and retries
//! once on a new one, which learns the new incarnation. `run_id` needs no such check: a
//! restart closes every connection.
//!
//! The incarnation is 16 bytes of SHA-256 over both: it goes into the MAC of every record
//! and user row (a restored record fails to verify under the new incarnation), one byte of it
//! is stored beside them as a hint (to count such misses apart from forgeries), and it
//! prefixes the generations handed to Python, so a fill is sent only over a connection to the
//! incarnation its lookup (or claim) read.

use redis::{RedisError, RedisResult};
use sha2::{Digest, Sha256};

use crate::conn::Conn;

pub const INCARNATION_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Incarnation(pub [u8; INCARNATION_LEN]);

impl Incarnation {
    /// For values signed outside any connection (`encode_user_row`, tests): never the
    /// incarnation of a server.
    pub const DETACHED: Incarnation = Incarnation([0; INCARNATION_LEN]);

    pub fn of(run_id: &str, replid: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"knox_redis incarnation\0");
        hasher.update(run_id.as_bytes());
        hasher.update(b"\0");
        hasher.update(replid.as_bytes());
        let digest = hasher.finalize();
        let mut out = [0u8; INCARNATION_LEN];
        out.copy_from_slice(&digest[..INCARNATION_LEN]);
        Incarnation(out)
    }

    /// The byte stored beside a record or row: a differing hint tells "written by another
    /// incarnation" from "forged" (a matching hint with a failing MAC counts as `bad_mac`).
    pub fn hint(self) -> u8 {
        self.0[0]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Split a generation as Python holds it (this incarnation, then the generation Redis
    /// stores) into its two parts; None for anything shorter.
    pub fn split(generation: &[u8]) -> Option<(Incarnation, &[u8])> {
        if generation.len() <= INCARNATION_LEN {
            return None;
        }
        let (head, rest) = generation.split_at(INCARNATION_LEN);
        let mut out = [0u8; INCARNATION_LEN];
        out.copy_from_slice(head);
        Some((Incarnation(out), rest))
    }

    /// A generation Redis returned, as Python holds it: prefixed with this incarnation.
    pub fn prefix(self, generation: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(INCARNATION_LEN + generation.len());
        out.extend_from_slice(&self.0);
        out.extend_from_slice(generation);
        out
    }
}

/// What a connection learned of its server when it opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub incarnation: Incarnation,
    /// `master_replid` as the server spelled it: every script checks it is still the same
    /// (`lua/same_server.lua`).
    pub replid: String,
}

/// The error code `lua/same_server.lua` replies with.
pub const ROLE_CHANGED: &str = "KNOXREDIS_ROLE_CHANGED";

/// Did a script refuse to run because the server's role changed since the connection opened?
pub fn is_role_changed(err: &RedisError) -> bool {
    err.code() == Some(ROLE_CHANGED)
}

/// Ask the server on this new connection who it is (one round trip).
pub fn learn(conn: &mut Conn) -> RedisResult<Server> {
    // One command (its default sections hold both): one round trip, one socket timeout at
    // most on a hung server.
    let info: String = redis::cmd("INFO").query(conn).map_err(|err| {
        if crate::errors::is_connectivity(&err) {
            err
        } else {
            // Its own words (NOAUTH, NOPERM...): `check --deploy` tells refused credentials
            // from a refused INFO by them.
            let detail = err.to_string();
            RedisError::from((
                err.kind(),
                "INFO (sent on each new connection, to learn the server's run_id) failed",
                detail,
            ))
        }
    })?;
    let (server, replication) = (&info, &info);
    let Some(run_id) = field(server, "run_id").filter(|id| !id.is_empty()) else {
        return Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "the server's INFO has no run_id: can't tell a restarted server from the one that wrote a record",
        )));
    };
    let replid = field(replication, "master_replid").unwrap_or("").to_owned();
    Ok(Server { incarnation: Incarnation::of(run_id, &replid), replid })
}

/// The value of `name:value` in an INFO reply.
pub fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_exactly() {
        let info = "# Server\r\nrun_id_x:nope\r\nrun_id:abc123\r\nmaster_replid2:0000\r\nmaster_replid:ffee\r\n";
        assert_eq!(field(info, "run_id"), Some("abc123"));
        assert_eq!(field(info, "master_replid"), Some("ffee"));
        assert_eq!(field(info, "missing"), None);
    }

    #[test]
    fn a_restart_or_a_promotion_is_another_incarnation() {
        let a = Incarnation::of("run-a", "repl-1");
        assert_ne!(a, Incarnation::of("run-b", "repl-1"));
        assert_ne!(a, Incarnation::of("run-a", "repl-2"));
        assert_eq!(a, Incarnation::of("run-a", "repl-1"));
        assert_ne!(a, Incarnation::DETACHED);
    }

    #[test]
    fn generations_carry_their_incarnation() {
        let a = Incarnation::of("run-a", "repl-1");
        let held = a.prefix(b"0123456789abcdef");
        assert_eq!(Incarnation::split(&held), Some((a, &b"0123456789abcdef"[..])));
        assert_eq!(Incarnation::split(b"0123456789abcdef"), None);
    }
}
