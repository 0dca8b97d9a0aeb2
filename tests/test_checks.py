"""System checks for settings that can't work."""

from __future__ import annotations

import json
import re
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

from knox_redis import cache, checks as knox_redis_checks
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


# `check --deploy` only: the Redis the native client uses, asked whether it lets knox_redis run
# every command it sends (knox_redis.E004), and how it is configured (CONFIG GET).


def test_redis_checks_run_only_with_deploy():
    assert check_redis_server not in registry.get_checks(include_deployment_checks=False)
    assert check_redis_server in registry.get_checks(include_deployment_checks=True)


@pytest.fixture
def servers():
    """start(*args): a redis-server with these arguments, stopped after the test."""
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        started.append(RedisServer(extra_args=args).start())
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def probe(settings, servers):
    """Point knox_redis at a URL (or at a new redis-server with these arguments), run the deploy check."""

    def probe(*args: str, url: str | None = None) -> list[checks.CheckMessage]:
        if url is None:
            url = servers(*args).url
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": url}
        started = time.monotonic()
        messages = check_redis_server()
        assert time.monotonic() - started < 2
        return messages

    return probe


def test_the_test_redis_passes(probe, redis_server, redis_conn):
    assert probe(url=redis_server.url) == []  # no maxmemory, no persistence, every command allowed
    assert redis_conn.keys("*") == []  # the probe script wrote nothing that stayed


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


def test_persistence_passes(probe):
    """A Redis that persists its data is fine: a record restored from an older snapshot was
    written to another incarnation of Redis, and reads as a miss (tests/test_restarts.py)."""
    assert probe("--save", "3600", "1", "--appendonly", "yes") == []


# The README's least-privilege ACL line, read from README.md so that the two can't drift.

README = Path(__file__).resolve().parent.parent / "README.md"
SOURCE = README.parent


def readme_acl() -> list[str]:
    """The rules of the README's line, after `ACL SETUSER knox on >password`."""
    (line,) = re.findall(r"^ACL SETUSER knox on >password (.+)$", README.read_text(), re.MULTILINE)
    return line.split()


def acl_user(*rules: str) -> tuple[str, ...]:
    """redis-server arguments for user knox (password knoxpw) with these rules."""
    return ("--user", "knox", "on", ">knoxpw", *rules)


def without(rule: str) -> list[str]:
    rules = readme_acl()
    assert rule in rules
    return [r for r in rules if r != rule]


def knox_url(server: RedisServer, db: int = 0) -> str:
    return f"redis://knox:knoxpw@127.0.0.1:{server.port}/{db}"


def replica_of(servers, primary: RedisServer) -> RedisServer:
    replica = servers("--replicaof", "127.0.0.1", str(primary.port))
    deadline = time.monotonic() + 10
    while redis_py.Redis(port=primary.port).info("replication")["connected_slaves"] < 1:
        assert time.monotonic() < deadline, "the replica did not connect"
        time.sleep(0.02)
    return replica


def test_config_refused_is_a_warning_naming_config(probe, servers):
    server = servers(*acl_user(*readme_acl()))
    (warning,) = probe(url=knox_url(server))
    assert warning.id == "knox_redis.W003"
    assert "CONFIG" in warning.msg
    assert "knox_redis.W003" in warning.hint


# Each command a user may not run, in turn: one knox_redis.E004 naming it, with the ACL fix.
# (SELECT: each connection sends it for a database other than 0, so nothing else can be asked.)
@pytest.mark.parametrize(
    ("rule", "command"),
    [
        ("+evalsha", "EVALSHA"),
        ("+script|load", "SCRIPT LOAD"),
        ("+info", "INFO"),
        ("+ping", "PING"),
        ("+hgetall", "HGETALL"),  # inside the scripts
        ("+time", "TIME"),
        ("+hset", "HSET"),
        ("+select", "SELECT"),
    ],
)
def test_a_refused_command_is_an_error_naming_it(probe, servers, rule, command):
    server = servers(*acl_user(*without(rule)))
    messages = probe(url=knox_url(server, db=3))
    errors = [m for m in messages if m.id == "knox_redis.E004"]
    assert len(errors) == 1, messages
    (error,) = errors
    assert isinstance(error, checks.Error)
    assert f"refuses {command} to user 'knox'" in error.msg
    assert f"ACL SETUSER knox {rule}" in error.hint
    # SELECT and INFO: sent on each new connection, so nothing else answers.
    expected = [] if command in ("SELECT", "INFO") else ["knox_redis.W003"]
    assert [m.id for m in messages if m is not error] == expected
    with pytest.raises(SystemCheckError, match=r"knox_redis\.E004"):
        call_command("check", deploy=True, stdout=StringIO(), stderr=StringIO())


