"""A key of ours left without a TTL (a PERSIST, a restore without one) gets one at its next
USER_CACHE hit, even while its row is served from it: every key of ours ends up with one."""

from __future__ import annotations

import pytest

from tests.helpers import accepted


@pytest.fixture
def user_cache(settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True}


def test_a_user_key_left_without_a_ttl_gets_one_on_the_next_hit(user_cache, make_token, user, redis_conn):
    token = make_token()
    assert accepted(token)  # the row cached
    assert accepted(token)
    key = f"knox:user:{user.pk}:ix"
    assert redis_conn.hexists(key, "u")
    redis_conn.persist(key)  # an operator, a restore without TTL...
    assert redis_conn.pttl(key) == -1
    for _ in range(3):
        assert accepted(token)  # hits, built from the row
    assert redis_conn.pttl(key) > 0, "a key of ours was left without a TTL"
