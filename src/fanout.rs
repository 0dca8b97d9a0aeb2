//! Redis Cluster: commands on keys of several nodes (a revocation), sent as one pipeline per
//! node, every reply read under one deadline.
//!
//! The pipelines all go out before any reply is read, so the nodes work at the same time, and
//! each read waits only for what is left of the deadline: a hung node costs the deadline once,
//! not a socket timeout per reply (nor per node). A command a node answers with a redirection
//! is sent again in another round, within the same deadline: to the node a `MOVED` names (the
//! map is corrected), after `ASKING` to the node an `ASK` names, or after a pause for
//! `TRYAGAIN`. With `wait_ms`, each node that has a replica (as the map lists them: the cluster
//! leaves out replicas it flagged as failed; or as a script's reply reports them) is sent
//! `WAIT 1 wait_ms` after its commands, on the same connection, and a node whose replicas don't
//! acknowledge in time fails the call: as on a single primary, a revocation a failover could
//! lose is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, RedisError, RedisResult, Value};

use crate::cluster::{self, Cluster, Redirect};
use crate::pool::{Checkout, Pool};

/// A command and the key it is routed by.
pub struct Routed {
    pub key: String,
    pub cmd: Cmd,
}

/// Where a redirection sends a command: the node's pool, and whether `ASKING` goes first.
type Redirected = Option<(Arc<Pool>, bool)>;

/// One node's share of a round: its pool and address, and the commands (index, ASKING?).
struct Share {
    pool: Arc<Pool>,
    address: Arc<str>,
    commands: Vec<(usize, bool)>,
}

/// Each command's reply, in order: its value, or the error it was answered with (other than a
/// redirection). Fails as a whole if a node can't be reached, doesn't answer in time, or (with
/// `wait_ms`) its replicas don't acknowledge. `prelude` goes first in every pipeline (`SCRIPT
/// LOAD` of the scripts the commands run by `EVALSHA`: no NOSCRIPT round on a node that never
/// ran them, nor after a failover to one). Connections go back to their pools with their
/// socket timeout as it was.
pub fn fan_out(
    cluster: &Cluster,
    commands: &[Routed],
    deadline: Instant,
    wait_ms: Option<u64>,
    prelude: &[Cmd],
) -> RedisResult<Vec<RedisResult<Value>>> {
    match fan_out_once(cluster, commands, deadline, wait_ms, prelude) {
        // An idle connection a node closed (its `timeout`, a restart, CLIENT KILL): once more,
        // on new ones (every command here may run twice: revocations, prunes and reads).
        Err(err) if err.is_connection_dropped() && !err.is_timeout() => {
            cluster.clear();
            fan_out_once(cluster, commands, deadline, wait_ms, prelude)
        }
        result => result,
    }
}

fn fan_out_once(
    cluster: &Cluster,
    commands: &[Routed],
    deadline: Instant,
    wait_ms: Option<u64>,
    prelude: &[Cmd],
) -> RedisResult<Vec<RedisResult<Value>>> {
    let replies = commands.iter().map(|_| None).collect();
    let mut round = Round { cluster, commands, deadline, wait_ms, prelude, replies };
    let mut pending: Vec<(usize, Redirected)> = (0..commands.len()).map(|i| (i, None)).collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        if rounds > cluster::MAX_REDIRECTS || Instant::now() >= deadline {
            return Err(timed_out("the cluster kept redirecting the revocation's commands"));
        }
        rounds += 1;
        pending = round.run(pending)?;
    }
    round
        .replies
        .into_iter()
        .map(|reply| reply.ok_or_else(|| timed_out("a command of the revocation got no reply")))
        .collect()
}

struct Round<'a> {
    cluster: &'a Cluster,
    commands: &'a [Routed],
    deadline: Instant,
    wait_ms: Option<u64>,
    prelude: &'a [Cmd],
    replies: Vec<Option<RedisResult<Value>>>,
}

