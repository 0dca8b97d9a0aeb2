"""Redis down, hung, cut off mid-run, restarted, closing idle connections, or full of garbage:
requests fall back to the database quickly, and a revocation is never lost: a change that needs
one (a logout, an edit, a delete, in a view or the admin) is refused while Redis can't take it,
with a 503 in a request, never a 500."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header
from tests.helpers import authenticate, whoami
from tests.servers import RedisServer, free_port


def get(client, token):
    started = time.perf_counter()
    response = client.get("/api/whoami/", **auth_header(token))
    return response.status_code, time.perf_counter() - started


def test_redis_down_falls_back_fast_and_logs_once(client, make_token, via, caplog):
    via(f"redis://127.0.0.1:{free_port()}/0")
    cache._last_warning.clear()
    token = make_token()
    with caplog.at_level(logging.WARNING, logger="knox_redis"):
        timings = [get(client, token) for _ in range(20)]
    assert all(status == 200 for status, _ in timings)
    assert max(t for _, t in timings) < 0.5
    stats = cache.get_client().stats()
    assert stats["short_circuits"] >= 19  # the breaker spared all but the first
    warnings = [r for r in caplog.records if r.name == "knox_redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_hung_redis_costs_one_timeout_then_the_breaker_opens(client, make_token, proxy, via):
    via(proxy.url)
    token = make_token()
    assert get(client, token)[0] == 200
    assert get(client, token)[0] == 200  # a hit
    proxy.blackhole()  # connections stay open; nothing answers
    first_status, first_time = get(client, token)
    later = [get(client, token) for _ in range(10)]
    assert first_status == 200, first_time
    assert 0.15 < first_time < 1.5, first_time
    assert all(s == 200 for s, _ in later)
    assert sorted(t for _, t in later)[5] < 0.1, later  # no timeout paid: the breaker is open


def test_cut_mid_run_then_heal(client, make_token, proxy, via):
    via(proxy.url, cooldown=0.05)
    token = make_token()
    statuses = []
    for i in range(60):
        if i == 20:
            proxy.cut()
        if i == 40:
            proxy.heal()
            time.sleep(0.1)
        statuses.append(get(client, token)[0])
    assert statuses == [200] * 60
    stats = cache.get_client().stats()
    assert stats["errors"] >= 1
    # Served from Redis before the cut and again after it healed.
    assert stats["hits"] >= 30, stats


def test_logout_refused_while_redis_unreachable_and_token_stays_consistent(client, make_token, proxy, via):
    via(proxy.url, cooldown=0.05)
    token = make_token()
    assert get(client, token)[0] == 200
    proxy.cut()
    response = client.post("/api/logout/", **auth_header(token))
    assert response.status_code == 503
    assert AuthToken.objects.count() == 1  # refused: the database is unchanged
    proxy.heal()
    time.sleep(0.1)
    assert get(client, token)[0] == 200  # still valid everywhere, as the database says
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert get(client, token)[0] == 401


def test_logoutall_refused_while_redis_unreachable(client, make_token, proxy, via):
    via(proxy.url, cooldown=0.05)
    tokens = [make_token() for _ in range(3)]
    for t in tokens:
        get(client, t)
    proxy.cut()
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 503
    assert AuthToken.objects.count() == 3


def test_expired_sibling_cleanup_works_with_redis_down(client, make_token, via, user):
    via(f"redis://127.0.0.1:{free_port()}/0")
    token = make_token()
    make_token(expiry=timedelta(seconds=-1))
    assert get(client, token)[0] == 200  # knox's cleanup deleted the expired sibling: no 503
    assert AuthToken.objects.filter(user=user).count() == 1


def test_redis_restart_is_invisible(client, make_token, via, settings):
    server = RedisServer().start()
    try:
        via(server.url, cooldown=0.05)
        token = make_token()
        assert [get(client, token)[0] for _ in range(3)] == [200] * 3
        server.stop()
        server.start()  # same port, empty: pooled connections are stale
        assert get(client, token)[0] == 200
        stats = cache.get_client().stats()
        assert stats["errors"] == 0, stats  # the stale connection was retried on a new one
        assert get(client, token)[0] == 200
        assert cache.get_client().stats()["hits"] >= 3
    finally:
        server.stop()


class TestGarbageInRedis:
    def key(self, token):
        return f"knox:token:{token[:15]}"

    def field(self, token):
        return f"r:{AuthToken.objects.get(token_key=token[:15]).digest[:32]}"

    @pytest.mark.parametrize(
        "junk",
        [
            b"",
            b"not json",
            b"\xff\xfe\x00",
            b'{"v":1,"u":1',
            b'{"v":9,"u":1,"c":1,"e":null,"f":1}',
            b"[]",
            b'{"v":1,"u":[1],"c":1,"e":null,"f":99999999999999999}',
        ],
    )
    def test_junk_record_is_a_miss_and_is_overwritten(self, client, make_token, redis_conn, junk):
        token = make_token()
        get(client, token)
        redis_conn.hset(self.key(token), self.field(token), junk)
        assert get(client, token)[0] == 200
        # Junk too short to carry a generation is seen twice: by the request, and by the
        # lookup that creates a generation for the re-read.
        assert cache.get_client().stats()["undecodable"] in (1, 2)
        assert get(client, token)[0] == 200
        assert cache.get_client().stats()["hits"] == 1

    def test_wrong_type_key_is_replaced(self, client, make_token, redis_conn):
        token = make_token()
        redis_conn.set(self.key(token), b'{"digest": "left by another package"}')
        assert get(client, token)[0] == 200
        assert get(client, token)[0] == 200
        assert cache.get_client().stats()["hits"] == 1

    def test_wrong_type_user_index_is_replaced(self, client, make_token, redis_conn, user):
        redis_conn.set(f"knox:user:{user.pk}:ix", b"junk")
        token = make_token()
        assert [get(client, token)[0] for _ in range(2)] == [200, 200]
        assert redis_conn.type(f"knox:user:{user.pk}:ix") == b"hash"

    def test_record_pointing_at_a_missing_user_falls_back(self, client, make_token, redis_conn):
        token = make_token()
        get(client, token)
        redis_conn.hset(self.key(token), self.field(token), b'{"v":1,"u":"abc","c":0,"e":null,"f":99999999999999999}')
        assert get(client, token)[0] == 200  # the database path decides

    def test_unknown_token_sharing_a_token_key_is_rejected(self, client, make_token, redis_conn):
        token = make_token()
        fake = token[:15] + "0" * (len(token) - 15)
        assert get(client, fake)[0] == 401


def test_revocation_lost_by_redis_then_after_commit_failure_is_retried(make_token, proxy, via, redis_conn, caplog):
    """Two faults at once: Redis loses the revocation (flushed, or the key evicted) between
    logout's revocation and its commit, a reader re-caches the still-committed row, and the
    after-commit revocation can't reach Redis. It is kept and retried until Redis takes it;
    meanwhile this process trusts no record, and the retry removes the stale one."""
    from django.db import transaction

    from tests.helpers import accepted, in_thread, record_exists

    via(proxy.url, cooldown=0.05)
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    with caplog.at_level(logging.ERROR, logger="knox_redis"), transaction.atomic():
        AuthToken.objects.filter(token_key=token[:15]).delete()  # revoked in Redis first
        redis_conn.flushall()  # fault 1: Redis forgets the revocation
        reader, box = in_thread(accepted, token)  # another request, before the commit
        reader.join()
        assert box == {"result": True}
        assert record_exists(redis_conn, token)
        proxy.cut()  # fault 2: the after-commit revocation can't be delivered
    assert len(cache.pending_revocations) == 1
    assert any("revocation after commit failed" in r.getMessage() for r in caplog.records)
    assert record_exists(redis_conn, token)  # what another process could still find...
    assert not accepted(token)  # ...but this one trusts no record until it is delivered
    proxy.heal()
    deadline = time.monotonic() + 5
    while len(cache.pending_revocations) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cache.pending_revocations) == 0, "the retry thread delivered it"
    assert not record_exists(redis_conn, token)
    assert not accepted(token)


def test_pending_revocations_do_not_slow_requests_while_redis_is_down(make_token, proxy, via):
    """While a revocation waits for Redis, requests go to the database at once: the retry
    thread pays the connection attempts, requests don't (the breaker is open)."""
    from tests.helpers import accepted

    via(proxy.url, cooldown=5)
    token = make_token()
    assert accepted(token)
    proxy.cut()
    cache.pending_revocations.add(
        cache.Revocation([(token[:15], AuthToken.objects.get().digest, 1)], [], []), RuntimeError("test")
    )
    assert accepted(token)  # opens the breaker
    started = time.perf_counter()
    assert all(accepted(token) for _ in range(20))
    assert time.perf_counter() - started < 0.5
    assert threading_names() >= {cache.PendingRevocations.THREAD_NAME}
    cache.pending_revocations.clear()
    assert cache.PendingRevocations.THREAD_NAME not in threading_names()


