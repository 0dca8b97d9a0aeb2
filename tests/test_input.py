"""Any Authorization header or token gets a 401 (or falls through to the next class), never a
500, including where plain knox gives one; and a token nobody issued writes nothing to Redis."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from knox.models import AuthToken
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header
from tests.helpers import accepted, whoami

factory = APIRequestFactory()


def run(header):
    request = factory.get("/", HTTP_AUTHORIZATION=header)
    try:
        return TokenAuthentication().authenticate(request)
    except AuthenticationFailed:
        return "401"


def latin1(raw: bytes) -> str:
    """What a WSGI server hands Django for raw header bytes."""
    return raw.decode("latin-1")


@pytest.mark.parametrize(
    "header",
    [
        latin1(b"Token \xff\xfe\xfd"),  # not UTF-8: plain knox answers 500
        latin1(b"Token \xc3\x28"),
        "Token abc\x00def",  # NUL: PostgreSQL refuses it in a query
        "Token \x01\x02\x03",
        "Token " + "a" * 100_000,
        "Token  " + "a" * 64,
        "Token",
        "Token a b",
        "token " + "f" * 64,
        "Token é" + "0" * 63,
        "Token \u2028" + "0" * 63,
    ],
)
def test_odd_headers_are_401(transactional_db, header):
    assert run(header) == "401"


@pytest.mark.parametrize("header", ["", "Basic dXNlcjpwdw==", "Bearer x", latin1(b"\xff\xff")])
def test_other_schemes_fall_through(transactional_db, header):
    assert run(header) is None


def test_non_latin1_str_header_is_401(transactional_db):
    assert run("Token ☃" + "0" * 63) == "401"


def test_huge_token_sharing_a_real_token_key_is_401(make_token):
    token = make_token()
    assert run(f"Token {token}") != "401"
    assert run(f"Token {token}{'0' * 100_000}") == "401"
    assert run(f"Token {token}\x00") == "401"


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_header_bytes_never_error(transactional_db, raw):
    result = run(latin1(b"Token " + raw))
    assert result is None or result == "401"


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=120))
def test_fuzzed_unicode_tokens_never_error(transactional_db, text):
    result = run("Token " + text)
    assert result is None or result == "401"


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.binary(min_size=1, max_size=80))
def test_fuzzed_tails_on_a_real_token_key_never_error(make_token, suffix):
    token = make_token() if not AuthToken.objects.exists() else None
    key = AuthToken.objects.first().token_key
    result = run(latin1(key.encode() + suffix))
    assert result is None or result == "401" or token is not None


def test_anonymous_traffic_cannot_fill_redis_and_block_revocation(client, make_token, redis_conn):
    """Made-up tokens leave nothing in Redis, so a flood of them can't fill a Redis that
    refuses writes when full (noeviction) and with it block logouts."""
    token = make_token()
    used = int(redis_conn.info("memory")["used_memory"])
    old = redis_conn.config_get("maxmemory*")
    redis_conn.config_set("maxmemory", used + 400_000)
    redis_conn.config_set("maxmemory-policy", "noeviction")
    try:
        for _ in range(3000):
            assert not accepted(secrets.token_hex(32))
        assert redis_conn.dbsize() == 0
        assert whoami(client, token) == 200
        assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    finally:
        redis_conn.config_set("maxmemory", old["maxmemory"])
        redis_conn.config_set("maxmemory-policy", old["maxmemory-policy"])


@pytest.mark.parametrize(
    "header", [None, "", "Basic dXNlcjpwdw==", "Token", "Token a b", "token " + "f" * 64, "Token " + "f" * 64]
)
def test_the_header_is_parsed_as_knox_parses_it_without_building_request_headers(transactional_db, header):
    """knox's authenticate goes through DRF's get_authorization_header, which builds
    request.headers (a dict of every header); ours reads request.META, with the same outcome."""
    from knox.auth import TokenAuthentication as KnoxAuthentication

    def outcome(cls):
        request = factory.get("/", **({} if header is None else {"HTTP_AUTHORIZATION": header}))
        try:
            result = cls().authenticate(request)
        except AuthenticationFailed as exc:
            result = str(exc.detail)
        return result, "headers" in request.__dict__

    assert outcome(TokenAuthentication) == (outcome(KnoxAuthentication)[0], False)
