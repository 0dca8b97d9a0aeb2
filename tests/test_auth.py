"""The main job: a cached token authenticates without reading the token table."""

from __future__ import annotations

from datetime import timedelta

import pytest
from freezegun import freeze_time
from knox.models import AuthToken
from knox.signals import token_expired
from rest_framework.exceptions import AuthenticationFailed

from tests.helpers import authenticate, queries_of


def test_miss_then_hit(make_token, user, native, redis_conn):
    token = make_token()
    fills = native.stats()["fills"]  # the login's write-through, forgotten by make_token
    (u1, t1), first_sql = queries_of(lambda: authenticate(token))
    (u2, t2), hit_sql = queries_of(lambda: authenticate(token))
    assert u1 == u2 == user
    assert t1.digest == t2.digest
    assert native.stats()["hits"] == 1
    assert len(hit_sql) == 1, hit_sql
    assert "knox_authtoken" not in hit_sql[0]
    # knox's own path (the token join, then the cleanup read), then, the first time a token is
    # seen, one re-read of its row under the generation just created.
    assert len(first_sql) == 3, first_sql
    # A later miss (the record due for a re-read after MAX_CACHE_TTL; it still carries its
    # generation) is knox's 2 queries.
    with freeze_time(timedelta(seconds=3601)):
        _, miss_sql = queries_of(lambda: authenticate(token))
    assert len(miss_sql) == 2, miss_sql
    assert native.stats()["fills"] - fills == 2


def test_unknown_tokens_never_write_to_redis(transactional_db, redis_conn):
    for i in range(20):
        with pytest.raises(AuthenticationFailed):
            authenticate(f"{i:015d}" + "ab" * 32)
    assert redis_conn.dbsize() == 0


def test_hit_returns_a_real_token_instance(make_token, user):
    token = make_token()
    authenticate(token)
    _user, auth_token = authenticate(token)
    db_token = AuthToken.objects.get(digest=auth_token.digest)
    assert isinstance(auth_token, AuthToken)
    for field in ("digest", "token_key", "user_id", "created", "expiry"):
        assert getattr(auth_token, field) == getattr(db_token, field), field
    auth_token.delete()
    assert not AuthToken.objects.filter(digest=db_token.digest).exists()
    with pytest.raises(AuthenticationFailed):
        authenticate(token)


def test_wrong_token_is_rejected(make_token):
    token = make_token()
    authenticate(token)
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    with pytest.raises(AuthenticationFailed):
        authenticate(forged)


def test_inactive_user_rejected_at_once(make_token, user):
    token = make_token()
    authenticate(token)
    authenticate(token)
    user.is_active = False
    user.save()
    with pytest.raises(AuthenticationFailed, match="User inactive or deleted"):
        authenticate(token)


def test_expired_record_deletes_row_and_signals(make_token, user):
    token = make_token(expiry=timedelta(seconds=10))
    authenticate(token)
    seen = []

    def receiver(sender, username, source, **kwargs):
        seen.append((username, source))

    token_expired.connect(receiver)
    try:
        with freeze_time(timedelta(seconds=20)), pytest.raises(AuthenticationFailed):
            authenticate(token)
    finally:
        token_expired.disconnect(receiver)
    assert seen == [("alice", "auth_token")]
    assert not AuthToken.objects.filter(user=user).exists()


def test_stale_expiry_in_cache_never_deletes_a_live_token(make_token, user, native):
    token = make_token(expiry=timedelta(seconds=10))
    authenticate(token)
    # The database moved the expiry on without telling the cache (a raw UPDATE).
    AuthToken.objects.filter(user=user).update(expiry=AuthToken.objects.get().expiry + timedelta(hours=1))
    with freeze_time(timedelta(seconds=20)):
        got_user, _ = authenticate(token)
    assert got_user == user
    assert AuthToken.objects.filter(user=user).exists()


def test_cache_disabled_uses_database_only(make_token, settings, native):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "CACHE_ENABLED": False}
    token = make_token()
    authenticate(token)
    _, sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 2


