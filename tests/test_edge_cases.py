"""Holes found in review, each pinned by the test that first showed it."""

from __future__ import annotations

import pytest

from tests.conftest import auth_header
from tests.servers import TcpProxy


@pytest.fixture
def via_proxy(settings, redis_server):
    proxy = TcpProxy(redis_server.port)
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": proxy.url, "CIRCUIT_BREAKER_COOLDOWN": 0.05}
    yield proxy
    proxy.close()


def get(client, token) -> int:
    return client.get("/api/whoami/", **auth_header(token)).status_code
