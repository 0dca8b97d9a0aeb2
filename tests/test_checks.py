"""System checks for settings that can't work."""

from __future__ import annotations

import time
from io import StringIO
from pathlib import Path

import pytest
import redis as redis_py
from django.core import checks
from django.core.checks.registry import registry
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from knox.models import AuthToken

from knox_redis import cache
from knox_redis.checks import check_authentication_classes, check_redis_server, check_token_length, check_token_prefix
from tests.conftest import auth_header, basic_header
from tests.servers import RedisServer, free_port


def test_knox_tokens_longer_than_knox_redis_accepts_are_an_error(settings):
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 2048}
    (error,) = check_token_length()
    assert error.id == "knox_redis.E002"
    assert "2048" in error.msg
    assert error.hint
    with pytest.raises(SystemCheckError, match=r"knox_redis\.E002"):
        call_command("check")


def test_the_longest_tokens_knox_redis_accepts_pass(settings):
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 10, "TOKEN_PREFIX": "p" * 10}
    assert check_token_length() == []
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 9, "TOKEN_PREFIX": "p" * 10}
    # 1015 // 2 bytes of hex: 1014 characters, plus the prefix: still 1024.
    assert check_token_length() == []
    settings.REST_KNOX = {"AUTH_TOKEN_CHARACTER_LENGTH": 1024 - 8, "TOKEN_PREFIX": "p" * 10}
    assert [e.id for e in check_token_length()] == ["knox_redis.E002"]


# knox's own classes and views beside knox_redis's.


def test_knox_token_prefix_longer_than_knox_allows_is_an_error(monkeypatch):
    from knox.settings import CONSTANTS, knox_settings

    # Not through settings.REST_KNOX: knox raises ValueError when that changes at runtime. At
    # startup nothing checks it, which is what this check is for.
    monkeypatch.setattr(knox_settings, "TOKEN_PREFIX", "p" * CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH, raising=False)
    assert check_token_prefix() == []
    monkeypatch.setattr(knox_settings, "TOKEN_PREFIX", "p" * (CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH + 1), raising=False)
    (error,) = check_token_prefix()
    assert error.id == "knox_redis.E003"
    assert "MAXIMUM_TOKEN_PREFIX_LENGTH" in error.msg
    assert error.hint
    with pytest.raises(SystemCheckError, match=r"knox_redis\.E003"):
        call_command("check")


@pytest.mark.parametrize("entry", ["knox.auth.TokenAuthentication", "knox_auth_class"])
def test_knox_own_authentication_class_is_a_warning(settings, entry):
    from knox.auth import TokenAuthentication

    entry = TokenAuthentication if entry == "knox_auth_class" else entry
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_AUTHENTICATION_CLASSES": [entry]}
    (warning,) = check_authentication_classes()
    assert warning.id == "knox_redis.W001"
    assert isinstance(warning, checks.Warning)
    assert "knox_redis.auth.TokenAuthentication" in warning.hint


def test_knox_redis_authentication_class_passes(settings):
    from knox_redis.auth import TokenAuthentication

    assert check_authentication_classes() == []  # the test settings: knox_redis's, by path
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_AUTHENTICATION_CLASSES": [TokenAuthentication]}
    assert check_authentication_classes() == []


def test_knox_own_logoutall_view_revokes_through_signals(make_token, user):
    """knox's LogoutAllView (routed instead of knox_redis's) deletes with a queryset delete, which
    sends pre_delete per row: the cached tokens are revoked all the same, so no check for it."""
    from django.test import Client
    from knox.views import LogoutAllView
    from rest_framework.test import APIRequestFactory

    client = Client()
    tokens = [make_token(), make_token()]
    for token in tokens:
        for _ in range(2):
            assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert cache.get_client().stats()["hits"] == 2
    request = APIRequestFactory().post("/logoutall/", **auth_header(tokens[0]))
    assert LogoutAllView.as_view()(request).status_code == 204
    for token in tokens:
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 401
    assert cache.get_client().stats()["hits"] == 2


# `check --deploy` only: the Redis the native client uses, probed with CONFIG GET.


def test_redis_checks_run_only_with_deploy():
    assert check_redis_server not in registry.get_checks(include_deployment_checks=False)
    assert check_redis_server in registry.get_checks(include_deployment_checks=True)


