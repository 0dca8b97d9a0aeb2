"""LOCAL_CACHE_SIZE: lookup replies kept in the process, kept coherent by Redis' client-side
caching (a listener thread gets every change under the prefix), served only while that
listener has heard from Redis within the last second. Real redis-server, real processes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
from django.db import connections
from knox.models import AuthToken

from knox_redis import cache
from tests.helpers import (
    a_write_behind_the_process_stops_the_next_local_hit,
    accepted,
    held_listener_then,
    served_locally,
    served_locally_soon,
)


@pytest.fixture
def local_cache(settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 100}
    wait_until(lambda: cache.get_client().local_cache_live)


def wait_until(condition, timeout: float = 5.0) -> float:
    """Seconds until `condition()` held (fails the test after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.001)
    return time.monotonic() - start


def settled() -> None:
    """Let Redis' pushes for the writes so far (a login's write-through) reach the listener:
    they may arrive after a lookup kept a reply, and rightly drop it. Two heartbeats (100 ms
    apart) coming back prove every earlier push has arrived."""
    time.sleep(0.3)


def evalsha_calls(redis_conn) -> int:
    return redis_conn.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def stats() -> dict:
    return cache.get_client().stats()


def test_a_repeat_hit_makes_no_network_call(local_cache, make_token, redis_conn):
    token = make_token(write_through=True)
    settled()
    assert accepted(token)  # from Redis, then kept
    before = evalsha_calls(redis_conn)
    for _ in range(5):
        assert accepted(token)
    assert evalsha_calls(redis_conn) == before
    assert stats()["local_hits"] == 5


def test_unknown_tokens_are_never_kept(local_cache, make_token):
    assert not accepted("0" * 64)
    assert not accepted("0" * 64)
    assert stats()["local_entries"] == 0


def test_the_revoking_process_drops_its_entry_before_returning(local_cache, make_token):
    token = make_token(write_through=True)
    assert accepted(token)
    assert accepted(token)
    AuthToken.objects.get().delete()
    assert not accepted(token)


def test_a_change_made_behind_the_process_reaches_it(local_cache, make_token, redis_conn):
    """A revocation written to Redis by someone else (here: by hand) empties the entry as soon
    as Redis' push arrives."""
    token = make_token(write_through=True)
    settled()
    assert accepted(token)
    assert stats()["local_entries"] == 1
    redis_conn.hset(f"knox:token:{token[:15]}", "unrelated", "x")  # any write to the key
    wait_until(lambda: stats()["local_entries"] == 0)


def test_flushall_empties_it(local_cache, make_token, redis_conn):
    token = make_token(write_through=True)
    assert accepted(token)
    redis_conn.flushall()
    wait_until(lambda: stats()["local_entries"] == 0)
    assert accepted(token)  # from the database again


def test_a_user_change_reaches_every_token_of_the_user(settings, local_cache, make_token, user):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    wait_until(lambda: cache.get_client().local_cache_live)
    tokens = [make_token(write_through=True) for _ in range(2)]
    for token in tokens:
        assert accepted(token)
        assert accepted(token)
    user.is_active = False
    user.save()
    for token in tokens:
        assert not accepted(token)


def test_a_cut_connection_stops_local_hits_within_a_second(settings, make_token, proxy, via):
    via(proxy.url)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 100}
    wait_until(lambda: cache.get_client().local_cache_live)
    token = make_token(write_through=True)
    settled()
    assert accepted(token)
    assert stats()["local_entries"] == 1
    proxy.blackhole()  # the listener hears nothing from now on
    delay = wait_until(lambda: not cache.get_client().local_cache_live, timeout=3)
    assert delay <= 1.2
    assert stats()["local_entries"] == 0
    assert accepted(token)  # the database answers (the breaker sends it there)
    proxy.heal()
    wait_until(lambda: cache.get_client().local_cache_live, timeout=5)


def test_a_restarted_redis_is_a_fresh_start(local_cache, make_token, redis_server):
    token = make_token(write_through=True)
    assert accepted(token)
    redis_server.stop()
    wait_until(lambda: stats()["local_entries"] == 0)
    redis_server.start()
    wait_until(lambda: cache.get_client().local_cache_live, timeout=10)
    assert accepted(token)


