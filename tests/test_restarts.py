"""Restarts and failovers never bring a revoked token back.

A Redis restarted from an older RDB snapshot (here: `SAVE`, then a logout, then the server
killed and started again on the same directory) holds the records and generations it had at
the snapshot, those of tokens revoked since included. A record is trusted only by the
incarnation of Redis that it was written to (its run_id and replication id, learned once per
connection), so each such record is a miss, read once from the database (the cold start), and
a fill whose lookup ran before the restart is refused even though its generation is back. The
same after a Sentinel failover, for records the new primary got from the old one, and after a
role change made by hand, which leaves the clients' connections open."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest
import redis as redis_py
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.helpers import accepted, authenticate, queries_of, record_exists
from tests.servers import RedisServer, SentinelSetup, SentinelUnavailable


@pytest.fixture
def persistent(via) -> Iterator[RedisServer]:
    """A redis-server of the test's own, whose directory survives its restarts."""
    server = RedisServer().start()
    via(server.url)
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def conn_to(server: RedisServer) -> redis_py.Redis:
    return redis_py.Redis(port=server.port)


def counters() -> dict[str, int]:
    return dict(cache.get_client().stats())


def digest_of(token: str) -> str:
    return AuthToken.objects.get(token_key=token[:15]).digest


def queries_to_authenticate(token: str) -> int:
    ok, sql = queries_of(lambda: accepted(token))
    assert ok
    return len(sql)


def test_a_token_revoked_after_the_snapshot_stays_revoked_after_a_restart(persistent, make_token):
    revoked, valid = make_token(), make_token()
    for token in (revoked, valid):
        assert accepted(token)  # first sight: cached
        assert queries_to_authenticate(token) == 1  # a hit: the user, by primary key
    conn_to(persistent).save()
    AuthToken.objects.filter(token_key=revoked[:15]).delete()  # a logout: revoked in Redis first
    assert not record_exists(conn_to(persistent), revoked)
    assert not accepted(revoked)

    persistent.restart()
    assert record_exists(conn_to(persistent), revoked)  # back from the snapshot
    before = counters()
    assert not accepted(revoked)
    # The valid token: one re-read (knox's two queries, as any miss), then hits again.
    assert queries_to_authenticate(valid) == 2
    assert queries_to_authenticate(valid) == 1
    after = counters()
    # Both records told by their incarnation hint (or, when the hints collide, 1 in 256, by
    # the MAC keyed from the incarnation).
    assert sum(after[name] - before[name] for name in ("other_incarnation", "bad_mac")) == 2
    assert after["hits"] - before["hits"] == 1
    assert not accepted(revoked)