@pytest.fixture
def probe(settings):
    """Start a redis-server with these arguments, point knox_redis at it, run the deploy check."""
    servers = []

    def probe(*args: str, url: str | None = None) -> list[checks.CheckMessage]:
        if url is None:
            server = RedisServer(extra_args=args).start()
            servers.append(server)
            url = server.url
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": url}
        started = time.monotonic()
        messages = check_redis_server()
        assert time.monotonic() - started < 2
        return messages

    yield probe
    for server in servers:
        server.stop()


def test_the_test_redis_passes(probe, redis_server):
    assert probe(url=redis_server.url) == []  # no maxmemory, no persistence


def test_unreachable_redis_is_a_warning(probe, settings):
    (warning,) = probe(url=f"redis://127.0.0.1:{free_port()}/0")
    assert warning.id == "knox_redis.W002"
    assert isinstance(warning, checks.Warning)
    assert warning.hint
    out, err = StringIO(), StringIO()
    call_command("check", deploy=True, stdout=out, stderr=err)  # a warning: does not fail
    assert "knox_redis.W002" in out.getvalue() + err.getvalue()
    out, err = StringIO(), StringIO()
    call_command("check", stdout=out, stderr=err)  # without --deploy, Redis is not asked
    assert "knox_redis.W002" not in out.getvalue() + err.getvalue()


def test_noeviction_with_maxmemory_is_a_warning(probe):
    (warning,) = probe("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")
    assert warning.id == "knox_redis.W004"
    assert "noeviction" in warning.msg
    assert "circuit breaker" in warning.msg
    assert "allkeys-lru" in warning.hint


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_an_evicting_policy_passes(probe, policy):
    assert probe("--maxmemory", "64mb", "--maxmemory-policy", policy) == []


def test_noeviction_without_maxmemory_passes(probe):
    assert probe("--maxmemory-policy", "noeviction") == []


def test_persistence_is_a_warning(probe):
    (warning,) = probe("--save", "3600", "1", "--appendonly", "yes")
    assert warning.id == "knox_redis.W005"
    assert "save '3600 1'" in warning.msg
    assert "appendonly yes" in warning.msg
    assert 'save ""' in warning.hint
    assert "appendonly no" in warning.hint


def test_config_refused_is_a_warning_naming_config(probe):
    server = RedisServer(extra_args=("--user", "probe", "on", ">pw", "~knox:*", "-@all", "+ping")).start()
    try:
        (warning,) = probe(url=f"redis://probe:pw@127.0.0.1:{server.port}/0")
    finally:
        server.stop()
    assert warning.id == "knox_redis.W003"
    assert "CONFIG" in warning.msg
    assert "knox_redis.W003" in warning.hint


# The least-privilege ACL line of the README: login, hit, logout and logoutall through it.

ACL = (
    "~knox:* resetchannels -@all +ping +select +evalsha +script|load "
    "+hmget +hset +hdel +hgetall +pexpire +pttl +time +del +type +srem +smembers"
)
OPERATOR = "+info +scan +memory|usage +unlink"


def test_readme_acl_line_is_enough(settings, user):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"ACL SETUSER knox on >password {ACL}" in readme
    server = RedisServer(extra_args=("--user", "knox", "on", ">knoxpw", *ACL.split())).start()
    try:
        # Database 3: SELECT on every new connection. A fresh server: the scripts are loaded
        # through the ACL user (EVALSHA, NOSCRIPT, SCRIPT LOAD).
        settings.REST_KNOX_REDIS = {
            **settings.REST_KNOX_REDIS,
            "REDIS_URL": f"redis://knox:knoxpw@127.0.0.1:{server.port}/3",
        }
        from django.test import Client

        client = Client()
        tokens = [client.post("/api/login/", **basic_header("alice", "pw")).json()["token"] for _ in range(3)]
        for token in tokens:
            for _ in range(2):
                assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
        native = cache.get_client()
        assert native.stats()["hits"] == 6
        native.ping()
        assert client.post("/api/logout/", **auth_header(tokens[0])).status_code == 204
        assert client.get("/api/whoami/", **auth_header(tokens[0])).status_code == 401
        # A row deleted behind Django's back: only Redis remembers the token, and logoutall
        # finds it in the user's index (HGETALL inside the revocation script).
        AuthToken.objects.filter(token_key=tokens[2][:15])._raw_delete(AuthToken.objects.db)
        assert client.get("/api/whoami/", **auth_header(tokens[2])).status_code == 200
        assert client.post("/api/logoutall/", **auth_header(tokens[1])).status_code == 204
        for token in tokens:
            assert client.get("/api/whoami/", **auth_header(token)).status_code == 401
        stats = native.stats()
        assert stats["errors"] == 0, stats
        assert stats["revoked"] > 0, stats
        assert redis_py.Redis(port=server.port, db=3).dbsize() > 0  # it did write there
        # The deploy check can't read CONFIG through this user: a warning, not a failure.
        assert [m.id for m in check_redis_server()] == ["knox_redis.W003"]
    finally:
        server.stop()