def threading_names() -> set[str]:
    import threading

    return {t.name for t in threading.enumerate()}


def test_a_pending_revocation_stops_every_hit_in_this_process(make_token, redis_conn, monkeypatch):
    """Redis answers lookups, but the pending revocation is not delivered yet: this process
    must not trust the record it would find."""
    from knox_redis._knox_redis import CacheError
    from tests.helpers import accepted, record_exists

    token = make_token()
    assert accepted(token)
    assert accepted(token)
    row = AuthToken.objects.get()
    AuthToken.objects.filter(pk=row.pk)._raw_delete(using="default")  # the row is gone
    assert record_exists(redis_conn, token)

    def undeliverable(*args, **kwargs):
        raise CacheError("revocation not delivered")

    monkeypatch.setattr(cache, "_send_revocations", undeliverable)
    batch = cache.Revocation([(row.token_key, row.digest, row.user_id)], [], [])
    cache.pending_revocations.add(batch, RuntimeError("test"))
    assert not accepted(token)


def test_requests_do_not_wait_on_a_hung_redis_to_deliver_pending_revocations(make_token, proxy, via):
    from tests.helpers import accepted

    via(proxy.url, cooldown=5)
    token = make_token()
    assert accepted(token)
    proxy.blackhole()
    cache.pending_revocations.add(
        cache.Revocation([(token[:15], AuthToken.objects.get().digest, 1)], [], []), RuntimeError("test")
    )
    assert accepted(token)  # pays one timeout, opens the breaker
    started = time.perf_counter()
    assert all(accepted(token) for _ in range(10))
    assert time.perf_counter() - started < 1.0
    proxy.heal()


