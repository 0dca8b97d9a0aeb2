"""Holes and README mismatches found in the third review, each pinned by its test."""

from __future__ import annotations

import pytest
from django.db import connection, connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header
from tests.helpers import authenticate
from tests.test_routers import PrimaryReplicaRouter
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


# README 156-159: "the fill waits for on_commit on the token model's database". store()
# registers on in_transaction[0], the *read* database, when both are in a transaction: if
# the replica's block commits first, the refill reads the write database inside its still
# open transaction and caches what it then rolls back.
class Boom(Exception):
    pass


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_replica_commit_first_does_not_cache_uncommitted_rows(django_user_model):
    alice = django_user_model.objects.create_user(username="alice")
    bob = django_user_model.objects.create_user(username="bob")
    _row, token = AuthToken.objects.create(user=alice)
    with override_settings(DATABASE_ROUTERS=[PrimaryReplicaRouter()]):
        seen = []
        real_fill = cache._fill

        def spy(values, *a, **kw):
            seen.append(connections["default"].in_atomic_block)
            return real_fill(values, *a, **kw)

        cache._fill = spy
        try:
            with pytest.raises(Boom), transaction.atomic(using="default"):
                with transaction.atomic(using="replica"):
                    assert authenticate(token)[0] == alice  # knox reads the replica
                    # uncommitted on the write database, rolled back below
                    AuthToken.objects.using("default").filter(token_key=token[:15]).update(user=bob)
                raise Boom
        finally:
            cache._fill = real_fill
        assert AuthToken.objects.using("default").get().user_id == alice.pk
        user, _ = authenticate(token)
    assert user == alice, f"rolled-back owner {user} cached (fill saw default in_atomic_block={seen})"