def wait_until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("local_cache_size", [0, 100], ids=["redis", "in-process"])
def test_a_role_change_by_hand_does_not_bring_a_revoked_token_back(persistent, make_token, settings, local_cache_size):
    """An operator's REPLICAOF (not Sentinel's, which also kills the clients' connections) turns
    the node this process talks to into a replica of another that missed a logout. The pooled
    connections stay open and the replicated records carry the incarnation they learned; every
    script checks the server's master_replid first, so the first call on one of them is
    refused there and retried on a new connection, which reads those records as misses."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": local_cache_size}
    if local_cache_size:
        wait_until(lambda: cache.get_client().local_cache_live, "the listener never went live")
    other = RedisServer().start()
    try:
        primary, replica = conn_to(persistent), conn_to(other)
        for conn in (primary, replica):
            conn.config_set("repl-diskless-sync-delay", 0)  # a full sync at once, not in 5 s
        replica.replicaof("127.0.0.1", persistent.port)
        wait_until(lambda: replica.info("replication")["master_link_status"] == "up", "replica never synced")
        revoked, valid = make_token(), make_token()
        for token in (revoked, valid):
            assert accepted(token)
            assert queries_to_authenticate(token) == 1  # hits, on pooled connections
        primary.set("knox-test:replicated", 1)  # WAIT waits for this connection's writes
        assert primary.execute_command("WAIT", 1, 2000) == 1
        assert record_exists(replica, revoked)

        replica.replicaof("NO", "ONE")  # cut off: it misses the logout that follows
        wait_until(lambda: primary.info("replication")["connected_slaves"] == 0, "the replica never left")
        AuthToken.objects.filter(token_key=revoked[:15]).delete()
        assert not accepted(revoked)

        primary.replicaof("127.0.0.1", other.port)  # by hand: it now serves the other's dataset
        wait_until(lambda: primary.info("replication")["master_link_status"] == "up", "never synced back")
        assert record_exists(primary, revoked)  # back, under the incarnation the pool learned
        before = knox_redis.stats()["role_changes"]
        assert not accepted(revoked)
        assert knox_redis.stats()["role_changes"] > before
        assert accepted(valid)  # from the database: on a replica, nothing is trusted nor written
        assert not accepted(revoked)
    finally:
        other.stop()
        shutil.rmtree(other.dir, ignore_errors=True)


def test_a_fill_in_flight_across_a_restart_is_refused(persistent, make_token, monkeypatch):
    """lookup -> the token logged out -> Redis restarted from a snapshot taken before the
    logout -> the fill: the generation the lookup saw is back in Redis, but it was seen by
    another incarnation, so the fill is refused and the logged-out token is never cached."""
    token = make_token()
    native = cache.get_client()
    digest = digest_of(token)
    _record, generation, *_ = native.lookup(token[:15], digest, True)  # as a first sight does
    assert generation is not None
    conn_to(persistent).save()
    key, field = native.token_key(token[:15]), f"g:{digest[:32]}"
    real_fill = cache._fill
    restored: list[bytes | None] = []

    def logout_and_restart_then_fill(values, generation, *args):
        AuthToken.objects.filter(token_key=token[:15]).delete()
        persistent.restart()
        restored.append(conn_to(persistent).hget(key, field))
        return real_fill(values, generation, *args)

    monkeypatch.setattr(cache, "_fill", logout_and_restart_then_fill)
    refused = counters()["fills_refused"]
    assert accepted(token)  # this request read the row before the logout: accepted, as by knox
    monkeypatch.undo()
    # Only the incarnation told the fill apart: the generation it presented is in Redis again.
    (back,) = restored
    assert back is not None
    assert generation.endswith(back)
    assert counters()["fills_refused"] == refused + 1
    assert not record_exists(conn_to(persistent), token)
    assert not accepted(token)


def test_a_claim_before_a_restart_fills_nothing_after_it(persistent, user):
    """Write-through at login: the lease claimed before the INSERT was taken by the Redis that
    restarted since; the fill after commit is refused."""
    native = cache.get_client()
    instance, token = AuthToken.objects.create(user=user)  # claimed and filled: cached
    conn = conn_to(persistent)
    conn.delete(native.token_key(instance.token_key))
    claimed = native.claim(instance.token_key, instance.digest)
    assert claimed is not None
    conn.save()
    persistent.restart()
    assert conn.hget(native.token_key(instance.token_key), f"g:{instance.digest[:32]}") is not None
    assert not cache._fill(cache._values(instance), claimed)
    assert accepted(token)  # from the database, then cached under this incarnation
    assert queries_to_authenticate(token) == 1


def test_a_restored_user_row_is_not_used(persistent, make_token, user, settings):
    """USER_CACHE: a user row cached before the snapshot and changed since comes back with
    the restart; it is read from the database again, never built from the restored row."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    token = make_token()
    assert accepted(token)
    assert accepted(token)  # caches the user's row
    assert queries_to_authenticate(token) == 0
    conn_to(persistent).save()
    user.first_name = "Changed"
    user.save()
    persistent.restart()
    assert conn_to(persistent).hexists(f"knox:user:{user.pk}:ix", "u")  # the old row is back
    # One re-read of the token (knox's two queries), one of the user's row, then none.
    assert queries_to_authenticate(token) == 2
    found, sql = queries_of(lambda: authenticate(token))
    assert found[0].first_name == "Changed"
    assert len(sql) == 1
    found, sql = queries_of(lambda: authenticate(token))
    assert found[0].first_name == "Changed"
    assert sql == []


