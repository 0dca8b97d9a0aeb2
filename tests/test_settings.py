"""REST_KNOX_REDIS: validated at startup with clear messages, reloaded by override_settings."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from knox_redis import cache
from knox_redis.checks import check_settings
from knox_redis.settings import RedisTarget, knox_redis_settings, parse_redis_url, redis_target
from tests.conftest import auth_header
from tests.helpers import whoami


def target_for(location, backend="django_redis.cache.RedisCache", options=None) -> RedisTarget:
    caches = {"redis": {"BACKEND": backend, "LOCATION": location, "OPTIONS": options or {}}}
    with override_settings(CACHES=caches, REST_KNOX_REDIS={"CACHE_ALIAS": "redis"}):
        return redis_target()


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("redis://127.0.0.1:6380/2", RedisTarget(host="127.0.0.1", port=6380, db=2)),
        ("redis://h:6379?db=3", RedisTarget(host="h", db=3)),
        ("redis://:secret@h/1", RedisTarget(host="h", db=1, password="secret")),
        ("redis://user:p%40ss@h/0", RedisTarget(host="h", username="user", password="p@ss")),
        ("unix:///run/redis.sock?db=4", RedisTarget(unix_path="/run/redis.sock", db=4)),
        ("redis://primary:6379/0,redis://replica:6379/0", RedisTarget(host="primary")),
        (["redis://primary:6379/5", "redis://replica:6379/5"], RedisTarget(host="primary", db=5)),
        ("rediss://h:6380/0?ssl_ca_certs=/ca.pem", RedisTarget(host="h", port=6380, tls=True, tls_ca_certs="/ca.pem")),
        ("rediss://h:6380/0", RedisTarget(host="h", port=6380, tls=True)),
    ],
)
def test_location_parsing(location, expected):
    assert target_for(location) == expected


def test_django_builtin_backend_and_options_password():
    target = target_for(
        "redis://h:6379/1;redis://r:6379/1",
        backend="django.core.cache.backends.redis.RedisCache",
        options={"PASSWORD": "pw"},
    )
    assert target == RedisTarget(host="h", db=1, password="pw")


def test_tls_ca_from_django_redis_pool_kwargs():
    target = target_for("rediss://h/0", options={"CONNECTION_POOL_KWARGS": {"ssl_ca_certs": "/ca.pem"}})
    assert target == RedisTarget(host="h", tls=True, tls_ca_certs="/ca.pem")


def test_redis_url_overrides_alias():
    with override_settings(REST_KNOX_REDIS={"REDIS_URL": "redis://elsewhere:7000/9", "CACHE_ALIAS": "missing"}):
        assert redis_target() == RedisTarget(host="elsewhere", port=7000, db=9)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"CACHE_ALIAS": "nope"}, "CACHES has no such cache"),
        ({"CACHE_ALIAS": "default"}, "needs one of"),  # LocMemCache
        ({"SOCKET_TIMEOUT": 0}, "SOCKET_TIMEOUT"),
        ({"SOCKET_TIMEOUT": "fast"}, "SOCKET_TIMEOUT"),
        ({"CACHE_ENABLED": "yes"}, "CACHE_ENABLED"),
        ({"REDIS_KEY_PREFIX": "a:b"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": ""}, "REDIS_KEY_PREFIX"),
        ({"CACHE_ALIASES": "redis"}, "unknown keys: CACHE_ALIASES"),
        ({"REDIS_URL": "http://x"}, "Invalid Redis URL"),
        ({"REDIS_URL": "rediss://x?ssl_cert_reqs=none"}, "always verifies"),
        ({"REDIS_URL": "rediss://x?ssl_cert_reqs=0"}, "always verifies"),
        ({"REDIS_URL": "rediss://x?ssl_certfile=/c.pem&ssl_keyfile=/k.pem"}, "client certificates"),
        ({"MAX_IDLE_CONNECTIONS": 2.5}, "MAX_IDLE_CONNECTIONS"),
        ({"BUSY_POLL_US": -1}, "BUSY_POLL_US"),
        ({"BUSY_POLL_US": 2.5}, "BUSY_POLL_US"),
        ({"BUSY_POLL_US": True}, "BUSY_POLL_US"),
        ({"BUSY_POLL_US": 10_001}, "BUSY_POLL_US"),
        ({"REDIS_URL": "redis://x/9223372036854775808"}, "can't use"),
    ],
)
def test_invalid_settings_fail_the_system_check(value, message):
    with override_settings(REST_KNOX_REDIS=value):
        errors = check_settings()
        assert len(errors) == 1, errors
        assert message in errors[0].msg, errors
        assert errors[0].id == "knox_redis.E001"
        with pytest.raises(SystemCheckError):
            call_command("check")
        with pytest.raises(ImproperlyConfigured):
            knox_redis_settings.reload()
            redis_target()


def test_valid_settings_pass_the_check():
    assert check_settings() == []


def test_override_settings_reloads_values_and_client(settings):
    first = cache.get_client()
    assert first.key_prefix == "knox"
    with override_settings(REST_KNOX_REDIS={**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "other"}):
        assert knox_redis_settings.REDIS_KEY_PREFIX == "other"
        assert cache.get_client().key_prefix == "other"
    assert cache.get_client().key_prefix == "knox"


def test_key_prefix_is_used(client, make_token, settings, redis_conn):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_KEY_PREFIX": "myapp"}
    token = make_token()
    client.get("/api/whoami/", **auth_header(token))
    keys = {k.decode() for k in redis_conn.keys("*")}
    assert f"myapp:token:{token[:15]}" in keys
    assert any(k.startswith("myapp:user:") and k.endswith(":ix") for k in keys)


def test_parse_url_rejects_garbage():
    with pytest.raises(ImproperlyConfigured):
        parse_redis_url("not a url", options={})


def test_bad_db_is_caught_by_check_and_never_a_500(client, make_token, settings):
    """A database number beyond i64 fails `manage.py check`; a process started without
    running checks (gunicorn doesn't) still never answers 500: lookups fail open, and
    revocations fail closed with a 503."""
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_URL": "redis://127.0.0.1:6379/9223372036854775808"}
    errors = check_settings()
    assert [e.id for e in errors] == ["knox_redis.E001"]
    token = make_token()
    client.raise_request_exception = False
    assert whoami(client, token) == 200  # lookups fail open
    assert client.post("/api/logout/", **auth_header(token)).status_code == 503  # revocations fail closed


def test_a_change_while_the_first_read_loads_is_not_lost(settings, monkeypatch):
    """A setting_changed (another thread's override) that lands while a first read is loading
    the settings: that read loads again instead of publishing what it loaded before."""
    from knox_redis import settings as settings_module
    from knox_redis.settings import knox_redis_settings

    knox_redis_settings.reload()
    real_load = settings_module.load

    def load_racing_a_change():
        values = real_load()
        monkeypatch.setattr(settings_module, "load", real_load)
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "MAX_CACHE_TTL": 7}
        return values

    monkeypatch.setattr(settings_module, "load", load_racing_a_change)
    assert knox_redis_settings.MAX_CACHE_TTL == 7
    assert knox_redis_settings.MAX_CACHE_TTL == 7


# Sentinel: a django-redis Sentinel cache as it is, or REST_KNOX_REDIS' own SENTINELS.
# (tests/test_sentinel.py runs both against real sentinels.)

SENTINELS = [("10.0.0.1", 26379), ("10.0.0.2", "26380")]


def test_a_django_redis_sentinel_cache():
    options = {
        "CLIENT_CLASS": "django_redis.client.SentinelClient",
        "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
        "SENTINELS": SENTINELS,
        "SENTINEL_KWARGS": {"username": "watcher", "password": "sentinel-pw", "socket_timeout": 5},
        "PASSWORD": "data-pw",
    }
    target = target_for("redis://mymaster/2", options=options)
    assert target == RedisTarget(
        db=2,
        password="data-pw",
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)),
        sentinel_service_name="mymaster",
        sentinel_username="watcher",
        sentinel_password="sentinel-pw",
    )
    assert target.where == "the primary of Sentinel service 'mymaster'"
    assert "pw" not in repr(target)


def test_a_django_redis_sentinel_cache_with_tls():
    options = {"SENTINELS": SENTINELS, "SENTINEL_KWARGS": {"ssl": True, "ssl_ca_certs": "/sentinels.pem"}}
    target = target_for("rediss://:pw@mymaster/0?ssl_ca_certs=/data.pem", options=options)
    assert (target.tls, target.tls_ca_certs, target.password) == (True, "/data.pem", "pw")
    assert (target.sentinel_tls, target.sentinel_tls_ca_certs) == (True, "/sentinels.pem")


def test_explicit_sentinel_settings():
    explicit = {"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "mymaster", "CACHE_ALIAS": "missing"}
    with override_settings(REST_KNOX_REDIS=explicit):
        assert redis_target() == RedisTarget(
            sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), sentinel_service_name="mymaster"
        )
        assert check_settings() == []
    with_url = {
        **explicit,
        "REDIS_URL": "redis://knox:pw@mymaster/3",
        "SENTINEL_KWARGS": {"password": "sentinel-pw"},
    }
    with override_settings(REST_KNOX_REDIS=with_url):
        target = redis_target()
        assert (target.db, target.username, target.password, target.host) == (3, "knox", "pw", None)
        assert target.sentinel_password == "sentinel-pw"
        assert check_settings() == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"SENTINELS": "10.0.0.1:26379", "SENTINEL_SERVICE_NAME": "m"}, "list of (host, port) pairs"),
        ({"SENTINELS": [], "SENTINEL_SERVICE_NAME": "m"}, "list of (host, port) pairs"),
        ({"SENTINELS": [("h", 26379, 1)], "SENTINEL_SERVICE_NAME": "m"}, "list of (host, port) pairs"),
        ({"SENTINELS": [("h", 0)], "SENTINEL_SERVICE_NAME": "m"}, "is not a TCP port"),
        ({"SENTINELS": [("h", True)], "SENTINEL_SERVICE_NAME": "m"}, "list of (host, port) pairs"),
        ({"SENTINELS": SENTINELS}, "needs SENTINEL_SERVICE_NAME"),
        ({"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "my master"}, "needs SENTINEL_SERVICE_NAME"),
        ({"SENTINEL_SERVICE_NAME": "m"}, "without SENTINELS"),
        ({"SENTINEL_KWARGS": {"password": "x"}}, "without SENTINELS"),
        ({"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "m", "SENTINEL_KWARGS": "pw"}, "must be a dict"),
        (
            {
                "SENTINELS": SENTINELS,
                "SENTINEL_SERVICE_NAME": "m",
                "SENTINEL_KWARGS": {"ssl": True, "ssl_cert_reqs": "none"},
            },
            "always verifies the sentinels",
        ),
        ({"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "m", "REDIS_URL": "redis://other/0"}, "no host but"),
        ({"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "m", "REDIS_URL": "redis://m:6380/0"}, "no port"),
        ({"SENTINELS": SENTINELS, "SENTINEL_SERVICE_NAME": "m", "REDIS_URL": "unix:///r.sock"}, "no host but"),
    ],
)
def test_invalid_sentinel_settings_fail_the_system_check(value, message):
    with override_settings(REST_KNOX_REDIS=value):
        errors = check_settings()
        assert [e.id for e in errors] == ["knox_redis.E001"], errors
        assert message in errors[0].msg, errors


@pytest.mark.parametrize(
    ("location", "options", "message"),
    [
        ("redis://mymaster/0", {"SENTINELS": "s1:26379"}, "['SENTINELS'] must be a non-empty list"),
        ("unix:///run/redis.sock", {"SENTINELS": SENTINELS}, "must be redis://service_name/db"),
        ("redis://mymaster/0", {"SENTINELS": SENTINELS, "SENTINEL_KWARGS": {"ssl_certfile": "/c"}}, "certificates"),
    ],
)
def test_invalid_django_redis_sentinel_caches_fail_the_system_check(location, options, message):
    caches = {"redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location, "OPTIONS": options}}
    with override_settings(CACHES=caches, REST_KNOX_REDIS={"CACHE_ALIAS": "redis"}):
        errors = check_settings()
        assert [e.id for e in errors] == ["knox_redis.E001"], errors
        assert message in errors[0].msg, errors