def test_tokens_sharing_a_token_key_are_cached_independently(user, settings, redis_conn):
    # A 10-character TOKEN_PREFIX leaves 5 random characters in the 15-character token_key,
    # so different tokens do share one. Make that collision happen for certain.
    settings.REST_KNOX = {"TOKEN_PREFIX": "abcdefghij"}
    first_row, first = AuthToken.objects.create(user=user, prefix="abcdefghij")
    twin = first[:15] + "f" * (len(first) - 15)
    from knox.crypto import hash_token

    twin_row = AuthToken(digest=hash_token(twin), token_key=first[:15], user=user, expiry=None)
    AuthToken.objects.bulk_create([twin_row])
    for _ in range(2):
        assert authenticate(first)[1].digest == first_row.digest
        assert authenticate(twin)[1].digest == twin_row.digest
    for t in (first, twin):
        _, sql = queries_of(lambda t=t: authenticate(t))
        assert len(sql) == 1
    fields = redis_conn.hkeys(f"knox:token:{first[:15]}")
    assert len([f for f in fields if f.startswith(b"r:")]) == 2
    # Revoking one leaves the other cached.
    twin_row.delete()
    with pytest.raises(AuthenticationFailed):
        authenticate(twin)
    _, sql = queries_of(lambda: authenticate(first))
    assert len(sql) == 1


def test_non_sha512_hash_algorithm_falls_back_to_knox(user, settings):
    settings.REST_KNOX = {"SECURE_HASH_ALGORITHM": "hashlib.sha3_512"}
    _instance, token = AuthToken.objects.create(user=user)
    assert authenticate(token)[0] == user
    _, sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 1


class TestAutoRefresh:
    @pytest.fixture(autouse=True)
    def refresh_settings(self, settings):
        settings.REST_KNOX = {"AUTO_REFRESH": True, "TOKEN_TTL": timedelta(hours=1), "MIN_REFRESH_INTERVAL": 60}

    def test_refresh_on_hit_updates_db_once_per_interval_and_cache(self, make_token, user, native):
        token = make_token()
        original = AuthToken.objects.get().expiry
        authenticate(token)  # miss: fills
        with freeze_time(timedelta(seconds=30)):
            _, sql = queries_of(lambda: authenticate(token))
        assert [s for s in sql if s.startswith("UPDATE")] == []
        assert AuthToken.objects.get().expiry == original
        with freeze_time(timedelta(seconds=120)):
            _, sql = queries_of(lambda: authenticate(token))
            updates = [s for s in sql if s.startswith("UPDATE")]
            assert len(updates) == 1, sql
            refreshed = AuthToken.objects.get().expiry
            assert refreshed > original
            # The cache now holds the new expiry: the next hit sees it without an UPDATE.
            _, auth_token = authenticate(token)
            assert auth_token.expiry == refreshed
        assert native.stats()["hits"] >= 3

    def test_refresh_respects_max_ttl(self, make_token, settings):
        settings.REST_KNOX = {**settings.REST_KNOX, "AUTO_REFRESH_MAX_TTL": timedelta(hours=2)}
        token = make_token()
        created = AuthToken.objects.get().created
        authenticate(token)
        with freeze_time(timedelta(minutes=50)):
            _, auth_token = authenticate(token)
        with freeze_time(timedelta(minutes=100)):
            _, auth_token = authenticate(token)
            assert auth_token.expiry == created + timedelta(hours=2)
            assert AuthToken.objects.get().expiry == created + timedelta(hours=2)
            # And the cache agrees (a hit, no UPDATE).
            (_, cached), sql = queries_of(lambda: authenticate(token))
            assert cached.expiry == created + timedelta(hours=2)
            assert not [q for q in sql if q.startswith("UPDATE")]

    def test_refresh_of_a_deleted_row_is_rejected(self, make_token, user):
        token = make_token()
        authenticate(token)
        # Delete behind the cache's back (no signal): the refresh UPDATE finds no row.
        AuthToken.objects.filter(user=user)._raw_delete(AuthToken.objects.db)
        with freeze_time(timedelta(seconds=120)), pytest.raises(AuthenticationFailed):
            authenticate(token)


def test_record_is_reread_after_max_cache_ttl(make_token, user, settings, native):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 60}
    token = make_token()
    authenticate(token)
    _, sql = queries_of(lambda: authenticate(token))
    assert len(sql) == 1
    # A delete that bypassed signals is noticed once the record is due for a re-read.
    AuthToken.objects.filter(user=user)._raw_delete(AuthToken.objects.db)
    assert authenticate(token)[0] == user  # still within MAX_CACHE_TTL: the documented bound
    with freeze_time(timedelta(seconds=61)), pytest.raises(AuthenticationFailed):
        authenticate(token)


def test_fresh_record_is_refilled_after_max_cache_ttl(make_token, settings, native):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 60}
    token = make_token()
    authenticate(token)
    with freeze_time(timedelta(seconds=61)):
        _, sql = queries_of(lambda: authenticate(token))
        assert len(sql) == 2  # knox's path; the generation is still there
        _, sql = queries_of(lambda: authenticate(token))
        assert len(sql) == 1  # refilled