def serve_until_rejected(token: str, conn) -> None:
    """A forked process: its own client and listener (nothing inherited), the token served
    from its in-process cache; then, once told the token is revoked, how long until it stops
    accepting it."""
    connections.close_all()
    try:
        assert cache.get_client().stats()["local_entries"] == 0  # starts empty: nothing inherited
        wait_until(lambda: cache.get_client().local_cache_live)
        assert accepted(token)
        assert accepted(token)
        assert cache.get_client().stats()["local_hits"] >= 1
        conn.send("ready")
        conn.recv()  # the other process's revocation has returned
        revoked_at = time.monotonic()
        while accepted(token):
            pass
        conn.send({"delay": time.monotonic() - revoked_at})
    except BaseException as exc:
        conn.send({"error": repr(exc)})
    finally:
        connections.close_all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_revocation_by_another_process_stops_the_token_there(local_cache, make_token):
    """Two real processes: one serves the token from its in-process cache, the other logs it
    out. The first stops accepting it as soon as Redis' push arrives (at worst, when its
    heartbeat lapses: one second)."""
    token = make_token(write_through=True)
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=serve_until_rejected, args=(token, there))
    child.start()
    try:
        assert here.poll(15)
        assert here.recv() == "ready"
        AuthToken.objects.get().delete()  # returns: the token is revoked
        here.send("go")
        assert here.poll(15)
        result = here.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert "error" not in result, result
    assert result["delay"] < 1.0
    print(f"revocation seen by the other process after {result['delay'] * 1000:.2f} ms")


def revoke_in_child(token: str) -> None:
    """Another process: its own client (nothing inherited), a logout through the ORM."""
    connections.close_all()
    AuthToken.objects.filter(token_key=token[:15]).delete()
    connections.close_all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_the_next_request_sees_another_process_revocation_while_the_listener_cant_run(local_cache, make_token):
    """The listener thread held where it would read its socket (as if the OS didn't run it on
    a loaded machine): another process logs the token out, and the very next request here
    rejects it. It drained Redis' push from the socket itself (the push is written before the
    logout's reply: tracking.rs), not waiting for the thread or for the heartbeat to lapse."""
    token = make_token(write_through=True)
    served_locally_soon(token)
    connections.close_all()
    invalidations = stats()["local_invalidations"]

    def another_process_logs_out() -> None:
        child = multiprocessing.get_context("fork").Process(target=revoke_in_child, args=(token,))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert cache.get_client().local_cache_live  # the heartbeat still vouches: not what stops it
        assert not accepted(token)
        assert cache.get_client()._hold_listener(True)  # still held all along

    held_listener_then(another_process_logs_out)
    assert stats()["local_invalidations"] > invalidations


def test_a_push_is_applied_by_the_next_request_while_the_listener_cant_run(local_cache, make_token, redis_conn):
    token = make_token(write_through=True)
    settled()
    a_write_behind_the_process_stops_the_next_local_hit(
        token, lambda: redis_conn.hset(f"knox:token:{token[:15]}", "unrelated", "x")
    )


def test_flushall_reaches_the_next_request_while_the_listener_cant_run(local_cache, make_token, redis_conn):
    token = make_token(write_through=True)
    served_locally_soon(token)

    def flush_then_next_request() -> None:
        redis_conn.flushall()
        assert not served_locally(token)  # the null invalidation, applied by this request
        assert stats()["local_entries"] <= 1  # at most what that request kept again

    held_listener_then(flush_then_next_request)


# --- holes a review found (each failed before its fix) ------------------------------------