def test_idle_connection_closed_by_server_does_not_open_breaker(client, make_token, redis_conn):
    """Redis closing idle connections (its `timeout` setting) is no fault: the next call
    retries on a new connection, and the breaker stays closed."""
    old = redis_conn.config_get("timeout")["timeout"]
    redis_conn.config_set("timeout", 1)
    try:
        token = make_token()
        assert whoami(client, token) == 200
        time.sleep(2.5)
        assert whoami(client, token) == 200
        stats = cache.get_client().stats()
        assert stats["errors"] == 0, stats
        assert not cache.get_client().breaker_open, stats
    finally:
        redis_conn.config_set("timeout", old)


def test_cache_disabled_auto_refresh_with_redis_down_authenticates(client, make_token, proxy, via, settings):
    """With CACHE_ENABLED off, a request that AUTO_REFRESH renews needs nothing from Redis."""
    via(proxy.url, cooldown=0.05)
    settings.REST_KNOX = {"AUTO_REFRESH": True, "MIN_REFRESH_INTERVAL": 0}
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "CACHE_ENABLED": False}
    token = make_token()
    proxy.cut()
    assert whoami(client, token) == 200


def test_knox_cleanup_with_redis_hung_pays_the_timeout_once(make_token, proxy, via, user):
    """knox deletes a user's expired tokens on its database path; with Redis hung, the request
    pays one timeout (its lookup), not one per revocation."""
    via(proxy.url)
    token = make_token()
    for _ in range(5):
        make_token(expiry=timedelta(seconds=-1))
    authenticate(token)  # connects while Redis answers
    proxy.blackhole()
    started = time.monotonic()
    # The lookup times out (one timeout, the breaker opens), so knox's path runs and
    # deletes the 5 expired siblings: each revocation fails fast, the database confirms.
    cache.get_client().reset()
    assert authenticate(token)[0] == user
    assert time.monotonic() - started < 1.2
    assert AuthToken.objects.filter(user=user).count() == 1


