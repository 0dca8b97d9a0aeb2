"""Third review (07d4791): `lookup_pair_in_cluster` claims both breakers with `allow()`, one
after the other. When the token's key and its user's row live on the SAME node, both pools are
that node's pool and both calls go to one breaker. After the cool-down, the first `allow()`
claims the probe (it pushes `open_until` out by another cool-down), the second sees the
breaker open again and returns false: the pair returns `Ok(None)`, and the sequential way that
follows calls `allow()` a third time, which fails fast too (`CircuitOpen`). The probe is
never sent, and nothing records a success: as long as the first request after each cool-down
is such a pair lookup, the node's breaker never closes, although the node is healthy.

Forced: a token on its user's node, cached and its user remembered (pair path); the node
paused with CLIENT PAUSE just long enough for one lookup to trip its breaker; then, well after
the node answers again, requests spaced past the cool-down. Each should be the probe that closes
the breaker (a cache hit); each is refused with `circuit_open` instead."""

from __future__ import annotations

import time

import pytest
from knox.models import AuthToken

from knox_redis import cache
from tests.helpers import accepted, on_the_cluster

pytestmark = pytest.mark.cluster

TIMEOUT = 0.3
COOLDOWN = 0.3


@pytest.fixture
def on_cluster(cluster, settings):
    return on_the_cluster(
        settings,
        cluster,
        CIRCUIT_BREAKER_COOLDOWN=COOLDOWN,
        SOCKET_TIMEOUT=TIMEOUT,
        SOCKET_CONNECT_TIMEOUT=TIMEOUT,
        USER_CACHE=True,
    )


def token_on_users_node(cluster, make_token, user):
    native = cache.get_client()
    row_node = cluster.node_for_key(native.user_key(user.pk))
    for _ in range(60):
        token = make_token()
        if cluster.node_for_key(native.token_key(token[:15])) is row_node:
            return token, row_node
        AuthToken.objects.filter(token_key=token[:15]).delete()
    raise AssertionError("no token on the user's node")


def test_pair_lookup_on_one_node_lets_its_breaker_close_after_the_cooldown(on_cluster, make_token, user):
    token, node = token_on_users_node(on_cluster, make_token, user)
    for _ in range(3):
        assert accepted(token)  # cached, row cached, user remembered: the pair path from now on
    with node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", int(TIMEOUT * 1000 * 2), "ALL")
    assert accepted(token)  # from the database: the node's breaker trips
    time.sleep(2 * TIMEOUT + 0.3)  # the pause is over, the node answers again
    with node.client() as conn:
        assert conn.ping()
    outcomes = []
    for _ in range(4):
        time.sleep(COOLDOWN + 0.1)  # past the cool-down: this request should be the probe
        before = cache.metrics()
        assert accepted(token)
        after = cache.metrics()
        outcomes.append(
            {
                "hit": after["lookups_hit"] - before["lookups_hit"],
                "circuit_open": after["errors_circuit_open"] - before["errors_circuit_open"],
            }
        )
    print("\nrequests after each cool-down, node healthy:", outcomes)
    never_closed = f"the healthy node's breaker never closed: every probe was lost ({outcomes})"
    assert outcomes[-1]["hit"] == 1, never_closed
    assert outcomes[-1]["circuit_open"] == 0, never_closed
