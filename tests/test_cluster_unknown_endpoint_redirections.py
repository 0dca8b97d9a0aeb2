"""Review of e3a00b6 (Redis Cluster): `cluster-preferred-endpoint-type unknown-endpoint` (Redis
7, for nodes behind a load balancer) makes CLUSTER SLOTS name each node with a NULL endpoint
("connect to the same endpoint the CLUSTER SLOTS was sent to, with the port returned") and
redirections read `MOVED 3999 :6381` (same host, *that port*).

- SlotMap::parse rejects a NULL endpoint as malformed: no slot map is ever learned, every
  lookup falls back to the database, and every logout answers 503.
- Redirect::of drops the port of `MOVED/ASK slot :port` (`to` = ""): an ASK is re-sent to the
  node that answered it (the source, which answers ASK again), a MOVED to the stale map."""

from __future__ import annotations

import pytest

from tests.conftest import auth_header, basic_header
from tests.helpers import accepted

pytestmark = pytest.mark.cluster


@pytest.fixture
def unknown_endpoint(cluster, settings):
    import redis as redis_py

    for node in cluster.nodes:
        with node.client() as conn:
            try:
                conn.config_set("cluster-preferred-endpoint-type", "unknown-endpoint")
            except redis_py.ResponseError:
                pytest.skip("this Redis has no cluster-preferred-endpoint-type (6.2: endpoints are always IPs)")
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_CLUSTER_NODES": cluster.seed_urls[:2],
        "CIRCUIT_BREAKER_COOLDOWN": 0,
    }
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            if node.alive:
                with node.client() as conn:
                    conn.config_set("cluster-preferred-endpoint-type", "ip")


def test_a_cluster_with_unknown_endpoints_is_usable(unknown_endpoint, client, user):
    with unknown_endpoint.nodes[0].client() as conn:
        _start, _end, primary, *_ = conn.execute_command("CLUSTER", "SLOTS")[0]
    assert primary[0] is None  # what Redis sends: NULL, "use the address you asked"
    token = client.post("/api/login/", **basic_header("alice", "pw")).json()["token"]
    assert accepted(token)
    status = client.post("/api/logout/", **auth_header(token)).status_code
    assert status == 204, f"logout answered {status}: no slot map could be read (NULL endpoints)"
