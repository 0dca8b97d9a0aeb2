"""Review (Sentinel): the journal is pruned only when another revocation is recorded.

`Journal::record` is the only place settled revocations go. A burst of revocations (an admin
deactivating many users, a bulk logout) followed by quiet stays in the journal for ever, however
often the sentinels confirm the primary since, and the first call after the next failover
(whenever it comes) re-sends all of it, one round trip each, holding `gate`: every other call
of the process waits behind it, with no timeout (up to CAPACITY = 100,000 round trips).

Expected: revocations confirmed MARGIN (5 s) ago are dropped as the confirmations come (e.g. in
`catch_up`/`refresh`, or lazily in `record` and `catch_up` both), and a catch-up is bounded.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis as redis_py

from knox_redis import _knox_redis
from tests.test_sentinel import fresh, make_primary  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

BURST = 3000


def test_revocations_settle_while_the_primary_is_confirmed(fresh):  # noqa: F811
    client = _knox_redis.TokenCache(
        sentinels=fresh.sentinel_addresses,
        sentinel_service_name=fresh.service,
        record_secret=b"s" * 32,
    )
    for i in range(BURST):
        client.revoke([(f"tok{i:012d}", os.urandom(16).hex(), i)], tombstone_ms=1000)
    assert client.stats()["revocations_kept"] == BURST
    started = time.monotonic()
    while time.monotonic() - started < 7.5:  # the sentinels confirm the primary every second
        client.command([b"PING"])
        time.sleep(0.2)
    kept = client.stats()["revocations_kept"]

    # What it costs: the next failover's first call re-sends them all, and another thread waits.
    (replica,) = fresh.replicas
    make_primary(fresh, replica.port)
    redis_py.Redis(port=fresh.nodes[0].port).execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
    time.sleep(1.1)
    waits: list[float] = []

    def timed() -> None:
        began = time.monotonic()
        client.command([b"PING"])
        waits.append(time.monotonic() - began)

    threads = [threading.Thread(target=timed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"\nkept after 7.5 s of confirmations: {kept}; first calls after the failover took {sorted(waits)} s")
    assert kept == 0, f"{kept} revocations still kept 7.5 s after a burst, the primary confirmed every second"
