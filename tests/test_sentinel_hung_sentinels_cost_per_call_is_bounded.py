"""Review (Sentinel): with no primary known yet and every sentinel hung, concurrent calls queue
behind one another's askings.

`Resolver::known_or_asked` -> `ask_unless_asked_since` takes the `asking` lock (blocking, no
timeout); a thread that finds another asked meanwhile but got no primary asks again itself.
So the k-th of k concurrent calls pays k askings, each up to one connect plus one socket
timeout per sentinel: with 3 sentinels, 0.2 s timeouts and 8 threads, the last call takes
about 8 x 0.6 s. (Same at any moment the primary is unknown, e.g. a process started while the
sentinels are unreachable; revocations and operator commands don't go through the breaker.)

Expected: a call costs at most about one asking (it may wait for the one in flight and use
its outcome, failed or not): here under 2 x 3 x (0.2 + 0.2) s.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from knox_redis import _knox_redis
from knox_redis.cache import CacheError
from tests.test_sentinel import fresh  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

TIMEOUT = 0.2
THREADS = 8


def test_concurrent_calls_do_not_queue_sentinel_askings(fresh):  # noqa: F811
    for process in fresh._sentinels:
        os.kill(process.pid, signal.SIGSTOP)  # alive to the kernel (it accepts), answering nothing
    try:
        client = _knox_redis.TokenCache(
            sentinels=fresh.sentinel_addresses,
            sentinel_service_name=fresh.service,
            connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            record_secret=b"s" * 32,
        )
        durations: list[float] = []
        outcomes: list[str] = []
        start = threading.Barrier(THREADS)

        def call() -> None:
            start.wait()
            began = time.monotonic()
            try:
                client.command([b"PING"])
                outcomes.append("ok")
            except CacheError as exc:
                outcomes.append(type(exc).__name__)
            durations.append(time.monotonic() - began)

        threads = [threading.Thread(target=call) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        bound = 2 * len(fresh.sentinel_addresses) * (TIMEOUT + TIMEOUT)
        assert set(outcomes) == {"CacheUnavailable"}
        assert max(durations) < bound, f"per-call durations {sorted(round(d, 2) for d in durations)} (bound {bound} s)"
    finally:
        for process in fresh._sentinels:
            os.kill(process.pid, signal.SIGCONT)
