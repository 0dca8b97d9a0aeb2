"""Second review (fanout.rs): `read()` sets each connection's read timeout to what is left of
the revocation's deadline (2 x SOCKET_TIMEOUT + the WAIT) and the connection then goes back to
the pool as it is. The next lookup that reuses it waits up to ~2.5 socket timeouts on a node
that doesn't answer (or, had the revocation ended near its deadline, 1 ms: a spurious
failure that trips the node's breaker)."""

from __future__ import annotations

import time

import pytest
from knox.models import AuthToken

import knox_redis
from knox_redis import cache
from tests.helpers import accepted, on_the_cluster

pytestmark = pytest.mark.cluster

TIMEOUT = 0.5


@pytest.fixture
def on_cluster(cluster, settings):
    return on_the_cluster(
        settings, cluster, CIRCUIT_BREAKER_COOLDOWN=5.0, SOCKET_TIMEOUT=TIMEOUT, SOCKET_CONNECT_TIMEOUT=TIMEOUT
    )


def test_a_lookup_after_a_revocation_waits_one_socket_timeout(on_cluster, make_token, user):
    native = cache.get_client()
    token, other = make_token(), make_token()
    node = on_cluster.node_for_key(native.token_key(token[:15]))
    assert accepted(token)
    native.reset()
    # A revocation on that node: its pooled connection now carries the revocation's deadline.
    for _ in range(50):
        if on_cluster.node_for_key(native.token_key(other[:15])) is node:
            break
        other = make_token()
    knox_redis.invalidate_token(AuthToken.objects.get(token_key=other[:15]))
    assert native.stats()["idle_connections"] >= 1
    with node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", 3000, "ALL")
    began = time.monotonic()
    assert accepted(token)  # from the database
    took = time.monotonic() - began
    print(f"\nlookup on a reused connection to a hung node: {took:.2f} s (socket timeout {TIMEOUT} s)")
    time.sleep(max(0.0, 3.1 - took))
    assert took < 1.4 * TIMEOUT, f"the lookup waited {took:.2f} s on one hung node"
