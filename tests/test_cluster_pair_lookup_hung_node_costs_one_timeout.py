"""Second review (064011d): with USER_CACHE on a Cluster, a repeat hit first tries
`lookup_pair_in_cluster` (the token's lookup and the user's row on their two nodes at once),
which neither goes through the nodes' breakers (it only checks `is_open()`) nor records a
failure in them. When one node doesn't answer, the pair waits the socket timeout, gives up
silently, and the sequential path then sends the same call to the same hung node and waits the
socket timeout again: one lookup costs two socket timeouts for the one node it can't reach
(the contract: about one per node touched). After each cool-down the pair path ignores the
breaker's single probe (`is_open()` is false once the cool-down has passed, before `allow()`
claims the probe): every request that comes then pays the timeout again. The pair also drops
both connections on any failure, so the sequential retry opens a new one to the hung node,
whose INFO pipeline (incarnation::learn) costs 2 more socket timeouts (redis-rs reads every
reply of a pipeline after a timeout) and whose failure is charged to the seed's pool, not the
node's (see test_cluster_hung_node_new_connection_trips_its_breaker.py). Measured: one
`accepted()` ~2.5 s, the next after the cool-down 3-4 s, at SOCKET_TIMEOUT 0.5 s.

The node is made unresponsive with CLIENT PAUSE (clients only: no failover)."""

from __future__ import annotations

import time

import pytest
from knox.models import AuthToken

from knox_redis import cache
from tests.helpers import accepted, on_the_cluster

pytestmark = pytest.mark.cluster

TIMEOUT = 0.5


@pytest.fixture
def on_cluster(cluster, settings):
    return on_the_cluster(
        settings,
        cluster,
        CIRCUIT_BREAKER_COOLDOWN=0.3,
        SOCKET_TIMEOUT=TIMEOUT,
        SOCKET_CONNECT_TIMEOUT=TIMEOUT,
        USER_CACHE=True,
    )


def token_elsewhere(cluster, make_token, user):
    native = cache.get_client()
    row_node = cluster.node_for_key(native.user_key(user.pk))
    for _ in range(50):
        token = make_token()
        token_node = cluster.node_for_key(native.token_key(token[:15]))
        if token_node is not row_node:
            return token, token_node, row_node
        AuthToken.objects.filter(token_key=token[:15]).delete()
    raise AssertionError("no token on another node than the user's row")


def timed_lookup(token: str) -> tuple[bool, float]:
    began = time.monotonic()
    ok = accepted(token)
    return ok, time.monotonic() - began


@pytest.mark.parametrize("hung", ["row", "token"])
def test_a_repeat_hit_costs_one_socket_timeout_for_a_hung_node(on_cluster, make_token, user, hung):
    token, token_node, row_node = token_elsewhere(on_cluster, make_token, user)
    for _ in range(3):
        assert accepted(token)  # cached, row cached, user remembered: the pair path from now on
    node = row_node if hung == "row" else token_node
    with node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", 7000, "ALL")
    ok, first = timed_lookup(token)
    print(f"\n{hung} node hung: the first lookup took {first:.2f} s (socket timeout {TIMEOUT} s)")
    time.sleep(0.35)  # past the breaker's cool-down: one probe should pay the timeout
    ok2, after_cooldown = timed_lookup(token)
    print(f"{hung} node hung: the probe after the cool-down took {after_cooldown:.2f} s")
    time.sleep(max(0.0, 7.1 - first - 0.35 - after_cooldown))
    assert ok  # answered from the database / without the row
    assert ok2
    assert first < 1.4 * TIMEOUT, f"one lookup waited {first:.2f} s on one hung node (socket timeout {TIMEOUT} s)"
    assert after_cooldown < 1.4 * TIMEOUT, f"the probe waited {after_cooldown:.2f} s"
