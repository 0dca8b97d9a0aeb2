"""Redis is not trusted: a record is believed only if its MAC, keyed from SIGNING_KEY (or
SECRET_KEY), verifies for the token_key and digest it is stored under. Whoever can write to
Redis can make tokens miss, never make one authenticate, or authenticate as someone else."""

from __future__ import annotations

import hashlib
import secrets

from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from knox.models import AuthToken

from knox_redis import _knox_redis, cache
from tests.conftest import auth_header
from tests.helpers import accepted, authenticate, whoami


def attacker_client(redis_server) -> _knox_redis.TokenCache:
    """The native client as someone with Redis access but without the secret would use it."""
    return _knox_redis.TokenCache(port=redis_server.port, record_secret=b"a guess at the signing key......")


def plant(native, token: str, user_pk, *, expiry_us=None) -> None:
    digest = hashlib.sha512(token.encode()).hexdigest()
    _record, generation, *_ = native.lookup(token[:15], digest, True)
    now_us = cache.to_us(timezone.now())
    assert native.fill(token[:15], digest, generation, user_pk, now_us, expiry_us, now_us + 3_000_000_000, 60_000)


def test_a_planted_record_for_a_made_up_token_does_not_log_in(transactional_db, redis_server):
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    token = secrets.token_hex(32)
    plant(attacker_client(redis_server), token, admin.pk)
    assert not accepted(token)
    assert cache.get_client().stats()["bad_mac"] == 1


def test_a_record_rewritten_to_another_user_is_a_miss(client, make_token, redis_server, user):
    """A real token, its record replaced by one naming the admin: the row decides."""
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    plant(attacker_client(redis_server), token, admin.pk)
    with CaptureQueriesContext(connection) as queries:
        user_, _auth = authenticate(token)
    assert user_ == user
    assert len(queries) == 2  # knox's own path: the planted record was not believed
    assert client.get("/api/whoami/", **auth_header(token)).json()["user"] == "alice"


def test_any_altered_byte_is_a_miss(make_token, redis_conn, user):
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    row = AuthToken.objects.get()
    key, field = f"knox:token:{token[:15]}", f"r:{row.digest[:32]}"
    good = redis_conn.hget(key, field)
    for i in range(8, len(good)):  # the first 8 bytes are the fill generation, not vouched for
        altered = bytearray(good)
        altered[i] ^= 0x40
        redis_conn.hset(key, field, bytes(altered))
        assert cache.lookup(token[:15], row.digest).record is None, i
    redis_conn.hset(key, field, good)
    assert cache.lookup(token[:15], row.digest).record is not None


def test_changing_the_signing_key_turns_records_into_misses_once(make_token, settings, redis_conn):
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SIGNING_KEY": "k" * 40}
    assert accepted(token)  # the old record fails its MAC: read from the database, re-cached
    assert cache.get_client().stats()["bad_mac"] == 1
    with CaptureQueriesContext(connection) as queries:
        assert accepted(token)
    assert len(queries) == 1  # a hit again, under the new key


def test_records_are_compact_enough_for_listpack_encoding(make_token, redis_conn, user):
    """Every field and value ≤ 64 bytes, so Redis keeps each token's hash and the user's
    index as a listpack (a few hundred bytes per token, not a hashtable's ~1 KB)."""
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        assert accepted(token)
        assert accepted(token)
    for token in tokens:
        key = f"knox:token:{token[:15]}"
        assert redis_conn.object("encoding", key) in (b"listpack", b"ziplist")  # 7.x, 6.2
        assert all(len(v) <= 64 for v in redis_conn.hvals(key))
        assert redis_conn.hlen(key) == 1, "one field per cached token"
    assert redis_conn.object("encoding", f"knox:user:{user.pk}:ix") in (b"listpack", b"ziplist")


def test_a_record_copied_from_another_prefix_sharing_the_secret_is_a_miss(make_token, settings, redis_conn):
    """A staging site on the same Redis with the same SECRET_KEY: its records don't verify
    under this prefix (the MAC key is derived for the prefix and database)."""
    token = make_token()
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "staging"}
    assert accepted(token)
    assert accepted(token)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "knox"}
    redis_conn.copy(f"staging:token:{token[:15]}", f"knox:token:{token[:15]}")
    assert accepted(token)  # from the database: the copied record failed its MAC
    assert cache.get_client().stats()["bad_mac"] == 1


def test_a_secret_key_rotation_with_fallbacks_keeps_records_valid(make_token, settings):
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a new secret key, rotated in" * 2
    with CaptureQueriesContext(connection) as queries:
        assert accepted(token)
    assert len(queries) == 1  # still a hit: the old key verifies
    assert cache.get_client().stats()["bad_mac"] == 0


def test_signing_key_fallbacks_verify_but_never_sign(make_token, settings, redis_conn):
    old, new = "o" * 40, "n" * 40
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SIGNING_KEY": old}
    token = make_token()
    assert accepted(token)
    assert accepted(token)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SIGNING_KEY": new, "SIGNING_KEY_FALLBACKS": [old]}
    with CaptureQueriesContext(connection) as queries:
        assert accepted(token)
    assert len(queries) == 1
    other = make_token(write_through=True)  # signed with the new key
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SIGNING_KEY": new, "SIGNING_KEY_FALLBACKS": []}
    with CaptureQueriesContext(connection) as queries:
        assert accepted(other)
    assert len(queries) == 1


def test_record_copied_under_another_tokens_field_is_not_trusted(client, make_token, redis_conn):
    """The hash field names a token by 128 bits of its digest, and the record's MAC binds it
    to them: a valid record moved under another token's field is a miss."""
    other, token = make_token(), make_token()
    assert whoami(client, other) == 200
    assert whoami(client, token) == 200
    rows = {row.token_key: row for row in AuthToken.objects.all()}
    key, field = f"knox:token:{token[:15]}", f"r:{rows[token[:15]].digest[:32]}"
    forged = redis_conn.hget(f"knox:token:{other[:15]}", f"r:{rows[other[:15]].digest[:32]}")
    redis_conn.hset(key, field, forged)
    with CaptureQueriesContext(connection) as queries:
        assert whoami(client, token) == 200
    assert len(queries) == 2  # knox's database path, not the forged record
    assert redis_conn.hget(key, field) != forged  # and the record was rewritten