# Refusals as redis-server 6.2 and 7.0 word them (read off both), at the top level and inside a
# script's redis.pcall; anything else means the command ran.
@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("unexpected redis reply: NoPerm: this user has no permissions to run the 'info' command", "command"),
        ("NoPerm: this user has no permissions to run the 'info' command or its subcommand", "command"),
        ("NoPerm: this user has no permissions to run the 'client|tracking' command", "command"),
        ("NOPERM this user has no permissions to access one of the keys used as arguments", "key"),
        ("ERR The user executing the script can't run this command or subcommand", "command"),
        ("@user_script: 3: The user executing the script can't run this command or subcommand", "command"),
        ("ERR The user executing the script can't access at least one of the keys mentioned", "key"),
        ("ResponseError: unknown command 'WAIT', with args beginning with: '0' '0' ", "unknown"),
        ("ResponseError: unknown command `WAIT`, with args beginning with: `0`, `0`, ", "unknown"),
        ("ERR Unknown Redis command called from script", "unknown"),
        ("@user_script: 3: Unknown Redis command called from Lua script", "unknown"),
        ("ERR unknown subcommand 'TRACKING'. Try CLIENT HELP.", "unknown"),
        ("ERR Unknown subcommand or wrong number of arguments for 'TRACKING'. Try CLIENT HELP.", "unknown"),
        ("NoScript: No matching script. Please use EVAL.", None),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", None),
        ("OOM command not allowed when used memory > 'maxmemory'.", None),
        ("ERR WAIT cannot be used with replica instances.", None),
    ],
)
def test_refusals_are_told_from_other_errors(error, kind):
    assert knox_redis_checks._refusal(error) == kind


def test_keys_outside_the_acl_pattern_are_an_error(probe, servers, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "myapp"}
    server = servers(*acl_user(*readme_acl()))  # ~knox:*, the default prefix's keys
    (error, _) = probe(url=knox_url(server))
    assert error.id == "knox_redis.E004"
    assert "use the keys knox_redis's scripts use, under 'myapp:*' (EVALSHA refused)" in error.msg
    assert "ACL SETUSER knox ~myapp:*" in error.hint


def test_a_renamed_command_is_an_error(probe):
    (error,) = probe("--rename-command", "EVALSHA", "")
    assert error.id == "knox_redis.E004"
    assert "does not know EVALSHA" in error.msg
    assert "rename-command" in error.hint


def test_wait_is_probed(probe, servers):
    """A revocation on a primary with replicas online waits for one of them (WAIT 1): a user
    without WAIT is an error, with or without a replica now (one may connect later)."""
    server = servers(*acl_user(*without("+wait")))
    (error, warning) = probe(url=knox_url(server))
    assert (error.id, warning.id) == ("knox_redis.E004", "knox_redis.W003")
    assert "refuses WAIT to user 'knox'" in error.msg
    assert "ACL SETUSER knox +wait" in error.hint
    server = servers(*acl_user(*readme_acl()))
    replica_of(servers, server)
    assert [m.id for m in probe(url=knox_url(server))] == ["knox_redis.W003"]


@pytest.mark.parametrize(("rule", "command"), [("+client|tracking", "CLIENT TRACKING"), ("+publish", "PUBLISH")])
def test_the_local_caches_commands_are_probed_only_with_it(probe, servers, settings, rule, command):
    server = servers(*acl_user(*without(rule)))
    assert [m.id for m in probe(url=knox_url(server))] == ["knox_redis.W003"]
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 1000}
    (error, _) = probe(url=knox_url(server))
    assert error.id == "knox_redis.E004"
    assert f"refuses {command}" in error.msg
    assert f"ACL SETUSER knox {rule}" in error.hint
    assert probe() == []  # every command allowed


def test_a_refused_heartbeat_channel_names_the_channel_rule(probe, servers, settings):
    server = servers(*acl_user(*without("&knox:*")))  # +publish and +subscribe kept
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 1000}
    errors = [m for m in probe(url=knox_url(server)) if m.id == "knox_redis.E004"]
    assert errors
    assert all("&knox:*" in e.hint and "+publish" not in e.hint for e in errors), [e.hint for e in errors]


def test_a_user_without_the_invalidation_channel_is_an_error(probe, servers, settings):
    server = servers(*acl_user(*without("&__redis__:invalidate")))
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 1000}
    (error, _) = probe(url=knox_url(server))
    assert error.id == "knox_redis.E004"
    assert "&__redis__:invalidate" in error.hint


def test_the_readme_user_runs_the_local_cache(servers, settings):
    """The listener needs CLIENT ID and TRACKING, SUBSCRIBE and PUBLISH, and two channels."""
    from knox_redis import cache

    server = servers(*acl_user(*readme_acl()))
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": knox_url(server), "LOCAL_CACHE_SIZE": 100}
    deadline = time.monotonic() + 5
    while not cache.get_client().local_cache_live:
        assert time.monotonic() < deadline, "the tracking listener never went live"
        time.sleep(0.01)


