"""The native module itself: its stub matches it, hashing matches knox, errors are Exceptions,
user keys beyond any machine integer round-trip."""

from __future__ import annotations

import ast
import hashlib
import threading
import time
from pathlib import Path

import pytest
from knox.crypto import hash_token as knox_hash_token

import knox_redis
from knox_redis import _knox_redis, cache
from tests.servers import TcpProxy

SECRET = b"a test signing key, 32 bytes long"

STUB = Path(_knox_redis.__file__).with_name("_knox_redis.pyi")


def stub_names() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    names: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[""].add(node.name)
            names[node.name] = {
                n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
            }
        elif isinstance(node, ast.FunctionDef):
            names[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[""].add(node.target.id)
    return names


def test_stub_matches_module():
    names = stub_names()
    public = {n for n in dir(_knox_redis) if not n.startswith("_")} | {"__version__"}
    assert names[""] - {"CachedRecord"} == public
    for cls, methods in names.items():
        if cls:
            runtime = {n for n in dir(getattr(_knox_redis, cls)) if not n.startswith("_")}
            own = runtime - set(dir(Exception))
            assert methods == own, cls


@pytest.mark.parametrize("token", ["", "abc", "é" * 50, "a" * 100_000, "prefix_" + "0f" * 32])
def test_hash_matches_knox(token):
    assert _knox_redis.hash_token(token) == knox_hash_token(token) == hashlib.sha512(token.encode()).hexdigest()


def test_errors_are_exceptions_of_one_family():
    assert issubclass(_knox_redis.CacheError, Exception)
    assert issubclass(_knox_redis.CacheUnavailable, _knox_redis.CacheError)
    assert knox_redis.__version__ == _knox_redis.__version__


def test_bad_arguments_raise_not_panic():
    client = _knox_redis.TokenCache(port=1, breaker_cooldown=0, record_secret=SECRET)
    with pytest.raises(_knox_redis.CacheError):
        client.lookup("key", "short")
    with pytest.raises(TypeError):
        client.revoke([("key", "a" * 128, 1.5)])
    with pytest.raises(TypeError):
        _knox_redis.TokenCache(socket_timeout=float("nan"), record_secret=SECRET)


def test_network_calls_release_the_gil(redis_server):
    """While one thread waits on a hung Redis, another Python thread keeps running."""
    proxy = TcpProxy(redis_server.port)
    try:
        client = _knox_redis.TokenCache(port=proxy.port, socket_timeout=0.5, breaker_cooldown=0, record_secret=SECRET)
        client.ping()
        proxy.blackhole()
        ticks = 0
        done = threading.Event()

        def wait_on_redis():
            with pytest.raises(_knox_redis.CacheUnavailable):
                client.ping()
            done.set()

        thread = threading.Thread(target=wait_on_redis)
        started = time.monotonic()
        thread.start()
        while not done.is_set():
            ticks += 1
        thread.join()
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 1.5
        assert ticks > 10_000  # the main thread ran the whole time
    finally:
        proxy.close()


def test_big_integer_user_pk_is_stored_as_text(make_token, user):
    """A user primary key wider than 64 bits (2**70) is filled and read back as its text."""
    client = cache.get_client()
    digest = "ab" * 64
    found = cache.lookup("bigpk", digest, create=True)
    assert client.fill("bigpk", digest, found.generation, 2**70, 0, None, 10**15, 60_000)
    record, *_ = client.lookup("bigpk", digest)
    assert record[0] == str(2**70)
    assert isinstance(client, _knox_redis.TokenCache)
