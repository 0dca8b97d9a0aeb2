"""Races, each forced into its worst interleaving with events between lookup, database read,
fill and commit, plus a threaded stress test. The claim under test: once the call that ended a
token has returned, no request anywhere is accepted with it."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import cache
from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header
from tests.helpers import accepted, in_thread, record_exists


@pytest.mark.parametrize(
    ("seen_before", "pause_in"),
    [
        (True, "_fill"),  # generation known: knox's read, then a direct fill
        (False, "_fill"),  # first sight: generation created, row re-read, then the fill
        (False, "_refill"),  # first sight, paused before the generation is even created
    ],
)
def test_late_fill_cannot_resurrect_a_logged_out_token(make_token, redis_conn, monkeypatch, seen_before, pause_in):
    token = make_token()
    if seen_before:
        assert accepted(token)
        key = f"knox:token:{token[:15]}"
        redis_conn.hdel(key, *[f for f in redis_conn.hkeys(key) if f.startswith(b"r:")])  # record lapsed
    read_done, may_fill = threading.Event(), threading.Event()
    real = getattr(cache, pause_in)

    def paused(*args):
        read_done.set()  # the DB row has been read: the token was valid then
        assert may_fill.wait(10)
        return real(*args)

    monkeypatch.setattr(cache, pause_in, paused)
    thread, box = in_thread(accepted, token)
    assert read_done.wait(10)
    AuthToken.objects.get().delete()  # logout returns here
    may_fill.set()
    thread.join(10)
    assert box.get("result") is True, box  # the request began before the logout: fine
    monkeypatch.setattr(cache, pause_in, real)
    assert not record_exists(redis_conn, token)
    if pause_in == "_fill":
        assert cache.get_client().stats()["fills_refused"] == 1
    assert not accepted(token)


def test_fill_between_revocation_and_commit_is_refused(make_token, redis_conn):
    """A reader that looks up after the revocation but reads the row before the delete
    commits must not fill: the tombstone stops it."""
    token = make_token()
    with transaction.atomic():
        AuthToken.objects.get().delete()  # pre_delete has revoked; the delete isn't committed
        thread, box = in_thread(accepted, token)
        thread.join(10)
        assert "error" not in box, box
        assert box["result"] is True  # it read the still-committed row
        assert not record_exists(redis_conn, token)
    assert not record_exists(redis_conn, token)
    assert not accepted(token)


def test_token_from_rolled_back_transaction_is_never_accepted(user, redis_conn):
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        _instance, token = AuthToken.objects.create(user=user)
        assert accepted(token)  # this transaction sees its own row...
        thread, box = in_thread(accepted, token)
        thread.join(10)
        assert box == {"result": False}  # ...nobody else does
        raise Rollback
    assert not record_exists(redis_conn, token)
    assert not accepted(token)
    assert not record_exists(redis_conn, token)


def test_atomic_requests_fill_after_commit(make_token, client, monkeypatch, redis_conn):
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    token = make_token()
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert record_exists(redis_conn, token)  # filled by the on_commit hook
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert cache.get_client().stats()["hits"] == 1


def test_nothing_cached_inside_a_transaction_before_commit(make_token, redis_conn):
    token = make_token()
    with transaction.atomic():
        assert accepted(token)
        assert not record_exists(redis_conn, token)
    assert record_exists(redis_conn, token)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="REPEATABLE READ snapshots: PostgreSQL")
def test_old_snapshot_is_not_cached(make_token, redis_conn):
    token = make_token()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert AuthToken.objects.count() == 1  # the snapshot is taken here
        thread, box = in_thread(lambda: AuthToken.objects.all().delete())
        thread.join(10)
        assert "error" not in box, box
        assert accepted(token)  # the snapshot still holds the row, as it would for knox
    assert not record_exists(redis_conn, token)  # the refill after commit read the truth
    assert not accepted(token)


def test_primary_only_even_with_replicas_listed(settings, make_token, redis_server):
    settings.CACHES = {
        **settings.CACHES,
        "redis": {
            "BACKEND": "django_redis.cache.RedisCache",
            # A replica that doesn't exist: any read or write sent there would fail.
            "LOCATION": [redis_server.url, "redis://127.0.0.1:1/0"],
        },
    }
    token = make_token()
    for _ in range(3):
        assert accepted(token)
    stats = cache.get_client().stats()
    assert stats["hits"] == 2
    assert stats["errors"] == 0


def test_stress_no_request_accepted_after_its_revocation_returned(user, settings):
    settings.REST_KNOX = {"AUTO_REFRESH": True, "MIN_REFRESH_INTERVAL": 0, "TOKEN_TTL": timedelta(hours=1)}
    tokens = [AuthToken.objects.create(user=user)[1] for _ in range(12)]
    revoked_at: dict[str, float] = {}
    violations: list[tuple[str, float, float]] = []
    stop = threading.Event()
    counts = {"accepted": 0, "rejected": 0}
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            token = rng.choice(tokens)
            started = time.monotonic()
            ok = accepted(token)
            with lock:
                counts["accepted" if ok else "rejected"] += 1
                ended_before = revoked_at.get(token)
                if ok and ended_before is not None and started > ended_before:
                    violations.append((token[:8], started, ended_before))

    def revoker() -> None:
        for token in tokens[:8]:
            time.sleep(0.15)
            AuthToken.objects.filter(token_key=token[:15]).delete()
            with lock:
                revoked_at[token] = time.monotonic()

    readers = [in_thread(reader, i) for i in range(4)]
    thread, box = in_thread(revoker)
    thread.join(30)
    time.sleep(0.2)
    stop.set()
    for r, _ in readers:
        r.join(30)
    assert "error" not in box, box
    assert [b for _, b in readers if "error" in b] == []
    assert violations == [], (violations, counts)
    assert counts["accepted"] > 50, counts
    assert counts["rejected"] > 10, counts
    assert cache.get_client().stats()["hits"] > 0


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row-level concurrency: PostgreSQL")
def test_cleanup_without_redis_races_a_refresh(make_token, settings, monkeypatch, redis_conn):
    """knox's cleanup of expired tokens, in a process cut off from Redis, proceeds on the
    database's word that the token has expired; meanwhile a request elsewhere refreshes it.
    The check locks the row until the delete commits, so the refresh, landing between check
    and delete, finds no row and caches nothing."""
    from knox_redis import _knox_redis

    token = make_token(expiry=timedelta(seconds=1.5))
    assert accepted(token)
    assert accepted(token)  # cached, record expiry = now + ~1.5 s
    settings.REST_KNOX = {"AUTO_REFRESH": True, "TOKEN_TTL": timedelta(hours=10)}  # MIN_REFRESH_INTERVAL 60

    cleaner_ident: dict = {}
    real_send = cache._send_revocations

    def send(*a, **kw):  # the cleaning process is partitioned from Redis
        if threading.get_ident() == cleaner_ident.get("id"):
            raise _knox_redis.CacheUnavailable("partitioned")
        return real_send(*a, **kw)

    monkeypatch.setattr(cache, "_send_revocations", send)

    checked, may_delete = threading.Event(), threading.Event()
    real_check = cache.expired_in_database

    def check(token_, using):
        result = real_check(token_, using)
        checked.set()
        assert may_delete.wait(10)
        return result

    monkeypatch.setattr(cache, "expired_in_database", check)

    in_renew, may_renew = threading.Event(), threading.Event()

    class SlowRenew(TokenAuthentication):
        def renew_token(self, auth_token):
            in_renew.set()
            assert may_renew.wait(10)
            return super().renew_token(auth_token)

    # Reader hits the (not yet expired) record and is about to refresh.
    reader, rbox = in_thread(accepted, token, SlowRenew)
    assert in_renew.wait(10)
    time.sleep(1.6)  # the row's expiry passes

    def clean():
        cleaner_ident["id"] = threading.get_ident()
        return AuthToken.objects.filter(expiry__lt=timezone.now()).delete()  # knox_clear_expired

    cleaner, cbox = in_thread(clean)
    assert checked.wait(10), (cbox, cleaner.is_alive())  # DB said "expired": proceeds without Redis
    may_renew.set()
    time.sleep(0.3)
    assert reader.is_alive()  # the refresh waits on the row the cleanup has locked
    may_delete.set()
    cleaner.join(10)
    reader.join(10)
    assert "error" not in cbox, cbox
    assert rbox.get("result") is False, rbox  # the row went: rejected, nothing re-cached
    assert not AuthToken.objects.exists()  # the cleanup returned: token gone
    monkeypatch.setattr(cache, "expired_in_database", real_check)
    assert not accepted(token), "deleted token accepted from the cache"