impl Round<'_> {
    /// Send `pending` (every node's pipeline first, then every read); returns what was
    /// redirected, to send again.
    fn run(&mut self, pending: Vec<(usize, Redirected)>) -> RedisResult<Vec<(usize, Redirected)>> {
        let mut shares: Vec<Share> = Vec::new();
        for (index, redirect) in pending {
            let (pool, asking) = match redirect {
                Some(target) => target,
                None => (self.cluster.pool_for(cluster::slot(self.commands[index].key.as_bytes()))?.0, false),
            };
            let address: Arc<str> = Arc::from(pool.address());
            match shares.iter_mut().find(|share| share.address == address) {
                Some(share) => share.commands.push((index, asking)),
                None => shares.push(Share { pool, address, commands: vec![(index, asking)] }),
            }
        }
        let mut sent = Vec::with_capacity(shares.len());
        for share in shares {
            let mut checkout = share.pool.checkout(false)?;
            let waits = self.wait_ms.is_some() && self.cluster.replicas(&share.address) > 0;
            let mut pipe = redis::pipe();
            for cmd in self.prelude {
                pipe.add_command(cmd.clone());
            }
            for &(index, asking) in &share.commands {
                if asking {
                    pipe.cmd("ASKING");
                }
                pipe.add_command(self.commands[index].cmd.clone());
            }
            if let (true, Some(wait_ms)) = (waits, self.wait_ms) {
                pipe.cmd("WAIT").arg(1).arg(wait_ms);
            }
            checkout.conn.send_packed_command(&pipe.get_packed_pipeline())?;
            sent.push((share, checkout, waits));
        }
        let mut again = Vec::new();
        let mut try_again = false;
        for (share, mut checkout, waits) in sent {
            try_again |= self.read_share(&share, &mut checkout, waits, &mut again)?;
            checkout.conn.set_read_timeout(Some(share.pool.io_timeout()))?;
            share.pool.checkin(checkout);
        }
        if try_again {
            std::thread::sleep(cluster::TRY_AGAIN.min(self.deadline.saturating_duration_since(Instant::now())));
        }
        Ok(again)
    }

    /// Read one node's replies (then its WAIT's); redirected commands go to `again`. True if
    /// one was answered TRYAGAIN.
    fn read_share(
        &mut self,
        share: &Share,
        checkout: &mut Checkout,
        waits: bool,
        again: &mut Vec<(usize, Redirected)>,
    ) -> RedisResult<bool> {
        let mut try_again = false;
        let mut replicas_reported = 0;
        // Whether anything ran there: a node that redirected every command (a primary demoted
        // since the map was read) wrote nothing to wait for, and refuses WAIT.
        let mut ran = false;
        for _ in self.prelude {
            read(checkout, self.deadline)?.extract_error()?;
        }
        for &(index, asking) in &share.commands {
            if asking {
                read(checkout, self.deadline)?.extract_error()?; // ASKING's OK
            }
            let reply = read(checkout, self.deadline)?.extract_error();
            let Err(err) = reply else {
                ran = true;
                let value = reply?;
                replicas_reported = replicas_reported.max(replicas_in(&value));
                self.replies[index] = Some(Ok(value));
                continue;
            };
            match Redirect::of(&err) {
                None => {
                    ran = true;
                    self.replies[index] = Some(Err(err));
                }
                Some(Redirect::Moved { slot, to }) => {
                    self.cluster.moved(slot, &cluster::resolve(&to, &share.address));
                    again.push((index, None));
                }
                Some(Redirect::Ask { to, .. }) => {
                    let target = self.cluster.pool_at(&cluster::resolve(&to, &share.address))?;
                    again.push((index, Some((target, true))));
                }
                Some(Redirect::TryAgain) => {
                    try_again = true;
                    again.push((index, None));
                }
            }
        }
        let Some(wait_ms) = self.wait_ms else { return Ok(try_again) };
        let acknowledged = if waits {
            let reply = read(checkout, self.deadline)?.extract_error();
            if ran {
                Some(reply?)
            } else {
                None
            }
        } else if replicas_reported > 0 {
            // A replica the map didn't list yet: wait for it on this same connection (WAIT
            // counts this connection's writes).
            checkout.conn.send_packed_command(&redis::cmd("WAIT").arg(1).arg(wait_ms).get_packed_command())?;
            Some(read(checkout, self.deadline)?.extract_error()?)
        } else {
            None
        };
        if let Some(acknowledged) = acknowledged {
            let count: i64 = redis::from_redis_value(acknowledged)?;
            // A replica the map lists must acknowledge, even one the primary no longer counts
            // online (no ack for a second: cut off by a partition, as its primary may be): the
            // cluster promotes such a replica, not a lagging one's absence, and a primary on
            // the minority side takes writes until the node timeout.
            if count < 1 && (waits || replicas_reported > 0) {
                self.cluster.node_lost(""); // the map may be stale: ask again on the next use
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "no replica acknowledged the revocation in time (WAIT 1)",
                    format!("on {}, waited {wait_ms} ms", share.address),
                )));
            }
        }
        Ok(try_again)
    }
}

/// One reply, waiting at most until `deadline`.
fn read(checkout: &mut Checkout, deadline: Instant) -> RedisResult<Value> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        checkout.conn.abandon(); // replies still owed: never pooled again
        return Err(timed_out("the cluster's replies did not come within the revocation's deadline"));
    }
    checkout.conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    checkout.conn.recv_response()
}

/// The replicas a revocation script reports online (its reply's third element), else 0.
fn replicas_in(value: &Value) -> i64 {
    match value {
        Value::Array(items) if items.len() == 3 => match items[2] {
            Value::Int(n) => n,
            _ => 0,
        },
        _ => 0,
    }
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// `pipe` on one connection, all its replies read under `deadline` (a pipeline's own read
/// gives each reply the socket timeout: a hung server would cost one per command). Stops at
/// the first I/O error; a command's error reply is its result. The connection's socket timeout is
/// set back to `io_timeout`.
pub fn pipeline(
    conn: &mut crate::conn::Conn,
    pipe: &redis::Pipeline,
    deadline: Instant,
    io_timeout: Duration,
) -> RedisResult<Vec<RedisResult<Value>>> {
    conn.send_packed_command(&pipe.get_packed_pipeline())?;
    let mut replies = Vec::with_capacity(pipe.len());
    for _ in 0..pipe.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            conn.abandon(); // replies still owed: never pooled again
            return Err(timed_out("the pipeline's replies did not come within its deadline"));
        }
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        replies.push(conn.recv_response()?.extract_error());
    }
    conn.set_read_timeout(Some(io_timeout))?;
    Ok(replies)
}
