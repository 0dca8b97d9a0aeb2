"""How long a cached record is trusted before the row is read again: never past its re-read
deadline, and never longer than MAX_CACHE_TTL from now, whatever the deadline stored in it says
(set under a longer setting, or by a writer whose clock runs fast)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from freezegun import freeze_time
from knox.models import AuthToken

from knox_redis import cache
from tests.helpers import accepted, authenticate, record_exists


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
    _record, generation = native.lookup(row.token_key, row.digest, True)
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
