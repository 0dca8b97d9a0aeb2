"""Whatever is found in Redis under our keys, planted or left over, is a miss, never a 500,
and is replaced: no token is read from the database for ever, no key lives for ever."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header
from tests.helpers import accepted, record_exists, record_field, whoami

LAST_MICROSECOND = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt_timezone.utc)


def plant(native, row, user_pk, *, created=None, fresh_until=None) -> None:
    """A record as a writer with a broken clock would fill it, under a valid generation."""
    _record, generation, *_ = native.lookup(row.token_key, row.digest, True)
    assert native.fill(
        row.token_key,
        row.digest,
        generation,
        user_pk,
        cache.to_us(created or row.created),
        cache.to_us(row.expiry),
        cache.to_us(fresh_until or timezone.now() + timedelta(seconds=60)),
        60_000,
    )


@pytest.fixture
def auto_refresh(settings):
    settings.REST_KNOX = {
        "AUTO_REFRESH": True,
        "TOKEN_TTL": timedelta(hours=10),
        "MIN_REFRESH_INTERVAL": 1,
        "AUTO_REFRESH_MAX_TTL": timedelta(days=1),
    }


def test_record_created_in_year_9999_is_a_miss_with_auto_refresh(client, make_token, native, user, auto_refresh):
    # created + AUTO_REFRESH_MAX_TTL overflows: knox's renew_token would raise OverflowError.
    token = make_token()
    row = AuthToken.objects.get()
    plant(native, row, user.pk, created=LAST_MICROSECOND - timedelta(hours=1))
    client.raise_request_exception = False
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    # A miss: the row was read and cached in place of the impossible record.
    assert cache.lookup(row.token_key, row.digest).record.created == row.created


def test_record_due_at_the_last_microsecond_is_reread_not_a_500(client, make_token, native, user, auto_refresh):
    # The refresh UPDATE used to commit, then fresh_until + MAX_CACHE_TTL overflowed. Such a
    # deadline is now beyond now + MAX_CACHE_TTL, so the row is re-read (the overflow itself is
    # pinned by the next test).
    token = make_token()
    AuthToken.objects.update(expiry=timezone.now() + timedelta(hours=1))  # so the hit refreshes it
    row = AuthToken.objects.get()
    plant(native, row, user.pk, fresh_until=LAST_MICROSECOND)
    client.raise_request_exception = False
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200


def test_fill_with_a_deadline_at_the_end_of_time_does_not_overflow(make_token):
    make_token()
    row = AuthToken.objects.get()
    found = cache.lookup(row.token_key, row.digest, create=True)
    assert cache._fill(cache._values(row), found.generation, fresh_until=LAST_MICROSECOND) in (True, False)


def test_row_created_in_year_9999_with_auto_refresh_is_no_500(client, make_token, auto_refresh):
    """The same overflow from the database itself (plain knox answers a 500): no refresh."""
    token = make_token()
    AuthToken.objects.update(created=LAST_MICROSECOND - timedelta(hours=1))
    expiry = AuthToken.objects.get().expiry
    client.raise_request_exception = False
    for _ in range(3):
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert AuthToken.objects.get().expiry == expiry


def test_junk_generation_and_tombstone_without_ttl_are_replaced(make_token, redis_conn, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REVOCATION_TOMBSTONE_TTL": 1}
    token = make_token()
    row = AuthToken.objects.get()
    key, id_ = f"knox:token:{token[:15]}", row.digest[:32]
    redis_conn.hset(key, mapping={f"g:{id_}": "junk", f"t:{id_}": "not a number"})
    assert redis_conn.pttl(key) == -1
    assert accepted(token)
    assert redis_conn.pttl(key) > 0, "the key has a TTL once the cache has seen it"
    assert redis_conn.hget(key, f"g:{id_}") != b"junk"
    assert redis_conn.hget(key, f"t:{id_}").isdigit(), "the tombstone stands one lease, readable"
    time.sleep(1.2)  # one REVOCATION_TOMBSTONE_TTL
    assert accepted(token)
    assert accepted(token)
    assert record_exists(redis_conn, token)
    assert native_hits() >= 1


def native_hits() -> int:
    return cache.get_client().stats()["hits"]


@pytest.mark.parametrize("tombstone", [b"inf", b"1e300", b"nan", b"99999999999999999", b"-5"])
def test_a_tombstone_no_revocation_could_write_stands_one_lease(make_token, redis_conn, settings, tombstone):
    """Numbers Lua would read (inf, nan, a deadline centuries away) but no revocation writes
    (whole milliseconds, at most a day ahead): like unreadable ones, they stand one more
    lease, then fills resume; never for ever, never dropped on the spot."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REVOCATION_TOMBSTONE_TTL": 1}
    token = make_token()
    row = AuthToken.objects.get()
    key, id_ = f"knox:token:{token[:15]}", row.digest[:32]
    assert accepted(token)  # first sight: cached
    redis_conn.hdel(key, f"r:{id_}")
    redis_conn.hset(key, mapping={f"g:{id_}": "0123456789abcdef", f"t:{id_}": tombstone})
    assert accepted(token)
    assert not record_exists(redis_conn, token), "not dropped on the spot"
    stood = int(redis_conn.hget(key, f"t:{id_}"))
    assert stood <= time.time() * 1000 + 1100, "rewritten as one lease from now"
    time.sleep(1.2)
    assert accepted(token)
    assert accepted(token)
    assert record_exists(redis_conn, token)


