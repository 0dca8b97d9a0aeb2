"""Review of e3a00b6 (Redis Cluster): `manage.py knox_redis purge` (and `stats`) send SCAN and
UNLINK through `command`, which on a Cluster goes to one primary (`Cluster::any`): SCAN sees
one node's keys only, and one UNLINK of a SCAN batch names keys of many slots (CROSSSLOT).
So purge either fails or leaves the other masters' records in place."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from knox_redis import cache
from tests.helpers import accepted

pytestmark = pytest.mark.cluster


@pytest.fixture
def on_cluster(cluster, settings):
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "REDIS_CLUSTER_NODES": cluster.seed_urls[:2]}
    return cluster


def test_purge_removes_every_key_of_the_prefix_on_every_master(on_cluster, make_token, user):
    tokens = [make_token() for _ in range(12)]
    for token in tokens:
        assert accepted(token)
    error = None
    try:
        call_command("knox_redis", "purge", "--noinput")
    except Exception as exc:  # what the operator sees
        error = exc
    left = {}
    for master in on_cluster.masters():
        with master.client() as conn:
            left[master.address] = len(list(conn.scan_iter(match=cache.key_pattern())))
    assert error is None, f"purge raised {error!r}"
    assert not any(left.values()), f"keys left per master: {left}"