def test_noeviction_when_memory_is_full(settings, make_token):
    """What knox_redis.W004 warns of, on a real server: once memory is full, nothing new is
    cached (each miss is a Redis error, read from the database), but revocations still go through:
    the revocation script's first write (HDEL) is not refused, and a script that has written may
    exceed maxmemory. So logouts don't answer 503 (on Redis 6.2 and 7.0)."""
    server = RedisServer(extra_args=("--maxmemory-policy", "noeviction")).start()
    try:
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": server.url, "CIRCUIT_BREAKER_COOLDOWN": 0}
        from django.test import Client

        client = Client()
        cached, uncached, other = make_token(), make_token(), make_token()
        for _ in range(2):
            assert client.get("/api/whoami/", **auth_header(cached)).status_code == 200
        redis_py.Redis(port=server.port).config_set("maxmemory", 1)  # full from now on
        native = cache.get_client()
        before = native.stats()
        for _ in range(2):
            assert client.get("/api/whoami/", **auth_header(uncached)).status_code == 200
        after = native.stats()
        assert after["hits"] == before["hits"]  # never cached
        assert after["errors"] >= before["errors"] + 2  # OOM, each time
        assert client.post("/api/logout/", **auth_header(cached)).status_code == 204
        assert client.get("/api/whoami/", **auth_header(cached)).status_code == 401
        assert client.post("/api/logoutall/", **auth_header(other)).status_code == 204
        assert client.get("/api/whoami/", **auth_header(uncached)).status_code == 401
    finally:
        server.stop()


def test_readme_acl_line_with_the_operator_commands_runs_the_management_command(settings):
    import json

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`{OPERATOR}`" in readme
    server = RedisServer(extra_args=("--user", "ops", "on", ">opspw", *ACL.split(), *OPERATOR.split())).start()
    try:
        settings.REST_KNOX_REDIS = {
            **settings.REST_KNOX_REDIS,
            "REDIS_URL": f"redis://ops:opspw@127.0.0.1:{server.port}/3",
        }
        redis_py.Redis(port=server.port, db=3).set("knox:token:x", "garbage")
        for action in ("ping", "stats", "purge"):
            out = StringIO()
            call_command("knox_redis", "--json", action, *(["--noinput"] if action == "purge" else []), stdout=out)
            assert json.loads(out.getvalue()), action
        assert redis_py.Redis(port=server.port, db=3).dbsize() == 0
    finally:
        server.stop()


def test_a_user_index_redis_refuses_to_read_fails_the_revocation(settings, user):
    """An ACL without +hgetall: logoutall can't read the user's index, so tokens only Redis
    remembers could stay cached. The revocation is refused (503), never silently partial."""
    narrow = ACL.replace(" +hgetall", "")
    server = RedisServer(extra_args=("--user", "knox", "on", ">knoxpw", *narrow.split())).start()
    try:
        settings.REST_KNOX_REDIS = {
            **settings.REST_KNOX_REDIS,
            "REDIS_URL": f"redis://knox:knoxpw@127.0.0.1:{server.port}/0",
        }
        from django.test import Client

        client = Client()
        token = client.post("/api/login/", **basic_header("alice", "pw")).json()["token"]
        assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
        assert client.post("/api/logoutall/", **auth_header(token)).status_code == 503
        assert AuthToken.objects.filter(token_key=token[:15]).exists()  # rolled back: still valid
    finally:
        server.stop()


def test_wrong_credentials_are_unreachable_not_config_refused(probe):
    server = RedisServer(extra_args=("--requirepass", "s3cret")).start()
    try:
        for url in (f"redis://:wrong@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0"):
            assert [m.id for m in probe(url=url)] == ["knox_redis.W002"], url
    finally:
        server.stop()
