"""knox_redis's views keep knox's responses and revoke in Redis before the database."""

from __future__ import annotations

import pytest
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header, basic_header


def script_calls(redis_conn) -> int:
    stats = redis_conn.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_login_returns_knox_response(client, user):
    response = client.post("/api/login/", **basic_header("alice", "pw"))
    assert response.status_code == 200
    assert set(response.json()) == {"expiry", "token"}
    assert AuthToken.objects.filter(user=user).count() == 1


def test_logout_revokes_cached_token(client, make_token, redis_conn):
    token = make_token()
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 200
    assert cache.get_client().stats()["hits"] == 1
    response = client.post("/api/logout/", **auth_header(token))
    assert response.status_code == 204
    assert response.content == b""
    assert client.get("/api/whoami/", **auth_header(token)).status_code == 401
    fields = redis_conn.hkeys(f"knox:token:{token[:15]}")
    assert not [f for f in fields if f.startswith(b"r:")], fields


def test_logout_keeps_other_tokens(client, make_token):
    a, b = make_token(), make_token()
    for t in (a, b):
        client.get("/api/whoami/", **auth_header(t))
    assert client.post("/api/logout/", **auth_header(a)).status_code == 204
    assert client.get("/api/whoami/", **auth_header(a)).status_code == 401
    assert client.get("/api/whoami/", **auth_header(b)).status_code == 200


@pytest.mark.parametrize("count", [1, 40])
def test_logoutall_costs_constant_round_trips(client, make_token, redis_conn, count):
    tokens = [make_token() for _ in range(count)]
    for t in tokens[: count // 2 + 1]:  # about half cached, the rest not
        client.get("/api/whoami/", **auth_header(t))
    before = script_calls(redis_conn)
    response = client.post("/api/logoutall/", **auth_header(tokens[0]))
    assert response.status_code == 204
    # lookup for the request's own token, one revoke, one revoke after commit.
    assert script_calls(redis_conn) - before == 3
    assert not AuthToken.objects.exists()
    for t in tokens:
        assert client.get("/api/whoami/", **auth_header(t)).status_code == 401


def test_logoutall_stops_a_fill_in_flight_for_an_uncached_token(client, make_token, user):
    caller, other = make_token(), make_token()
    other_row = AuthToken.objects.get(token_key=other[:15])
    # A request for `other` missed, was authenticated by the database, took a generation and
    # re-read its row; its fill is still to come.
    found = cache.lookup(other[:15], other_row.digest, create=True)
    assert found is not None
    assert found.record is None
    assert client.post("/api/logoutall/", **auth_header(caller)).status_code == 204
    assert cache._fill(other_row, found.generation) is False
    assert client.get("/api/whoami/", **auth_header(other)).status_code == 401


def test_logoutall_only_touches_the_callers_tokens(client, make_token, django_user_model):
    bob = django_user_model.objects.create_user(username="bob", password="pw")
    mine, bobs = make_token(), make_token(bob)
    for t in (mine, bobs):
        client.get("/api/whoami/", **auth_header(t))
    assert client.post("/api/logoutall/", **auth_header(mine)).status_code == 204
    assert client.get("/api/whoami/", **auth_header(bobs)).status_code == 200


def test_logoutall_beyond_one_batch(client, make_token, redis_conn, monkeypatch):
    monkeypatch.setattr(cache, "REVOKE_BATCH", 3)
    tokens = [make_token() for _ in range(8)]
    for t in tokens:
        client.get("/api/whoami/", **auth_header(t))
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 204
    for t in tokens:
        assert client.get("/api/whoami/", **auth_header(t)).status_code == 401


def test_logoutall_round_trips_per_batch(client, make_token, redis_conn, monkeypatch):
    """Beyond REVOKE_BATCH tokens, logoutall sends one script per batch before the delete and
    again after the commit."""
    monkeypatch.setattr(cache, "REVOKE_BATCH", 3)
    tokens = [make_token() for _ in range(8)]
    client.get("/api/whoami/", **auth_header(tokens[0]))
    client.get("/api/whoami/", **auth_header(tokens[0]))  # cached: the logout request is a hit
    cache.get_client().revoke([], users=[999999])  # load the script: no NOSCRIPT retry below
    before = script_calls(redis_conn)
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 204
    # the request's lookup, then 3 batches of 3 before the delete and 3 after commit
    assert script_calls(redis_conn) - before == 1 + 3 + 3, script_calls(redis_conn) - before
