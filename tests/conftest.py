from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator

import pytest
import redis as redis_py
from django.conf import settings
from django.contrib.auth import get_user_model
from knox.models import AuthToken
from rest_framework.test import APIClient

from knox_redis import cache
from tests import installed
from tests.servers import (
    ClusterSetup,
    ClusterUnavailable,
    RedisServer,
    TcpProxy,
    redis_server_binary,
    redis_server_version,
)

_server: RedisServer | None = None

# Tests that need another AUTH_USER_MODEL run under their own settings module (`make test`).
collect_ignore = [] if settings.AUTH_USER_MODEL == "uuidapp.UUIDUser" else ["test_uuid_users.py"]


def pytest_configure(config: pytest.Config) -> None:
    global _server
    try:
        installed.check()  # CI: the installed wheel, not the source tree
    except RuntimeError as exc:
        raise pytest.UsageError(str(exc)) from None
    _server = RedisServer().start()
    settings.CACHES["redis"]["LOCATION"] = _server.url
    print(
        f"knox_redis tests: redis-server {redis_server_version()} on port {_server.port}, "
        f"database {settings.DATABASES['default']['ENGINE']}"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    if _cluster_runs["started"]:
        starts = ", ".join(f"{seconds:.1f} s" for seconds in _cluster_runs["started"])
        terminalreporter.write_line(
            f"knox_redis tests: Redis Cluster started in {starts}; restored before "
            f"{_cluster_runs['restores']} tests in {_cluster_runs['restore_seconds']:.1f} s in all"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        (
            f"knox_redis: database {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
            f"redis-server {redis_server_version()} ({redis_server_binary()}) "
            f"on port {_server.port if _server else '?'}"
        ),
        installed.check(),
    ]


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    assert _server is not None
    return _server


# The session's Redis Cluster: how long it took to start (each time), and the restores before tests.
_cluster_runs: dict = {"started": [], "restores": 0, "restore_seconds": 0.0}


@pytest.fixture(scope="session")
def cluster_setup() -> Iterator[ClusterSetup]:
    """One Redis Cluster for the session (3 masters, a replica each; tests/servers.py), started
    by the first test that asks for `cluster` (a few seconds) and stopped at the end. Skips when
    this redis-server can't run one (no cluster mode, no redis-cli)."""
    setup = ClusterSetup()
    try:
        setup.start()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    _cluster_runs["started"].append(setup.startup_seconds)
    yield setup
    setup.stop()


@pytest.fixture
def cluster(cluster_setup: ClusterSetup) -> ClusterSetup:
    """The session's Redis Cluster as it started: every node up, each first master master with
    its first replica, every slot on its first master, no keys. A test may fail it over, kill
    nodes, migrate slots: the next test gets it restored (`ClusterSetup.reset()`), or, should
    that fail, a new cluster (on new ports: read `seed_urls` and the nodes from the fixture)."""
    began = time.monotonic()
    try:
        cluster_setup.reset()
    except Exception as exc:
        print(f"the Redis Cluster could not be restored ({exc}): starting a new one")
        cluster_setup.stop()
        cluster_setup.start()
        _cluster_runs["started"].append(cluster_setup.startup_seconds)
    _cluster_runs["restores"] += 1
    _cluster_runs["restore_seconds"] += time.monotonic() - began
    return cluster_setup


@pytest.fixture
def on_cluster(cluster: ClusterSetup, settings) -> ClusterSetup:
    """knox_redis pointed at the session's Redis Cluster (restored: see `cluster`)."""
    from tests.helpers import on_the_cluster

    return on_the_cluster(settings, cluster)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test Redis, to cut, blackhole and heal (see `via`)."""
    p = TcpProxy(redis_server.port)
    yield p
    p.close()


@pytest.fixture
def via(settings):
    """Point knox_redis at a URL (the settings change rebuilds the client)."""

    def via(url: str, cooldown: float = 2.0) -> None:
        settings.REST_KNOX_REDIS = {
            **settings.REST_KNOX_REDIS,
            "REDIS_URL": url,
            "CIRCUIT_BREAKER_COOLDOWN": cooldown,
        }

    return via


@pytest.fixture
def redis_conn(redis_server: RedisServer) -> redis_py.Redis:
    return redis_py.Redis(port=redis_server.port, decode_responses=False)


@pytest.fixture(autouse=True)
def clean_cache(redis_server: RedisServer) -> None:
    """Each test starts with an empty Redis and a fresh client (closed breaker)."""
    redis_py.Redis(port=redis_server.port).flushall()
    cache.reset_client()
    yield
    cache.reset_client()


@pytest.fixture
def user(transactional_db):
    return get_user_model().objects.create_user(username="alice", password="pw")


def forget_in_redis(instance) -> None:
    """Remove what write-through cached for a token: Redis then knows nothing of it, as for a
    token created before knox_redis was installed, or whose key was evicted. Sent through the
    product's own client, so it reaches wherever the test pointed knox_redis."""
    from django.core.exceptions import ImproperlyConfigured

    try:
        native = cache.get_client()
        cache.redis_command("DEL", native.token_key(instance.token_key))
        cache.redis_command("HDEL", native.user_key(instance.user_id), bytes.fromhex(instance.digest[:32]))
    except (cache.CacheError, ImproperlyConfigured):
        pass  # unreachable or misconfigured (the test's point): write-through cached nothing there


@pytest.fixture
def make_token(user):
    """A new token. By default not cached (as if Redis had never seen it), so tests start from
    the miss path; `write_through=True` keeps what the login's write-through cached."""

    def make(owner=None, *, write_through=False, **kwargs):
        instance, token = AuthToken.objects.create(user=owner or user, **kwargs)
        if not write_through:
            forget_in_redis(instance)
        return token

    return make


@pytest.fixture
def client() -> APIClient:
    return APIClient()


def auth_header(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Token {token}"}


def basic_header(username: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {raw}"}


@pytest.fixture
def native():
    return cache.get_client()


@pytest.fixture
def pid() -> int:
    return os.getpid()
