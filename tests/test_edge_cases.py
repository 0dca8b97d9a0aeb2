"""Holes found in review, each pinned by the test that first showed it."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from knox.models import AuthToken

from tests.conftest import auth_header
from tests.helpers import accepted, record_exists
from tests.servers import TcpProxy


@pytest.fixture
def via_proxy(settings, redis_server):
    proxy = TcpProxy(redis_server.port)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": proxy.url, "CIRCUIT_BREAKER_COOLDOWN": 0.05}
    yield proxy
    proxy.close()


def get(client, token) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code


def test_use_tz_false_with_an_activated_time_zone_keeps_expiry(user, settings, redis_conn):
    settings.USE_TZ = False
    _instance, token = AuthToken.objects.create(user=user, expiry=timedelta(seconds=1))
    assert accepted(token)
    assert record_exists(redis_conn, token)
    time.sleep(1.2)
    with timezone.override("Etc/GMT-14"):  # a middleware activating the user's zone
        assert not accepted(token)
