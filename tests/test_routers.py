"""Projects that read from a replica: the cache is only ever filled from the write database."""

from __future__ import annotations

import pytest
from django.db import connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import forget_in_redis
from tests.helpers import accepted, authenticate


class PrimaryReplicaRouter:
    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        return "default"

    def allow_relation(self, *args, **hints):
        return True


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_rows_read_from_a_replica_are_reread_from_the_primary_before_caching(django_user_model):
    user = django_user_model.objects.create_user(username="alice")
    row, token = AuthToken.objects.create(user=user)
    forget_in_redis(row)  # the login's write-through: this test is about the miss path
    with override_settings(DATABASE_ROUTERS=[PrimaryReplicaRouter()]):
        with CaptureQueriesContext(connections["default"]) as primary:
            assert accepted(token)  # knox reads the replica; the fill re-reads the primary
        assert any("knox_authtoken" in q["sql"] and "LIMIT 1" in q["sql"] for q in primary.captured_queries)
        with CaptureQueriesContext(connections["default"]) as primary:
            assert accepted(token)  # a hit: nothing on the primary
        assert primary.captured_queries == []


class Boom(Exception):
    pass


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_replica_commit_first_does_not_cache_uncommitted_rows(django_user_model):
    """The fill waits for the commit on the token model's write database, not on the read
    database's: when the replica's block commits first, the write database's transaction is
    still open, and what the refill would read there is rolled back after."""
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