def test_auto_refresh_max_ttl_knox_ignores_is_not_computed(client, make_token, settings):
    """knox reads AUTO_REFRESH_MAX_TTL only with AUTO_REFRESH: a value that isn't a timedelta
    there must not turn hits into 500s."""
    settings.REST_KNOX = {"AUTO_REFRESH": False, "AUTO_REFRESH_MAX_TTL": 3600}
    token = make_token()
    client.raise_request_exception = False
    assert [client.get("/api/whoami/", **auth_header(token)).status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize(
    "junk",
    [
        b'{"v":1,"u":1,"c":9223372036854775807,"e":null,"f":99999999999999999}',
        b'{"v":1,"u":1,"c":0,"e":null,"f":-9223372036854775808}',
    ],
)
def test_out_of_range_times_in_a_record_are_a_miss(client, make_token, redis_conn, junk):
    """Times at the limits of an i64, which no datetime can hold, make a record undecodable:
    a miss, answered from the database, never a 500."""
    token = make_token()
    assert whoami(client, token) == 200
    redis_conn.hset(f"knox:token:{token[:15]}", f"r:{AuthToken.objects.get().digest[:32]}", junk)
    client.raise_request_exception = False
    assert whoami(client, token) == 200
    assert cache.get_client().stats()["undecodable"] == 1


def test_non_ascii_digest_in_record_is_a_miss_not_a_500(client, make_token, redis_conn):
    """A record in the previous release's JSON form whose digest is non-ASCII text is a miss:
    comparing it with the presented token's digest must not raise (compare_digest raises
    TypeError on a non-ASCII str)."""
    token = make_token()
    assert whoami(client, token) == 200
    assert whoami(client, token) == 200  # now cached
    key, field = record_field(token)
    rec = {"v": 1, "d": "\u00e9" * 128, "u": 1, "c": 0, "e": None, "f": 10**16}
    redis_conn.hset(key, field, json.dumps(rec))
    client.raise_request_exception = False
    assert whoami(client, token) == 200


def test_non_utf8_generation_still_caches(client, make_token, redis_conn):
    """A generation field that isn't text (no record beside it) is replaced: the token is
    cached again and later requests are hits."""
    token = make_token()
    assert whoami(client, token) == 200
    key = f"knox:token:{token[:15]}"
    redis_conn.delete(key)
    redis_conn.hset(key, f"g:{AuthToken.objects.get().digest[:32]}", b"\xff\xfe")
    for _ in range(3):
        assert whoami(client, token) == 200
    assert cache.get_client().stats()["hits"] >= 1
