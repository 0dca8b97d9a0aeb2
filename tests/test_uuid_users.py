"""A user model keyed by UUID (run under tests.settings_uuid): the user index is named by the
canonical spelling of the key, whatever spelling a caller hands in."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.conftest import auth_header, basic_header
from tests.helpers import accepted, record_exists

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def uuid_user():
    return get_user_model().objects.create_user(username="uma", password="pw")


def cached_token_known_only_to_redis(user, redis_conn) -> str:
    """A token cached, then its row deleted behind Django's back (no signal): only the user's
    index in Redis still knows it."""
    _instance, token = AuthToken.objects.create(user=user)
    assert accepted(token)
    assert accepted(token)
    assert record_exists(redis_conn, token)
    AuthToken.objects.filter(user=user)._raw_delete(using="default")
    assert accepted(token)  # the stale record: what invalidate_user_tokens is for
    return token


@pytest.mark.parametrize("spelling", [str.upper, lambda pk: pk.replace("-", ""), str])
def test_invalidate_user_tokens_with_any_spelling_of_a_uuid(uuid_user, redis_conn, spelling):
    token = cached_token_known_only_to_redis(uuid_user, redis_conn)
    index = cache.get_client().user_key(str(uuid_user.pk))
    assert redis_conn.exists(index)
    knox_redis.invalidate_user_tokens(spelling(str(uuid_user.pk)))
    assert not record_exists(redis_conn, token)
    assert not accepted(token)


def test_invalidate_user_tokens_with_the_uuid_or_the_user(uuid_user, redis_conn):
    token = cached_token_known_only_to_redis(uuid_user, redis_conn)
    knox_redis.invalidate_user_tokens(uuid_user.pk)
    assert not accepted(token)
    token = cached_token_known_only_to_redis(uuid_user, redis_conn)
    knox_redis.invalidate_user_tokens(uuid_user)
    assert not accepted(token)


def test_invalidate_user_tokens_with_a_value_that_cant_be_a_uuid_raises(uuid_user):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        knox_redis.invalidate_user_tokens("not-a-uuid")


def test_login_hit_logoutall_with_uuid_users(client, uuid_user, redis_conn):
    tokens = [client.post("/api/login/", **basic_header("uma", "pw")).data["token"] for _ in range(3)]
    for token in tokens:
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert all(record_exists(redis_conn, t) for t in tokens)
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 204
    assert not any(record_exists(redis_conn, t) for t in tokens)
    assert all(client.get("/api/whoami/", **auth_header(t)).status_code == 401 for t in tokens)


def test_user_cache_with_uuid_keys(uuid_user, settings, redis_conn, django_assert_num_queries):
    """The lookup script reads the user's key out of the record (16 bytes for a UUID) and
    spells it as Django does: the row comes back in the same round trip."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}
    _instance, token = AuthToken.objects.create(user=uuid_user)
    assert accepted(token)
    assert redis_conn.hexists(cache.get_client().user_key(str(uuid_user.pk)), "u")
    with django_assert_num_queries(0):
        assert accepted(token)
    uuid_user.is_active = False
    uuid_user.save()
    assert not accepted(token)
    knox_redis.invalidate_user(str(uuid_user.pk).upper())  # any spelling names the same row
