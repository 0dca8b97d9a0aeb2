"""Holes and README mismatches found in the third review, each pinned by its test."""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext

from knox_redis import cache
from tests.conftest import auth_header
from tests.test_views import script_calls


def sql_of(fn):
    with CaptureQueriesContext(connection) as ctx:
        fn()
    return [q["sql"] for q in ctx.captured_queries]


# logoutall: one script per REVOKE_BATCH tokens before the delete, and again after commit.
def test_logoutall_round_trips_per_batch(client, make_token, redis_conn, monkeypatch):
    monkeypatch.setattr(cache, "REVOKE_BATCH", 3)
    tokens = [make_token() for _ in range(8)]
    client.get("/api/whoami/", **auth_header(tokens[0]))
    client.get("/api/whoami/", **auth_header(tokens[0]))  # cached: the logout request is a hit
    cache.get_client().revoke([], users=[999999])  # load the script: no NOSCRIPT retry below
    before = script_calls(redis_conn)
    assert client.post("/api/logoutall/", **auth_header(tokens[0])).status_code == 204
    # the request's lookup, then 3 batches of 3 before the delete and 3 after commit
    assert script_calls(redis_conn) - before == 1 + 3 + 3, script_calls(redis_conn) - before
