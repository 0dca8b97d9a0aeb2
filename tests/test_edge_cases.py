"""Holes found in review, each pinned by the test that first showed it."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header
from tests.helpers import accepted, record_exists
from tests.servers import TcpProxy


@pytest.fixture
def via_proxy(settings, redis_server):
    proxy = TcpProxy(redis_server.port)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": proxy.url, "CIRCUIT_BREAKER_COOLDOWN": 0.05}
    yield proxy
    proxy.close()


def get(client, token) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code


def test_use_tz_false_with_an_activated_time_zone_keeps_expiry(user, settings, redis_conn):
    settings.USE_TZ = False
    _instance, token = AuthToken.objects.create(user=user, expiry=timedelta(seconds=1))
    assert accepted(token)
    assert record_exists(redis_conn, token)
    time.sleep(1.2)
    with timezone.override("Etc/GMT-14"):  # a middleware activating the user's zone
        assert not accepted(token)


def test_anonymous_traffic_cannot_fill_redis_and_block_revocation(client, make_token, redis_conn):
    token = make_token()
    used = int(redis_conn.info("memory")["used_memory"])
    old = redis_conn.config_get("maxmemory*")
    redis_conn.config_set("maxmemory", used + 400_000)
    redis_conn.config_set("maxmemory-policy", "noeviction")
    try:
        for _ in range(3000):
            assert not accepted(secrets.token_hex(32))
        assert redis_conn.dbsize() == 0
        assert get(client, token) == 200
        assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    finally:
        redis_conn.config_set("maxmemory", old["maxmemory"])
        redis_conn.config_set("maxmemory-policy", old["maxmemory-policy"])


def test_big_integer_user_pk_is_stored_as_text(make_token, user):
    from knox_redis import _knox_redis

    client = cache.get_client()
    digest = "ab" * 64
    found = cache.lookup("bigpk", digest, create=True)
    assert client.fill("bigpk", digest, found.generation, 2**70, 0, None, 10**15, 60_000)
    record, _ = client.lookup("bigpk", digest)
    assert record[0] == str(2**70)
    assert isinstance(client, _knox_redis.TokenCache)


def test_record_copied_under_another_tokens_field_is_not_trusted(client, make_token, redis_conn):
    """The hash field names a token by 128 bits of its digest, and the record's MAC binds it
    to them: a valid record moved under another token's field is a miss."""
    other, token = make_token(), make_token()
    assert get(client, other) == 200
    assert get(client, token) == 200
    rows = {row.token_key: row for row in AuthToken.objects.all()}
    key, field = f"knox:token:{token[:15]}", f"r:{rows[token[:15]].digest[:32]}"
    forged = redis_conn.hget(f"knox:token:{other[:15]}", f"r:{rows[other[:15]].digest[:32]}")
    redis_conn.hset(key, field, forged)
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        assert get(client, token) == 200
    assert len(queries) == 2  # knox's database path, not the forged record
    assert redis_conn.hget(key, field) != forged  # and the record was rewritten
