"""The native client connects where the cache's LOCATION says: unix sockets, passwords, ACL
users and database numbers, against real servers."""

from __future__ import annotations

import os

import pytest
import redis as redis_py

from knox_redis import cache
from tests.conftest import auth_header
from tests.servers import RedisServer


def authenticate_twice(client, token) -> None:
    for _ in range(2):
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert cache.get_client().stats()["hits"] == 1


@pytest.fixture
def server_with(request):
    servers = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(extra_args=args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_database_number_from_location(client, make_token, settings, server_with):
    server = server_with()
    settings.CACHES = {
        **settings.CACHES,
        "redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": f"redis://127.0.0.1:{server.port}/5"},
    }
    authenticate_twice(client, make_token())
    assert redis_py.Redis(port=server.port, db=5).dbsize() > 0
    assert redis_py.Redis(port=server.port, db=0).dbsize() == 0


def test_unix_socket(client, make_token, settings, server_with):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="kr-"), "redis.sock")  # short: sun_path is 108 bytes
    server_with("--unixsocket", path, "--unixsocketperm", "700")
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": f"unix://{path}?db=2"}
    authenticate_twice(client, make_token())
    assert redis_py.Redis(unix_socket_path=path, db=2).dbsize() > 0


def test_password_and_acl_user(client, make_token, settings, server_with):
    server = server_with("--requirepass", "s3cret", "--user", "knox", "on", ">knoxpw", "~knox:*", "+@all")
    settings.CACHES = {
        **settings.CACHES,
        "redis": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://knox:knoxpw@127.0.0.1:{server.port}/0",
        },
    }
    authenticate_twice(client, make_token())
    settings.CACHES = {
        **settings.CACHES,
        "redis": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{server.port}/0",
            "OPTIONS": {"PASSWORD": "s3cret"},
        },
    }
    authenticate_twice(client, make_token())


def test_wrong_password_falls_back_to_the_database(client, make_token, settings, server_with):
    server = server_with("--requirepass", "s3cret")
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": f"redis://:wrong@127.0.0.1:{server.port}/0"}
    token = make_token()
    for _ in range(3):
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert cache.get_client().stats()["errors"] >= 1


@pytest.mark.parametrize("via", ["unix socket", "ACL user"])
def test_the_local_cache_listener_connects_as_the_pool_does(via, make_token, settings, server_with):
    """LOCAL_CACHE_SIZE: the listener's own connection (not redis-rs') goes where the pool's
    do, with the same credentials, and requests read Redis' pushes from it themselves."""
    import tempfile
    import time

    from tests.helpers import a_write_behind_the_process_stops_the_next_local_hit

    if via == "unix socket":
        path = os.path.join(tempfile.mkdtemp(prefix="kr-"), "redis.sock")  # short: sun_path is 108 bytes
        server_with("--unixsocket", path, "--unixsocketperm", "700")
        url = f"unix://{path}?db=2"
        writer = redis_py.Redis(unix_socket_path=path, db=2)
    else:
        from tests.test_checks import acl_user, readme_acl

        server = server_with("--requirepass", "s3cret", *acl_user(*readme_acl()))  # the README's rules
        url = f"redis://knox:knoxpw@127.0.0.1:{server.port}/0"
        writer = redis_py.Redis(port=server.port, password="s3cret")
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": url, "LOCAL_CACHE_SIZE": 100}
    native = cache.get_client()
    deadline = time.monotonic() + 10
    while not native.local_cache_live:
        assert time.monotonic() < deadline, native.local_cache_error
        time.sleep(0.01)
    token = make_token(write_through=True)
    a_write_behind_the_process_stops_the_next_local_hit(
        token, lambda: writer.hset(f"knox:token:{token[:15]}", "unrelated", "x")
    )
