"""Review (Sentinel): a primary the sentinels no longer confirm is trusted for ever.

A partition puts this process and the old primary (P1) on one side, the sentinels and the
replica (P2) on the other. The sentinels promote P2; a process on their side revokes a token
there; its call returns. This process can't reach any sentinel, so `Resolver::refresh` keeps
the primary it knows, and backs off to asking every 8 s: it goes on reading the token's record
from P1, which still answers as a primary (no READONLY: nothing demoted it), and accepts the
token for as long as the partition lasts. With LOCAL_CACHE_SIZE the listener's heartbeats to
P1 keep the in-process cache live too (its `Primary::check` only compares generations).

Expected: once the sentinels have not confirmed the primary for a bound (any bound <= 10 s
passes this test), lookups stop trusting it (the database answers: the token is gone).
"""

from __future__ import annotations

import time

import pytest
import redis as redis_py
from django.test import Client
from knox.models import AuthToken

from knox_redis import _knox_redis, cache
from tests.test_sentinel import fresh, login, use_explicit, whoami  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def wait_until(condition, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("local_cache_size", [0, 100])
def test_a_primary_cut_off_from_every_sentinel_stops_being_trusted(settings, user, fresh, local_cache_size):  # noqa: F811
    use_explicit(settings, fresh, LOCAL_CACHE_SIZE=local_cache_size)
    native = cache.get_client()
    client = Client()
    token = login(client)
    assert whoami(client, token) == 200
    old = fresh.primary_port()
    (replica,) = fresh.replicas
    key = f"knox:token:{token[:15]}"
    replica_conn = redis_py.Redis(port=replica.port)
    wait_until(lambda: any(f.startswith(b"r:") for f in replica_conn.hkeys(key)))  # copied to P2
    if local_cache_size:
        wait_until(lambda: native.local_cache_live)
        hits = native.stats()["local_hits"]
        assert whoami(client, token) == 200
        assert native.stats()["local_hits"] > hits

    # The partition: no sentinel reachable from here; on the other side P2 is promoted.
    fresh.stop_sentinels()
    replica_conn.execute_command("REPLICAOF", "NO", "ONE")

    # A process on the sentinels' side revokes the token on the new primary (and the row goes).
    row = AuthToken.objects.get(token_key=token[:15])
    other_side = _knox_redis.TokenCache(
        host="127.0.0.1",
        port=replica.port,
        record_secret=cache.signing_key(),
        record_fallback_secrets=cache.signing_key_fallbacks(),
    )
    other_side.revoke([(row.token_key, row.digest, row.user_id)])
    AuthToken.objects.filter(pk=row.pk)._raw_delete(row._state.db)  # no signal: that process's DB write
    assert not any(f.startswith(b"r:") for f in replica_conn.hkeys(key))
    revoked_at = time.monotonic()
    local_hits = native.stats().get("local_hits", 0)

    statuses = []
    while time.monotonic() - revoked_at < 10:
        statuses.append((round(time.monotonic() - revoked_at, 1), whoami(client, token)))
        time.sleep(0.1)
    assert native.primary_address == f"127.0.0.1:{old}"
    assert redis_py.Redis(port=old).info("replication")["role"] == "master"  # it never said otherwise
    print(
        f"\nlocal cache live: {native.local_cache_live}; local hits during the partition: "
        f"{native.stats().get('local_hits', 0) - local_hits}"
    )
    late = [status for at, status in statuses if at > 8]
    assert late
    assert set(late) == {401}, f"revoked token still accepted 8-10 s after its revocation: {statuses[-5:]}"
