"""AUTO_REFRESH on cache hits: a refresh that is due writes one compare-and-set UPDATE and is
cached; one that isn't due costs no query beyond the user's, in a transaction or not; and a
refresh never overwrites an expiry the database was given behind the cache's back."""

from __future__ import annotations

import time
from contextlib import nullcontext
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from freezegun import freeze_time
from knox.models import AuthToken

from tests.helpers import authenticate, queries_of, whoami


def test_queryset_update_expiry_is_not_reverted_by_auto_refresh(client, make_token, settings):
    """A QuerySet.update that expires a token bypasses signals (documented): hits may accept
    the token until MAX_CACHE_TTL, but their refreshes never write the old expiry back, and
    after MAX_CACHE_TTL the record has been re-read, so the token is refused."""
    settings.REST_KNOX = {"AUTO_REFRESH": True, "MIN_REFRESH_INTERVAL": 0, "TOKEN_TTL": timedelta(hours=10)}
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 1}
    token = make_token()
    assert whoami(client, token) == 200
    assert whoami(client, token) == 200  # cached
    past = timezone.now() - timedelta(seconds=1)
    AuthToken.objects.filter(token_key=token[:15]).update(expiry=past)  # documented bypass
    whoami(client, token)  # within MAX_CACHE_TTL: may still be accepted (documented)
    for _ in range(4):
        time.sleep(0.4)
        whoami(client, token)
    row = AuthToken.objects.filter(token_key=token[:15]).first()
    assert row is None or row.expiry <= past, f"DB expiry set to {past} was overwritten with {row.expiry}"
    # MAX_CACHE_TTL (1 s) has long passed: the record has been re-read by now.
    assert whoami(client, token) == 401, "token still accepted 1.6 s after MAX_CACHE_TTL=1"


@pytest.mark.parametrize("in_atomic", [False, True])
def test_auto_refresh_hit_that_writes_nothing_is_one_query(make_token, settings, in_atomic):
    """A hit whose refresh isn't due (knox's MIN_REFRESH_INTERVAL) opens no transaction
    either: no BEGIN/COMMIT, nor a SAVEPOINT pair inside an atomic block (ATOMIC_REQUESTS)."""
    settings.REST_KNOX = {"AUTO_REFRESH": True, "TOKEN_TTL": timedelta(hours=1), "MIN_REFRESH_INTERVAL": 60}
    token = make_token()
    authenticate(token)
    with transaction.atomic() if in_atomic else nullcontext():
        _, sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 1, sql


@pytest.mark.parametrize("atomic", [False, True])
def test_due_refresh_on_hit_in_and_out_of_a_transaction(make_token, settings, atomic):
    """A hit whose refresh is due writes once, in autocommit or inside a request's
    transaction, and the new expiry is cached (after the commit)."""
    settings.REST_KNOX = {"AUTO_REFRESH": True, "TOKEN_TTL": timedelta(hours=1), "MIN_REFRESH_INTERVAL": 60}
    token = make_token()
    authenticate(token)
    with freeze_time(timedelta(seconds=120)):
        with transaction.atomic() if atomic else nullcontext():
            _, sql = queries_of(lambda: authenticate(token))
        assert sum(s.startswith("UPDATE") for s in sql) == 1, sql
        # One compare-and-set UPDATE: only over the expiry the cache had.
        update = next(s for s in sql if s.startswith("UPDATE"))
        assert '"expiry" =' in update.split("WHERE", 1)[1], update
        refreshed = AuthToken.objects.get().expiry
        _, sql = queries_of(lambda: authenticate(token))
        assert not [s for s in sql if "knox_authtoken" in s], sql
        assert authenticate(token)[1].expiry == refreshed
