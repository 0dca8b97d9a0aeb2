"""Second review (f000f0e, per-node breakers): in `attempt`, a failure at checkout (a new
connection to a node that doesn't answer: `incarnation::learn`'s INFO pipeline times out) goes
to `self.failed(&err)`, i.e. to `self.pool` (the first seed's own pool, not used for Cluster
calls) instead of the node's pool: the hung node's breaker never opens, and `node_lost` marks
the seed, not the hung node. Also, redis-rs reads every reply of a pipeline even after an I/O
timeout (req_packed_commands keeps `first_err` and goes on), so learn's 2-command pipeline
costs 2 socket timeouts on a hung node (load_scripts before an ASK: 4).

Result: with no idle connection to the node (a fresh process, after a pool clear, or after the
pair path dropped it), every call to a hung node's slots pays ~2 socket timeouts, and the
next call pays them again: nothing fails fast."""

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
        settings, cluster, CIRCUIT_BREAKER_COOLDOWN=5.0, SOCKET_TIMEOUT=TIMEOUT, SOCKET_CONNECT_TIMEOUT=TIMEOUT
    )


def test_a_hung_node_trips_its_breaker_when_its_new_connections_fail(on_cluster, make_token, user):
    native = cache.get_client()
    seeds = {u.rsplit(":", 1)[1] for u in on_cluster.seed_urls[:2]}
    for _ in range(50):
        token = make_token()
        node = on_cluster.node_for_key(native.token_key(token[:15]))
        if str(node.port) not in seeds:
            break
        AuthToken.objects.filter(token_key=token[:15]).delete()
    assert accepted(token)
    assert accepted(token)
    native.reset()  # no idle connection to the node (as in a fresh worker)
    with node.client() as conn:
        conn.execute_command("CLIENT", "PAUSE", 5000, "ALL")
    durations = []
    for _ in range(3):
        began = time.monotonic()
        assert accepted(token)  # from the database
        durations.append(time.monotonic() - began)
    print(
        f"\nthree requests while {node.address} hangs (socket timeout {TIMEOUT} s): "
        + ", ".join(f"{d:.2f} s" for d in durations)
    )
    time.sleep(max(0.0, 5.1 - sum(durations)))
    assert durations[0] < 1.4 * TIMEOUT, f"the first call waited {durations[0]:.2f} s"
    assert max(durations[1:]) < 0.1, "the node's breaker did not open: each call waits on the hung node again"
