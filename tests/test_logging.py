"""What knox_redis logs: each change of the circuit breaker once (opened, with the kind of error
that opened it; closed), never a line per request; and no line, at any level, carries a token,
its token_key, its digest or a password."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import timedelta

from django.test import Client
from knox.models import AuthToken

from knox_redis import cache
from knox_redis.checks import check_settings
from tests.conftest import auth_header, basic_header
from tests.helpers import whoami
from tests.servers import RedisServer, TcpProxy, free_port
from tests.test_checks import readme_acl

OPENED = "circuit breaker open"
CLOSED = "circuit breaker closed"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "knox_redis" and r.levelno >= logging.WARNING]


def test_the_breaker_opening_and_closing_are_logged_once_each(client, make_token, proxy, via, caplog):
    via(proxy.url, cooldown=0.1)
    token = make_token(write_through=True)
    cache._last_warning.clear()
    with caplog.at_level(logging.DEBUG, logger="knox_redis"):
        assert whoami(client, token) == 200
        proxy.blackhole()  # every call times out; the breaker lets one probe through per 0.1 s
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            assert whoami(client, token) == 200  # from the database
        proxy.heal()
        time.sleep(0.15)
        for _ in range(20):
            assert whoami(client, token) == 200
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    opened, closed = warnings
    assert OPENED in opened
    assert "timeout" in opened
    assert "0.1s" in opened  # how often it probes
    assert CLOSED in closed
    assert cache.get_client().stats()["hits"] >= 20  # served from Redis again


def test_each_outage_is_logged_once_with_the_kind_of_error(client, make_token, via, caplog):
    token = make_token(write_through=True)
    cache._last_warning.clear()
    with caplog.at_level(logging.WARNING, logger="knox_redis"):
        via(f"redis://127.0.0.1:{free_port()}/0", cooldown=0.05)  # nobody listens there
        for _ in range(10):
            assert whoami(client, token) == 200
            time.sleep(0.01)  # probes come and fail: still one outage
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert OPENED in warnings[0]
    assert "connection" in warnings[0]
    assert "lookup failed" in warnings[0]


def test_no_log_record_carries_a_token_its_key_its_digest_or_a_password(
    settings, caplog, transactional_db, django_user_model
):
    redis_password, wrong_password, user_password = (f"{name}-{secrets.token_hex(8)}" for name in "rwu")
    server = RedisServer(extra_args=("--user", "knox", "on", f">{redis_password}", *readme_acl())).start()
    proxy = TcpProxy(server.port)
    caplog.set_level(logging.DEBUG)
    for name in ("knox_redis", "django", "django.request"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        url = f"redis://knox:{redis_password}@127.0.0.1:{proxy.port}/0"
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": url, "CIRCUIT_BREAKER_COOLDOWN": 0.1}
        alice = django_user_model.objects.create_user(username="alice", password=user_password)
        client = Client()
        tokens = [client.post("/api/login/", **basic_header("alice", user_password)).json()["token"] for _ in range(4)]
        for token in tokens:
            assert [client.get("/api/whoami/", **auth_header(token)).status_code for _ in range(2)] == [200, 200]
        made_up = secrets.token_hex(32)
        assert client.get("/api/whoami/", **auth_header(made_up)).status_code == 401
        expired, expired_token = AuthToken.objects.create(user=alice, expiry=timedelta(seconds=-1))
        tokens += [made_up, expired_token]
        digests = list(AuthToken.objects.values_list("digest", flat=True))

        proxy.cut()  # Redis unreachable
        # From the database: knox's cleanup deletes the expired sibling without Redis (logged).
        assert client.get("/api/whoami/", **auth_header(tokens[0])).status_code == 200
        assert not AuthToken.objects.filter(pk=expired.pk).exists()
        assert client.post("/api/logout/", **auth_header(tokens[0])).status_code == 503
        assert client.post("/api/logoutall/", **auth_header(tokens[1])).status_code == 503
        proxy.heal()
        time.sleep(0.15)
        assert client.get("/api/whoami/", **auth_header(tokens[0])).status_code == 200
        assert client.post("/api/logout/", **auth_header(tokens[0])).status_code == 204
        assert client.post("/api/logoutall/", **auth_header(tokens[1])).status_code == 204

        wrong = f"redis://knox:{wrong_password}@127.0.0.1:{proxy.port}/0"
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": wrong}
        assert client.get("/api/whoami/", **auth_header(tokens[2])).status_code == 401  # logged out
    finally:
        proxy.close()
        server.stop()

    messages = [r.getMessage() for r in caplog.records]
    for expected in (OPENED, CLOSED, "refusing to revoke", "expired token without Redis", "authentication failed"):
        assert any(expected in m for m in messages), (expected, messages)
    secrets_ = {redis_password, wrong_password, user_password}
    for token in tokens:
        secrets_ |= {token, token[:15]}
    for digest in digests:
        secrets_ |= {digest, digest[:32]}  # the hash field names the first 32 characters
    # What knox_redis logs, and what Django's request logger says of its responses. (Not
    # django.template's DEBUG records: Django 4.2 logs the variables of its technical error
    # page there, the request's headers and the settings among them, a Django matter.)
    ours = [r for r in caplog.records if r.name.startswith("knox_redis") or r.name == "django.request"]
    texts = [f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in ours]
    leaks = {secret for secret in secrets_ for text in texts if secret in text}
    assert not leaks, leaks


def test_no_message_carries_the_password_of_a_redis_url_knox_redis_refuses(settings, caplog, make_token, client):
    """A URL that parses but that knox_redis refuses (here: TLS without verification) is
    reported in logs, in E001 and by the management command: never with its password."""
    password = f"pw-{secrets.token_hex(8)}"
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_URL": f"rediss://knox:{password}@127.0.0.1:6380/0?ssl_cert_reqs=none",
    }
    token = make_token()
    cache._last_warning.clear()
    with caplog.at_level(logging.DEBUG, logger="knox_redis"):
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200  # fails open
        client.post("/api/logout/", **auth_header(token))  # refused: Redis can't be told
    assert not [r.getMessage() for r in caplog.records if password in r.getMessage()]
    (error,) = check_settings()
    assert error.id == "knox_redis.E001"
    assert password not in error.msg
    assert "knox:***@" in error.msg