def test_a_user_row_fill_in_flight_across_a_restart_is_refused(persistent, user, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    native = cache.get_client()
    _row, generation = native.lookup_user(user.pk, True)
    assert generation is not None
    conn_to(persistent).save()
    persistent.restart()
    assert conn_to(persistent).hexists(f"knox:user:{user.pk}:ix", "ug")  # the generation is back
    assert not native.fill_user(user.pk, generation, 10**16, [("", user.pk)], 60_000)
    assert not conn_to(persistent).hexists(f"knox:user:{user.pk}:ix", "u")


COLD_START_TOKENS = 20


def test_cold_start_costs_one_re_read_per_token(persistent, make_token):
    """The cost of a restart from a snapshot, measured: each token cached before it is read
    from the database once (knox's two queries, as any miss), then hits (one query) again."""
    tokens = [make_token() for _ in range(COLD_START_TOKENS)]
    for token in tokens:
        assert accepted(token)
    assert sum(queries_to_authenticate(t) for t in tokens) == COLD_START_TOKENS  # warm: 1 each
    conn_to(persistent).save()
    persistent.restart()
    first = sum(queries_to_authenticate(t) for t in tokens)
    second = sum(queries_to_authenticate(t) for t in tokens)
    print(f"cold start: {first / COLD_START_TOKENS} queries per token, then {second / COLD_START_TOKENS}")
    assert (first, second) == (2 * COLD_START_TOKENS, COLD_START_TOKENS)


def test_revoking_a_restored_record_still_deletes_it(persistent, make_token):
    """A revocation after the restart reaches records of any incarnation: nothing is left that
    a later, third incarnation could mistake for its own."""
    token = make_token()
    assert accepted(token)
    conn_to(persistent).save()
    persistent.restart()
    assert record_exists(conn_to(persistent), token)
    AuthToken.objects.filter(token_key=token[:15]).delete()
    assert not record_exists(conn_to(persistent), token)


@pytest.mark.slow
def test_after_a_sentinel_failover_replicated_records_are_read_once_then_hit(settings, make_token):
    try:
        setup = SentinelSetup().start()
    except SentinelUnavailable as exc:
        pytest.skip(str(exc))
    try:
        redis_py.Redis(port=setup.primary_port()).flushall()
        settings.REST_KNOX_REDIS = {
            "SENTINELS": setup.sentinel_addresses,
            "SENTINEL_SERVICE_NAME": setup.service,
            "CIRCUIT_BREAKER_COOLDOWN": 0.5,
        }
        token = make_token()
        assert accepted(token)
        assert queries_to_authenticate(token) == 1
        old = redis_py.Redis(port=setup.primary_port())
        old.set("knox-test:replicated", 1)
        assert old.execute_command("WAIT", 1, 2000) == 1  # the record is on the replica too
        new_port = setup.failover()
        assert record_exists(redis_py.Redis(port=new_port), token)  # replicated from the old one
        deadline = time.monotonic() + 10
        while cache.get_client().primary_address != f"127.0.0.1:{new_port}":
            assert time.monotonic() < deadline, "the process never moved to the new primary"
            time.sleep(0.2)
            with suppress(cache.CacheError):
                cache.redis_command("PING")  # the next use asks the sentinels (every second)
        before = counters()
        assert queries_to_authenticate(token) == 2  # written by the old primary: a miss, once
        assert queries_to_authenticate(token) == 1
        after = counters()
        # Told by the record's one-byte incarnation hint; when the two incarnations' hints
        # collide (1 in 256), by its MAC, which is keyed from the incarnation.
        told = {name: after[name] - before[name] for name in ("other_incarnation", "bad_mac")}
        assert sum(told.values()) == 1, told
        # A revocation on a primary with a replica online waits for it (WAIT 1) and succeeds.
        AuthToken.objects.filter(token_key=token[:15]).delete()
        assert not accepted(token)
    finally:
        setup.stop()
