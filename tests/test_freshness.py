"""How long a cached record is trusted before the row is read again: never past its re-read
deadline, and never longer than MAX_CACHE_TTL from now, whatever the deadline stored in it says
(set under a longer setting, or by a writer whose clock runs fast)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from freezegun import freeze_time
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header
from tests.helpers import accepted, authenticate, queries_of, record_exists, whoami


def cache_it(token: str) -> None:
    assert accepted(token)  # first sight fills,
    assert accepted(token)  # then a hit


def test_lowering_max_cache_ttl_bounds_records_cached_before(make_token, settings, redis_conn):
    token = make_token()
    cache_it(token)  # its re-read deadline: now + 3600 s, the default
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 30}
    AuthToken.objects.filter(token_key=token[:15]).update(expiry=timezone.now() - timedelta(seconds=1))
    assert record_exists(redis_conn, token)
    with freeze_time(timedelta(seconds=120)):
        assert not accepted(token)


def test_a_deadline_further_ahead_than_max_cache_ttl_is_due_for_a_reread(make_token, native, user):
    """A writer whose clock runs an hour fast: its record is re-read, not trusted for an hour."""
    token = make_token()
    cache_it(token)
    row = AuthToken.objects.get()
    _record, generation, *_ = native.lookup(row.token_key, row.digest, True)
    fast = timezone.now() + timedelta(seconds=3600 + 3600)
    assert native.fill(
        row.token_key,
        row.digest,
        generation,
        user.pk,
        cache.to_us(row.created),
        cache.to_us(row.expiry),
        cache.to_us(fast),
        60_000,
    )
    assert cache.lookup(row.token_key, row.digest).record.fresh_until == fast.replace(microsecond=0)
    AuthToken.objects.filter(digest=row.digest).update(expiry=timezone.now() - timedelta(seconds=1))
    assert not accepted(token)


@pytest.mark.parametrize("seconds_left", [1, 3599])
def test_a_deadline_within_max_cache_ttl_is_trusted(make_token, seconds_left, settings):
    """The other side of the bound: a record inside it is a hit, with no token query."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    token = make_token()
    cache_it(token)
    with freeze_time(timedelta(seconds=3600 - seconds_left)), CaptureQueriesContext(connection) as queries:
        assert authenticate(token) is not None
    assert len(queries) == 1, [q["sql"] for q in queries]  # the user only


def test_auto_refresh_hits_do_not_extend_the_reread_deadline(client, make_token, settings):
    """A hit that AUTO_REFRESH renews stores the new expiry, not a new re-read deadline: an
    owner changed behind the cache's back (a QuerySet.update, documented) is seen once
    MAX_CACHE_TTL has passed, however often the token is used meanwhile."""
    settings.REST_KNOX = {"AUTO_REFRESH": True, "MIN_REFRESH_INTERVAL": 0, "TOKEN_TTL": timedelta(hours=10)}
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 1}
    token = make_token()
    assert whoami(client, token) == 200
    assert whoami(client, token) == 200
    other = type(AuthToken.objects.get().user).objects.create_user(username="bob", password="pw")
    AuthToken.objects.filter(token_key=token[:15]).update(user=other)  # documented bypass
    for _ in range(4):
        time.sleep(0.4)
        r = client.get("/api/whoami/", **auth_header(token))
    assert r.json()["user"] == "bob", f"after MAX_CACHE_TTL still authenticated as {r.json()['user']}"


def test_reread_after_max_cache_ttl_costs_two_queries(make_token, settings, redis_conn):
    """The key, and the generation in it, outlives the record's re-read deadline by one
    MAX_CACHE_TTL (never beyond the token's expiry), so a re-read in real time (not freeze_time)
    finds the generation: knox's two queries, not a first sight's three."""
    # MAX_CACHE_TTL above the tombstone TTL, as with the defaults (3600 > 60), so that the
    # fill, not the lookup's lease, decides how long the key lives.
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 2, "REVOCATION_TOMBSTONE_TTL": 1}
    token = make_token()
    assert len(queries_of(lambda: authenticate(token))[1]) == 3  # first sight
    assert len(queries_of(lambda: authenticate(token))[1]) == 1  # hit
    time.sleep(2.3)
    _, sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 2, sql