def test_every_command_knox_redis_sends_is_in_the_readme_acl_line():
    """Every Redis command in src/ and python/ (scripts included: a script runs its commands
    with its caller's permissions) is allowed by the README's line, and nothing else is."""
    lua = set()
    for path in (SOURCE / "src" / "lua").glob("*.lua"):
        lua |= set(re.findall(r"(?:redis\.p?call|tolerant)\(\s*'([A-Z]+)'", path.read_text()))
    # The check's probe script calls exactly what the product's scripts call.
    assert set(re.findall(r"try\('([A-Z]+)'", knox_redis_checks.PROBE_SCRIPT)) == lua
    sent = {command.lower() for command in lua}
    rust = "".join(p.read_text() for p in (SOURCE / "src").glob("*.rs") if p.name != "script_tests.rs")
    sent |= {command.lower() for command in re.findall(r'cmd\("([A-Z]+)"\)(?!\s*\.arg\("[A-Z]+"\))', rust)}
    # Container commands with their subcommand (CLIENT ID, CLIENT TRACKING: LOCAL_CACHE_SIZE).
    sent |= {f"{name}|{sub}".lower() for name, sub in re.findall(r'cmd\("([A-Z]+)"\)\s*\.arg\("([A-Z]+)"\)', rust)}
    sent -= {"auth"}  # the tracking listener's own handshake: AUTH needs no rule
    assert "Script::new" in rust
    sent |= {"evalsha", "script|load"}  # redis::Script: EVALSHA, SCRIPT LOAD after NOSCRIPT (never EVAL)
    sent |= {"select"}  # on each new connection, for a database other than 0 (AUTH needs no rule)
    # Sent to the sentinels, not to Redis: their user's rule (README, Running on Sentinel).
    assert "sentinel" in sent
    sent -= {"sentinel"}
    containers = {"CLIENT", "CONFIG", "MEMORY", "SCRIPT", "OBJECT", "FUNCTION", "COMMAND", "ACL"}
    for path in (SOURCE / "python" / "knox_redis").rglob("*.py"):
        text = path.read_text()
        for name, sub in re.findall(r'redis_command\(\s*"([A-Z]+)"(?:,\s*"([A-Z]+)")?', text):
            sent.add(f"{name}|{sub}".lower() if name in containers else name.lower())
        sent |= set(re.findall(r'\bask\(\s*"([a-z|]+)"', text))  # the deploy check's probes
    sent |= {needed.acl for needed in knox_redis_checks.CONDITIONAL_COMMANDS}
    # Left out on purpose: CONFIG GET (it reads secrets such as requirepass; W003 and `stats` do
    # without it).
    left_out = {"config|get"}
    assert left_out <= sent
    rules = readme_acl()
    allowed = {rule[1:] for rule in rules if rule.startswith("+")}
    assert allowed == sent - left_out, (sorted(allowed - sent), sorted(sent - left_out - allowed))
    # Keys under the prefix; channels: LOCAL_CACHE_SIZE's heartbeat (under the prefix) and
    # CLIENT TRACKING's invalidations.
    assert [rule for rule in rules if not rule.startswith("+")] == [
        "~knox:*",
        "resetchannels",
        "&knox:*",
        "&__redis__:invalidate",
        "-@all",
    ]


def test_readme_acl_line_is_enough(settings, user, servers):
    """A user made of exactly the README's line: every deploy check passes (CONFIG GET is
    refused: W003), and login, hits, logout, logoutall, stats and purge work through it."""
    server = servers(*acl_user(*readme_acl()))
    replica_of(servers, server)  # so that the check probes WAIT too
    # Database 3: SELECT on every new connection. A fresh server: the scripts are loaded
    # through the ACL user (EVALSHA, NOSCRIPT, SCRIPT LOAD).
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": knox_url(server, db=3)}
    out, err = StringIO(), StringIO()
    call_command("check", deploy=True, stdout=out, stderr=err)  # no error: it would raise
    assert set(re.findall(r"knox_redis\.[EW]\d+", out.getvalue() + err.getvalue())) == {"knox_redis.W003"}
    cache.reset_client()  # counters from zero: the check's NOSCRIPT and CONFIG GET count as errors
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
    db3 = redis_py.Redis(port=server.port, db=3)
    assert db3.dbsize() > 0  # it did write there
    db3.set("knox:token:x", "garbage")
    for action in ("ping", "stats", "purge"):
        out = StringIO()
        call_command("knox_redis", "--json", action, *(["--noinput"] if action == "purge" else []), stdout=out)
        assert json.loads(out.getvalue()), action
    assert db3.dbsize() == 0


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


def test_a_user_index_redis_refuses_to_read_fails_the_revocation(settings, user, servers):
    """An ACL without +hgetall: logoutall can't read the user's index, so tokens only Redis
    remembers could stay cached. The revocation is refused (503), never silently partial; the
    deploy check says so beforehand."""
    server = servers(*acl_user(*without("+hgetall")))
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": knox_url(server)}
    from django.test import Client

    client = Client()
    token = client.post("/api/login/", **basic_header("alice", "pw")).json()["token"]
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert client.post("/api/logoutall/", **auth_header(token)).status_code == 503
    assert AuthToken.objects.filter(token_key=token[:15]).exists()  # rolled back: still valid
    assert [m.id for m in check_redis_server()] == ["knox_redis.E004", "knox_redis.W003"]


def test_wrong_credentials_are_unreachable_not_config_refused(probe):
    server = RedisServer(extra_args=("--requirepass", "s3cret")).start()
    try:
        for url in (f"redis://:wrong@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0"):
            assert [m.id for m in probe(url=url)] == ["knox_redis.W002"], url
    finally:
        server.stop()