def test_two_requests_that_missed_together_leave_a_revocable_entry(settings, make_token, redis_conn):
    """Two threads miss the same token at once (both tickets taken before either stores); the
    revocation that follows must still reach the entry they kept."""
    # A SOCKET_TIMEOUT that a 150 ms CLIENT PAUSE doesn't reach.
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 100, "SOCKET_TIMEOUT": 2.0}
    wait_until(lambda: cache.get_client().local_cache_live)
    token = make_token(write_through=True)
    settled()
    row = AuthToken.objects.get()
    redis_conn.execute_command("CLIENT", "PAUSE", 150, "ALL")  # both lookups in flight together
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.lookup(row.token_key, row.digest))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None and r.record is not None for r in results)
    assert stats()["local_entries"] == 1
    row.delete()
    assert not accepted(token)
    settled()
    assert not accepted(token)


def test_repeat_hits_with_user_cache_make_no_network_call(settings, make_token, redis_conn):
    """A lookup that reads a user row writes nothing unless it creates a generation: any write
    would be pushed as an invalidation of the user's key, dropping the entry it just kept (here
    the user key's TTL, from MAX_CACHE_TTL, is below the lease: a lookup used to extend it)."""
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "LOCAL_CACHE_SIZE": 100,
        "USER_CACHE": True,
        "USER_CACHE_TTL": 10,
        "MAX_CACHE_TTL": 20,
    }
    wait_until(lambda: cache.get_client().local_cache_live)
    token = make_token(write_through=True)
    for _ in range(3):  # the token's record, the user row's fill, then kept
        assert accepted(token)
        settled()
    before = evalsha_calls(redis_conn)
    for _ in range(5):
        assert accepted(token)
    assert evalsha_calls(redis_conn) == before


def test_a_lapsed_key_reaches_the_listener(local_cache, make_token, redis_conn):
    token = make_token(write_through=True)
    settled()
    assert accepted(token)
    assert stats()["local_entries"] == 1
    redis_conn.pexpire(f"knox:token:{token[:15]}", 50)
    wait_until(lambda: stats()["local_entries"] == 0, timeout=3)


def test_a_listener_that_cant_go_live_says_why(settings, make_token, caplog):
    """An ACL without CLIENT TRACKING: the in-process cache never serves, and the log says why
    (once per WARNING_INTERVAL), never with the password."""
    from tests.servers import RedisServer
    from tests.test_checks import readme_acl

    rules = [rule for rule in readme_acl() if rule != "+client|tracking"]
    server = RedisServer(extra_args=("--user", "knox", "on", ">knox-pw-7d1", *rules)).start()
    try:
        settings.REST_KNOX_REDIS = {
            **settings.REST_KNOX_REDIS,
            "REDIS_URL": f"redis://knox:knox-pw-7d1@127.0.0.1:{server.port}/0",
            "LOCAL_CACHE_SIZE": 100,
        }
        token = make_token()
        cache._last_warning.clear()
        wait_until(lambda: cache.get_client().local_cache_error is not None)
        with caplog.at_level("WARNING", logger="knox_redis"):
            assert accepted(token)  # from Redis and the database: the cache isn't needed to answer
            assert accepted(token)
        warnings = [r.getMessage() for r in caplog.records if "listener" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "tracking" in warnings[0].lower() or "noperm" in warnings[0].lower(), warnings
        assert "knox-pw-7d1" not in warnings[0]
        assert not cache.get_client().local_cache_live
    finally:
        cache.reset_client()
        server.stop()


def test_a_repeat_hit_shares_what_redis_said_never_the_instances(settings, local_cache, make_token, user):
    """A repeat hit serves the Lookup built for the first (no decoding, no converters again),
    but every request gets a user and a token of its own."""
    from tests.helpers import authenticate

    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    wait_until(lambda: cache.get_client().local_cache_live)
    token = make_token(write_through=True)
    assert accepted(token)  # the user's row cached
    settled()
    first_user, first_token = authenticate(token)
    first_user.first_name, first_user.is_active = "mutated", False
    first_token.expiry = None
    second_user, second_token = authenticate(token)
    assert second_user is not first_user
    assert second_token is not first_token
    assert second_user.first_name == user.first_name
    assert second_user.is_active
    assert second_token.expiry is not None
    assert second_token.user is second_user
    digest = cache.sha512_hex(token)
    assert cache.lookup(token[:15], digest) is cache.lookup(token[:15], digest)
    assert stats()["local_hits"] >= 3
