"""rediss:// against a real TLS redis-server with a private CA (made here with openssl)."""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from knox_redis import _knox_redis, cache
from tests.conftest import auth_header
from tests.helpers import a_write_behind_the_process_stops_the_next_local_hit
from tests.servers import free_port, redis_server_binary


def _supports_tls() -> bool:
    try:
        # Listening nowhere makes it exit at once; without TLS support, tls-port is unknown.
        out = subprocess.run(
            [redis_server_binary(), "--port", "0", "--tls-port", "0", "--save", ""],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Unrecognized option" not in (out.stdout + out.stderr) and "Bad directive" not in (out.stdout + out.stderr)


pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or not _supports_tls(),
    reason="needs openssl and a redis-server built with TLS",
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=knox-redis test CA",
        # Python 3.13's default context verifies strictly (VERIFY_X509_STRICT): a CA must say
        # what its key may sign.
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=d,
    )
    (d / "san.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid,issuer\n"  # also required by VERIFY_X509_STRICT
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=d,
    )
    port = free_port()
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(d / "server.pem"),
            "--tls-key-file",
            str(d / "server.key"),
            "--tls-ca-cert-file",
            str(d / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(d),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    context = ssl.create_default_context(cafile=str(d / "ca.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield port, str(d / "ca.pem")
    process.terminate()
    process.wait(10)


def test_native_client_verifies_with_private_ca(tls_server):
    port, ca = tls_server
    _knox_redis.TokenCache(host="localhost", port=port, tls=True, tls_ca_certs=ca, record_secret=b"s" * 32).ping()


def test_untrusted_server_certificate_is_refused(tls_server):
    port, _ca = tls_server
    client = _knox_redis.TokenCache(host="localhost", port=port, tls=True, breaker_cooldown=0, record_secret=b"s" * 32)
    with pytest.raises(_knox_redis.CacheError):
        client.ping()


def test_authentication_over_rediss(tls_server, settings, client, make_token):
    port, ca = tls_server
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_URL": f"rediss://localhost:{port}/0?ssl_ca_certs={ca}",
    }
    token = make_token()
    for _ in range(3):
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    stats = cache.get_client().stats()
    assert stats["hits"] == 2, stats
    assert stats["errors"] == 0, stats
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401


def test_the_local_cache_over_rediss(tls_server, settings, make_token):
    """LOCAL_CACHE_SIZE over TLS: the listener's own TLS connection verifies the server with
    the same private CA as the pool, and requests read its TLS records themselves."""
    port, ca = tls_server
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_URL": f"rediss://localhost:{port}/0?ssl_ca_certs={ca}",
        "LOCAL_CACHE_SIZE": 100,
    }
    native = cache.get_client()
    deadline = time.monotonic() + 10
    while not native.local_cache_live:
        assert time.monotonic() < deadline, native.local_cache_error
        time.sleep(0.01)
    token = make_token(write_through=True)
    a_write_behind_the_process_stops_the_next_local_hit(
        token, lambda: cache.redis_command("HSET", native.token_key(token[:15]), "unrelated", "x")
    )


def test_the_local_cache_listener_refuses_an_untrusted_certificate(tls_server, settings):
    port, _ca = tls_server
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_URL": f"rediss://localhost:{port}/0",
        "LOCAL_CACHE_SIZE": 100,
    }
    native = cache.get_client()
    deadline = time.monotonic() + 10
    while native.local_cache_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "certificate" in native.local_cache_error.lower(), native.local_cache_error
    assert not native.local_cache_live


def test_sentinel_over_tls(tls_server, settings, client, make_token, tmp_path):
    """Sentinel with TLS both ways: a sentinel that speaks only TLS (SENTINEL_KWARGS ssl and
    ssl_ca_certs) names the TLS-only server above, reached with REDIS_URL's TLS settings; both
    certificates verified against the private CA, the data node's for the IP the sentinel gives."""
    port, ca = tls_server
    certs = Path(ca).parent
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"tls-cert-file {certs / 'server.pem'}\ntls-key-file {certs / 'server.key'}\n"
        f"tls-ca-cert-file {ca}\ntls-auth-clients no\ntls-replication yes\n"
        f"sentinel monitor tlsm 127.0.0.1 {port} 1\n"
    )
    process = subprocess.Popen(
        [redis_server_binary(), str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        settings.REST_KNOX_REDIS = {
            "SENTINELS": [("localhost", sentinel_port)],
            "SENTINEL_SERVICE_NAME": "tlsm",
            "SENTINEL_KWARGS": {"ssl": True, "ssl_ca_certs": ca},
            "REDIS_URL": f"rediss://tlsm/0?ssl_ca_certs={ca}",
        }
        deadline = time.monotonic() + 10
        while True:
            try:
                cache.redis_command("PING")
                break
            except cache.CacheError:
                assert time.monotonic() < deadline, "the TLS sentinel never answered"
                time.sleep(0.1)
        assert cache.get_client().primary_address == f"127.0.0.1:{port}"
        token = make_token()
        assert [client.get("/api/whoami/", **auth_header(token)).status_code for _ in range(3)] == [200] * 3
        assert cache.get_client().stats()["hits"] == 2
        assert client.post("/api/logout/", **auth_header(token)).status_code == 204
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 401
        # Without the private CA, the sentinel's certificate is refused.
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SENTINEL_KWARGS": {"ssl": True}}
        with pytest.raises(cache.CacheUnavailable, match="no sentinel named the primary"):
            cache.redis_command("PING")
    finally:
        process.terminate()
        process.wait(10)


def test_commands_and_replies_larger_than_tls_buffers(tls_server, settings):
    """rustls takes at most 64 KiB of plaintext before its records go out: a larger command
    (a logoutall of hundreds of tokens, a Sentinel catch-up) is sent in turns, not refused."""
    port, ca = tls_server
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_URL": f"rediss://localhost:{port}/0?ssl_ca_certs={ca}",
    }
    big = secrets.token_bytes(300_000)
    cache.redis_command("SET", "knox:big", big)
    assert cache.redis_command("GET", "knox:big") == big
    assert cache.get_client().stats()["errors"] == 0
