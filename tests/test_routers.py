"""Projects that read from a replica: the cache is only ever filled from the write database."""

from __future__ import annotations

import pytest
from django.db import connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken

from tests.conftest import forget_in_redis
from tests.helpers import accepted


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
