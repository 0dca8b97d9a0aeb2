"""Small helpers the test modules share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header

factory = APIRequestFactory()


def authenticate(token: str, cls: type = TokenAuthentication) -> Any:
    return cls().authenticate(factory.get("/", **auth_header(token)))


def accepted(token: str, cls: type = TokenAuthentication) -> bool:
    try:
        return authenticate(token, cls) is not None
    except AuthenticationFailed:
        return False


def whoami(client: Any, token: str) -> int:
    """The status of a request with the token through the test API: 200 accepted, 401 refused."""
    return client.get("/api/whoami/", **auth_header(token)).status_code


def queries_of(fn: Any) -> tuple[Any, list[str]]:
    """fn's result and the SQL it sent to the default database."""
    with CaptureQueriesContext(connection) as ctx:
        result = fn()
    return result, [q["sql"] for q in ctx.captured_queries]


def record_field(token: str) -> tuple[str, str]:
    """The Redis key and hash field of the token's cached record."""
    row = AuthToken.objects.get(token_key=token[:15])
    return f"knox:token:{token[:15]}", f"r:{row.digest[:32]}"


def record_exists(redis_conn: Any, token: str) -> bool:
    return any(f.startswith(b"r:") for f in redis_conn.hkeys(f"knox:token:{token[:15]}"))


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict]:
    """Run fn in a thread with its own database connection; return (thread, result box)."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def served_locally(token: str) -> bool:
    """Accepted, and from this process's in-process cache (LOCAL_CACHE_SIZE), not Redis."""
    from knox_redis import cache

    before = cache.get_client().stats()["local_hits"]
    return accepted(token) and cache.get_client().stats()["local_hits"] > before


def served_locally_soon(token: str, within: float = 3.0) -> None:
    """Wait until the token is served from the process: a reply kept before the push of the
    login's own write arrived is rightly dropped by it, so it may take a few requests."""
    deadline = time.monotonic() + within
    while not served_locally(token):
        assert time.monotonic() < deadline, "never served from the process"
        time.sleep(0.02)


def held_listener_then(write: Callable[[], Any]) -> None:
    """Hold the tracking listener's thread where it would read its socket (as if the OS didn't
    run it), run `write` (a change to a cached key made by another client), and release it.
    While it is held, requests must apply Redis' push themselves."""
    from knox_redis import cache

    native = cache.get_client()
    assert native._hold_listener(True), native.local_cache_error
    try:
        write()
    finally:
        native._hold_listener(False)


def a_write_behind_the_process_stops_the_next_local_hit(token: str, write: Callable[[], Any]) -> None:
    """`token` is served from the process; with the listener's thread held, `write` changes the
    token's key in Redis (another client: nothing in this process knows), and the very next
    request is not served from the process: it found Redis' push in the socket itself."""
    from knox_redis import cache

    served_locally_soon(token)
    native = cache.get_client()

    def then_next_request() -> None:
        write()
        assert native.local_cache_live  # not the heartbeat lapsing: the push, read by the request
        assert not served_locally(token)

    held_listener_then(then_next_request)


def on_the_cluster(settings, cluster, **overrides):
    """Point knox_redis at a test Redis Cluster (two of its nodes as seeds), with a short
    breaker cool-down unless `overrides` (other REST_KNOX_REDIS keys) say otherwise."""
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_CLUSTER_NODES": cluster.seed_urls[:2],
        "CIRCUIT_BREAKER_COOLDOWN": 0.2,
        **overrides,
    }
    return cluster


def token_key_on(cluster, native, node) -> str:
    """A token_key whose key lives on `node` (a master of the test cluster)."""
    from redis.crc import key_slot

    owners = cluster._slot_owners(node)
    for n in range(100_000):
        token_key = f"{n:015x}"
        if owners.get(key_slot(native.token_key(token_key).encode())) == node.node_id:
            return token_key
    raise LookupError(f"no token_key on {node.address}")
