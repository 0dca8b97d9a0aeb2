"""A lookup whose reply is byte for byte one this process decoded before (same token, same
server) returns what was built from it then, instead of verifying and decoding it again
(decoded.rs). Every lookup still asks Redis: only an identical reply is reused, so a record
altered, revoked or filled again, or a user row saved since, is decoded anew."""

from __future__ import annotations

import hashlib

from django.contrib.auth import get_user_model

from knox_redis import cache
from tests.helpers import accepted, authenticate


def lookup(token: str) -> cache.Lookup:
    found = cache.lookup(token[:15], hashlib.sha512(token.encode()).hexdigest())
    assert found is not None
    return found


def test_the_same_reply_is_decoded_once(make_token, redis_conn):
    token = make_token()
    assert accepted(token)
    first = lookup(token)
    before = cache.get_client().stats()
    assert lookup(token) is first
    after = cache.get_client().stats()
    assert after["hits"] - before["hits"] == 1  # counted as any hit

    key = f"knox:token:{token[:15]}"
    field = next(f for f in redis_conn.hkeys(key) if f.startswith(b"r:"))
    good = redis_conn.hget(key, field)
    altered = bytearray(good)
    altered[-1] ^= 0x01
    redis_conn.hset(key, field, bytes(altered))
    assert lookup(token).record is None  # other bytes: decoded, and the MAC fails
    redis_conn.hset(key, field, good)
    assert lookup(token) is first  # the same bytes again


def test_a_record_filled_again_is_decoded_anew(make_token, redis_conn):
    token = make_token()
    assert accepted(token)
    first = lookup(token)
    redis_conn.delete(f"knox:token:{token[:15]}")  # evicted: the next request fills it again
    assert accepted(token)
    again = lookup(token)
    assert again is not first
    assert again.record is not None
    assert lookup(token) is again


def test_a_user_row_saved_since_is_decoded_anew(settings, make_token, user):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    token = make_token()
    assert accepted(token)
    assert accepted(token)  # the row cached
    assert lookup(token) is lookup(token)
    get_user_model().objects.filter(pk=user.pk).get().save()  # revokes the row
    user.first_name = "Renamed"
    user.save()
    assert accepted(token)  # read from the database, the row cached again
    found, _auth = authenticate(token)
    assert found.first_name == "Renamed"
    stats = cache.get_client().stats()
    assert stats["user_hits"] >= 1
