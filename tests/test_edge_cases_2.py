"""Holes found in the second review, each pinned by the test that first showed it (the first
review's are in test_edge_cases.py)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import cache
from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header
from tests.helpers import accepted, in_thread


def get(client, token) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code


def record_field(token):
    row = AuthToken.objects.get(token_key=token[:15])
    return f"knox:token:{token[:15]}", f"r:{row.digest[:32]}"


# 6. A db number beyond i64 passed `manage.py check`; logout then raised OverflowError (500).
def test_bad_db_is_caught_by_check_and_never_a_500(client, make_token, settings):
    from knox_redis.checks import check_settings

    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": "redis://127.0.0.1:6379/9223372036854775808"}
    errors = check_settings()
    assert [e.id for e in errors] == ["knox_redis.E001"]
    # A process started without running checks (gunicorn doesn't) still never answers 500.
    token = make_token()
    client.raise_request_exception = False
    assert get(client, token) == 200  # lookups fail open
    assert client.post("/api/logout/", **auth_header(token)).status_code == 503  # revocations fail closed


# 7. expired_in_database was check-then-act: a refresh that landed between the check and the
#    DELETE was cached for a row about to go. Now the check locks the row until the delete
#    commits, and the refresh's own check then finds no row.
import threading  # noqa: E402

from django.db import connection  # noqa: E402


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row-level concurrency: PostgreSQL")
def test_cleanup_without_redis_races_a_refresh(make_token, settings, monkeypatch, redis_conn):
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
