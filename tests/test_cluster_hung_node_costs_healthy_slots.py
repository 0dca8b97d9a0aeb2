"""Review of e3a00b6 (Redis Cluster): one hung master (SIGSTOP: the kernel still accepts TCP
connections, nothing answers) should cost the calls on *its* slots a socket timeout, and
nothing to the slots of healthy masters.

1. A failure there marks the slot map stale (`node_lost`); the next call on a healthy slot
   asks for the map again, first of every known node in turn (the hung one included: connect
   succeeds, INFO or CLUSTER SLOTS times out), then of each seed in turn (the hung one again,
   if it is a seed). So a call whose own node answers in a millisecond takes several socket
   timeouts: attempt()'s "deadline" bounds only the redirections.
2. The circuit breaker is one per process, not per node: the one failure on the hung node's
   slot opens it, and every call on every healthy master's slots is then short-circuited to
   the database for the cool-down (then one probe, which fails again whenever it happens to
   hit the hung node's slots).

The node is resumed within about half a second of being stopped (node timeout 500 ms), so
the cluster does not fail it over meanwhile."""

from __future__ import annotations

import os
import signal
import time

import pytest

import knox_redis
from knox_redis import cache
from tests.helpers import token_key_on

pytestmark = pytest.mark.cluster

DIGEST = "ab" * 64


def _configure(settings, cluster, hung, healthy, cooldown):
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "REDIS_CLUSTER_NODES": [hung.url, healthy.url],
        "CIRCUIT_BREAKER_COOLDOWN": cooldown,
    }


def test_a_hung_master_makes_calls_on_healthy_slots_exceed_the_socket_timeout(cluster, settings, db):
    hung, healthy = cluster.masters()[0], cluster.masters()[1]
    _configure(settings, cluster, hung, healthy, cooldown=0)  # no breaker: see each call's cost
    native = cache.get_client()
    on_hung, on_healthy = token_key_on(cluster, native, hung), token_key_on(cluster, native, healthy)
    assert cache.lookup(on_hung, DIGEST) is not None  # the map is known; a pool to `hung` exists
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert cache.lookup(on_hung, DIGEST) is None  # its slot: a socket timeout, as expected
        on_hung_took = time.monotonic() - started
        time.sleep(0.12)  # REFRESH_EVERY
        started = time.monotonic()
        found = cache.lookup(on_healthy, DIGEST)
        healthy_took = time.monotonic() - started
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
    print(f"\nhung slot: {on_hung_took:.3f}s; healthy slot: {healthy_took:.3f}s (SOCKET_TIMEOUT 0.2s)")
    assert found is not None
    assert healthy_took < 0.2, (
        f"a lookup on a healthy master's slot took {healthy_took:.2f}s (socket timeout 0.2s): the "
        "map refresh asked the hung node (known pool, then seed) before a healthy one"
    )


def test_a_hung_master_short_circuits_every_other_master(cluster, settings, db):
    hung, healthy = cluster.masters()[0], cluster.masters()[1]
    _configure(settings, cluster, hung, healthy, cooldown=2.0)  # the default cool-down
    native = cache.get_client()
    on_hung, on_healthy = token_key_on(cluster, native, hung), token_key_on(cluster, native, healthy)
    assert cache.lookup(on_healthy, DIGEST) is not None
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        assert cache.lookup(on_hung, DIGEST) is None
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
    before = knox_redis.stats().get("errors_circuit_open", 0)
    found = cache.lookup(on_healthy, DIGEST)  # its master never stopped answering
    after = knox_redis.stats().get("errors_circuit_open", 0)
    assert found is not None
    assert after == before, (
        "one hung master opened the process-wide breaker: lookups on the other masters' slots "
        "are short-circuited to the database for CIRCUIT_BREAKER_COOLDOWN"
    )
