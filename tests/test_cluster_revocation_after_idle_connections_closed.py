"""Review of e3a00b6 (Redis Cluster): every other call (attempt()) retries once on a new
connection when a pooled one turns out to be closed by the server (a node restarted, a
`timeout` idle limit, CLIENT KILL, a failover tool killing clients). fanout.rs, which carries
every Cluster revocation, does not: it sends on whatever the pool hands out and fails the
whole revocation on the dead connection, so the first logout after a node dropped this
process's idle connections answers 503 (on a single server it answers 204)."""

from __future__ import annotations

import pytest
from knox.models import AuthToken

from knox_redis import cache
from tests.conftest import auth_header, basic_header
from tests.helpers import accepted

pytestmark = pytest.mark.cluster


def test_logout_after_a_node_closed_idle_connections(on_cluster, client, user):
    native = cache.get_client()
    index_node = on_cluster.node_for_key(native.user_key(user.pk))
    for _ in range(50):
        token = client.post("/api/login/", **basic_header("alice", "pw")).json()["token"]
        if on_cluster.node_for_key(native.token_key(token[:15])) is not index_node:
            break
        AuthToken.objects.filter(token_key=token[:15]).delete()
    assert accepted(token)  # a hit; the write-through left an idle connection to the index's node
    # The index's node drops its normal clients (what a restart or `timeout` does too).
    with index_node.client() as conn:
        conn.execute_command("CLIENT", "KILL", "TYPE", "normal")
    status = client.post("/api/logout/", **auth_header(token)).status_code
    assert status == 204, f"logout answered {status}: the revocation used a closed pooled connection"
