"""`manage.py knox_redis <action>` against a real redis-server: ping, stats, warm (under the
request lease: a logout during a warm is never undone), purge, clear-expired."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from knox.models import AuthToken
from knox.signals import token_expired

import knox_redis
from knox_redis import cache
from tests.helpers import accepted, authenticate, queries_of, record_exists
from tests.servers import free_port


def run(*args: str) -> dict:
    out = io.StringIO()
    call_command("knox_redis", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


def test_ping(transactional_db):
    result = run("ping")
    assert result["ok"] is True
    assert result["redis_version"][0].isdigit()
    assert result["latency_ms"] > 0


def test_ping_unreachable_is_an_error_exit(transactional_db, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with pytest.raises(CommandError, match="can't be reached"):
        run("ping")


def test_stats_counts_keys_under_the_prefix(make_token, redis_conn):
    hits = knox_redis.stats()["lookups_hit"]  # this process's, since it started
    for token in [make_token(write_through=True) for _ in range(3)]:
        assert accepted(token)
    redis_conn.set("other:key", "not ours")
    result = run("stats")
    assert result["keys"] == 4  # 3 token keys + the user's index
    assert result["estimated_bytes"] > 0
    assert result["maxmemory_policy"]
    assert result["process_counters"]["lookups_hit"] - hits == 3


def test_warm_caches_live_tokens_and_skips_expired_ones(make_token, redis_conn):
    live = [make_token() for _ in range(5)]
    expired = make_token(expiry=timedelta(seconds=-1))
    result = run("warm", "--batch-size", "2")
    assert result == {"tokens": 5, "cached": 5}
    assert all(record_exists(redis_conn, t) for t in live)
    assert not record_exists(redis_conn, expired)
    _, sql = queries_of(lambda: authenticate(live[0]))
    assert len(sql) == 1  # a hit


def test_a_logout_during_a_warm_is_never_undone(make_token, redis_conn, monkeypatch):
    """The warm takes each token's generation, a logout revokes and deletes one, then the warm
    re-reads and fills: the logged-out token stays out."""
    tokens = [make_token() for _ in range(3)]
    victim = tokens[1]
    real_lookup = cache.lookup

    def lookup_then_logout(token_key, digest, *, create=False):
        found = real_lookup(token_key, digest, create=create)
        if token_key == victim[:15]:
            AuthToken.objects.filter(token_key=token_key).delete()  # the logout, returned
        return found

    monkeypatch.setattr(cache, "lookup", lookup_then_logout)
    run("warm")
    monkeypatch.setattr(cache, "lookup", real_lookup)
    assert not record_exists(redis_conn, victim)
    assert not accepted(victim)
    assert accepted(tokens[0])
    assert accepted(tokens[2])


def test_a_revocation_between_lookup_and_fill_of_a_warm_wins(make_token, redis_conn, monkeypatch):
    """Same, with the row still there but the token revoked in Redis in between (an admin
    edit elsewhere): the fill presents a generation that no longer stands."""
    token = make_token()
    real_fill = cache._fill

    def revoke_then_fill(values, generation, *args):
        cache.revoke([AuthToken.objects.get(token_key=token[:15])])
        return real_fill(values, generation, *args)

    monkeypatch.setattr(cache, "_fill", revoke_then_fill)
    assert run("warm") == {"tokens": 1, "cached": 0}


def test_purge_removes_only_keys_under_the_prefix(make_token, redis_conn):
    for token in [make_token(write_through=True) for _ in range(3)]:
        assert accepted(token)
    redis_conn.set("other:key", "not ours")
    assert run("purge", "--noinput") == {"removed": 4}
    assert redis_conn.keys("*") == [b"other:key"]


def test_purge_asks_first(make_token, redis_conn):
    make_token(write_through=True)
    with pytest.raises(CommandError, match="cancelled"):
        call_command("knox_redis", "purge", stdout=io.StringIO())  # no terminal: a "no"
    assert redis_conn.dbsize() > 0


@pytest.mark.parametrize("command", [("knox_redis", "clear-expired"), ("knox_clear_expired",)])
def test_clear_expired_deletes_revokes_and_signals(make_token, redis_conn, command):
    from freezegun import freeze_time

    soon = make_token(write_through=True, expiry=timedelta(seconds=5))
    kept = make_token(expiry=timedelta(hours=1))
    assert accepted(soon)
    signalled = []

    def on_expired(sender, username, **kwargs):
        signalled.append(username)

    token_expired.connect(on_expired)
    try:
        with freeze_time(timedelta(seconds=10)):
            call_command(*command, "--batch-size", "1", stdout=io.StringIO())
    finally:
        token_expired.disconnect(on_expired)
    assert not AuthToken.objects.filter(token_key=soon[:15]).exists()
    assert AuthToken.objects.filter(token_key=kept[:15]).exists()
    assert not record_exists(redis_conn, soon)
    assert signalled == ["alice"]


def test_purge_with_glob_characters_in_the_prefix_touches_no_other_key(make_token, redis_conn, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "k*x?[a]"}
    token = make_token(write_through=True)
    redis_conn.set("knox-other:key", "not ours")
    redis_conn.set("kAxB[a]:key", "not ours either")
    assert accepted(token)
    assert run("purge", "--noinput")["removed"] >= 1
    assert sorted(redis_conn.keys("*")) == [b"kAxB[a]:key", b"knox-other:key"]


def test_clear_expired_reads_the_write_database(make_token, settings):
    """With a router that sends reads to a replica, the sweep still reads (and re-reads) the
    primary: a lagging replica would show deleted rows again, and the loop would never end."""
    from tests.test_routers import PrimaryReplicaRouter

    make_token(expiry=timedelta(seconds=-1))
    settings.DATABASE_ROUTERS = [PrimaryReplicaRouter()]
    out = io.StringIO()
    call_command("knox_redis", "--json", "clear-expired", stdout=out)
    assert json.loads(out.getvalue()) == {"deleted": 1}
