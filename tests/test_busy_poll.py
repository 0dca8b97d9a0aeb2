"""BUSY_POLL_US: how a connection waits for Redis' reply (polling the socket for that long,
then sleeping) changes how soon it is read, never what is read. A reply slower than the
window is read by the sleep that follows; 0 sleeps at once; both authenticate the same."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from knox_redis import cache
from tests.helpers import accepted


@pytest.fixture(params=[0, 100, 10_000], ids=["sleep at once", "default", "poll 10 ms"])
def busy_poll(request, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "USER_CACHE": True, "BUSY_POLL_US": request.param}
    return request.param


def test_hits_are_the_same_whatever_the_wait(busy_poll, make_token, user):
    token = make_token(write_through=True)
    assert accepted(token)  # the user's row cached
    with CaptureQueriesContext(connection) as queries:
        for _ in range(20):
            assert accepted(token)
    assert len(queries) == 0
    user.is_active = False
    user.save()
    assert not accepted(token)


def test_a_reply_slower_than_the_window_is_read_by_the_sleep_after_it(busy_poll, make_token, redis_conn):
    token = make_token(write_through=True)
    assert accepted(token)
    # Redis busy for 50 ms (far beyond any polling window here but 10 ms), then the lookup's
    # reply; within SOCKET_TIMEOUT (0.2 s), so it is a hit, not an error.
    spin = """
        local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end
        local s = now() while now() - s < 50000 do end return 1"""
    busy = redis_conn.connection_pool.get_connection()
    busy.send_command("EVAL", spin, 0)
    time.sleep(0.01)  # Redis has read it and is in the script
    started = time.monotonic()
    assert accepted(token)
    assert busy.read_response() == 1
    redis_conn.connection_pool.release(busy)
    assert time.monotonic() - started >= 0.02
    stats = cache.get_client().stats()
    assert stats["errors"] == 0, stats