def test_logout_does_not_wait_for_the_breaker(client, make_token, proxy, via):
    """The breaker spares lookups, not revocations: once Redis is back, a logout goes through
    though the breaker a failed lookup opened is still open."""
    via(proxy.url, cooldown=60)
    token = make_token()
    assert whoami(client, token) == 200
    proxy.cut()
    assert whoami(client, token) == 200  # a failed lookup opens the breaker for 60 s
    proxy.heal()
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert whoami(client, token) == 401


def test_expiring_by_edit_while_redis_is_down_is_refused(client, make_token, proxy, via):
    """An edit that ends the token (the admin's way to expire one) is a revocation: while
    Redis can't take it, the save raises and the row stays as it was."""
    via(proxy.url, cooldown=0.05)
    token = make_token()
    assert whoami(client, token) == 200
    proxy.cut()
    row = AuthToken.objects.get()
    row.expiry = timezone.now() - timedelta(seconds=1)  # the admin "expires" the token
    with pytest.raises(cache.RevocationUnavailable):
        row.save()
    proxy.heal()
    time.sleep(0.1)
    assert AuthToken.objects.get().expiry > timezone.now()  # refused: unchanged
    assert whoami(client, token) == 200


def test_stale_instance_that_looks_expired_still_needs_redis(client, make_token, proxy, via, settings):
    """An instance loaded before AUTO_REFRESH extended its token looks expired in memory; the
    database says the token is live, so deleting the instance still needs Redis."""
    via(proxy.url, cooldown=0.05)
    settings.REST_KNOX = {"AUTO_REFRESH": True, "TOKEN_TTL": timedelta(hours=10)}
    token = make_token(expiry=timedelta(seconds=1))
    stale = AuthToken.objects.get()  # loaded by a job: expiry now + 1 s
    assert whoami(client, token) == 200  # AUTO_REFRESH extends it to now + 10 h; cached
    time.sleep(1.1)
    proxy.cut()
    with pytest.raises(cache.RevocationUnavailable):
        stale.delete()  # looks expired in memory, but the database says otherwise
    proxy.heal()
    time.sleep(0.1)
    assert whoami(client, token) == 200


def test_admin_delete_with_redis_unreachable_is_not_a_500(client, make_token, via, django_user_model):
    """The admin deletes through the ORM, so it revokes: with Redis unreachable the delete is
    refused with a 503 (knox_redis's middleware: outside a DRF view RevocationUnavailable
    would be an unhandled exception, a 500)."""
    make_token()
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    digest = AuthToken.objects.get().digest
    via(f"redis://127.0.0.1:{free_port()}/0")
    client.raise_request_exception = False
    response = client.post(f"/admin/knox/authtoken/{digest}/delete/", {"post": "yes"})
    assert AuthToken.objects.filter(digest=digest).exists()  # refused: good
    assert response.status_code == 503, response.status_code
