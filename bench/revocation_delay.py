"""With LOCAL_CACHE_SIZE, how long after a logout returns does another process stop accepting
the token? (Without it, the delay is zero by construction: every request asks Redis.)

Worker processes (forked, each with its own in-process cache and tracking listener) keep
authenticating a random one of 1,000 users' tokens, all cached locally (the load), and in
between the token the parent process is about to log out, which they too serve from their
in-process cache. The parent logs out one such token at a time through the ORM; each worker
checks every token announced to it, between its load requests, until it sees it rejected
(CLOCK_MONOTONIC is system-wide on Linux). The run ends 1.2 s after the last logout, so
"never seen" would mean a token accepted past the one-second bound. USER_CACHE on (no query
per hit), PostgreSQL when reachable (as bench.py), its own redis-server.

The delay, per logout and worker: from the moment the delete returned to the start of the
first request that rejected the token (0 if it started before): by then the worker had
stopped accepting it, so this bounds the window from above (it includes the worker's own
wait to get to that check: its load request, a CPU). "Accepted after it returned" counts
requests that started after the logout had returned and still accepted the token (each a
window the delay column would show), and how long after it the latest of them started. The
last two columns end at the rejecting request's return instead: that request (Redis, then
knox's two queries: about 1-2 ms here) and the wait for a CPU, not the cache.

    .venv/bin/python bench/revocation_delay.py [--revocations 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from calls import USERS, django_and_redis  # noqa: E402

SETTINGS = {"CACHE_ALIAS": "default", "USER_CACHE": True, "USER_CACHE_TTL": 3600, "LOCAL_CACHE_SIZE": 4 * USERS}


def accepted(auth: Any, request: Any) -> bool:
    from rest_framework.exceptions import AuthenticationFailed

    try:
        return auth.authenticate(request) is not None
    except AuthenticationFailed:
        return False


def worker(load: list[str], targets: list[str], current: Any, done: Any, out: Any) -> None:
    from calls import Scenario, _request
    from django.db import connections

    from knox_redis import cache
    from knox_redis.auth import TokenAuthentication

    connections.close_all()
    auth = TokenAuthentication()
    scenario = Scenario("w", auth, load)
    deadline = time.monotonic() + 20
    while not cache.get_client().local_cache_live:
        assert time.monotonic() < deadline, "the tracking listener never went live"
        time.sleep(0.001)
    load_requests = [_request(scenario, token) for token in load]
    target_requests = [_request(scenario, token) for token in targets]
    for request in load_requests + target_requests:
        accepted(auth, request)  # every token cached locally
    rng = random.Random()
    rejected: dict[int, tuple[float, float]] = {}  # the first request that rejected a target: start, end
    late: dict[int, float] = {}  # the start of the latest request that accepted a target
    pending: list[int] = []  # targets announced and not yet seen rejected: each checked every turn
    announced = -1
    out.send("ready")
    while not done.value:
        accepted(auth, rng.choice(load_requests))
        while announced < current.value:
            announced += 1
            pending.append(announced)
        for i in list(pending):
            started = time.monotonic()
            if accepted(auth, target_requests[i]):
                late[i] = started
            else:
                rejected[i] = (started, time.monotonic())
                pending.remove(i)
    stats = cache.get_client().stats()
    out.send(
        {
            "rejected": rejected,
            "late": late,
            "local_hits": stats["local_hits"],
            "lookups": stats["hits"] + stats["misses"],
        }
    )
    connections.close_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revocations", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    args = parser.parse_args()
    with django_and_redis(args.db) as (engine, _server):
        from django.conf import settings

        settings.REST_KNOX_REDIS = SETTINGS
        run(args, engine)


def run(args: argparse.Namespace, engine: str) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connections
    from knox.models import AuthToken

    users = [get_user_model().objects.create_user(username=f"u{i}") for i in range(USERS + args.revocations)]
    load = [AuthToken.objects.create(user=u)[1] for u in users[:USERS]]
    targets = [AuthToken.objects.create(user=u)[1] for u in users[USERS:]]
    connections.close_all()

    ctx = multiprocessing.get_context("fork")
    current, done = ctx.Value("i", -1), ctx.Value("b", False)
    pipes = [ctx.Pipe() for _ in range(args.workers)]
    procs = [ctx.Process(target=worker, args=(load, targets, current, done, there)) for _, there in pipes]
    for proc in procs:
        proc.start()
    for here, _ in pipes:
        assert here.poll(60), "a worker never got ready"
        assert here.recv() == "ready"
    revoked_at: dict[int, float] = {}
    rng = random.Random(1)
    for i, token in enumerate(targets):
        current.value = i
        time.sleep(0.005 + rng.random() * 0.01)  # the workers keep serving it locally
        AuthToken.objects.filter(token_key=token[:15]).delete()
        revoked_at[i] = time.monotonic()  # the logout has returned
        time.sleep(0.01)
    time.sleep(1.2)  # the bound (the heartbeat's second) and some: "never seen" would break it
    done.value = True
    results = [here.recv() for here, _ in pipes]
    for proc in procs:
        proc.join(30)

    def delays(end: int) -> list[float]:
        return sorted(
            max(0.0, result["rejected"][i][end] - revoked_at[i]) if i in result["rejected"] else float("inf")
            for result in results
            for i in revoked_at
        )

    stopped, answered = delays(0), delays(1)
    local = sum(r["local_hits"] for r in results) / max(1, sum(r["lookups"] for r in results))
    print(
        f"{engine}, {args.workers} worker processes each serving {USERS} users' tokens from their in-process "
        f"cache (USER_CACHE on; {local:.0%} of lookups served locally), {args.revocations} logouts\n"
    )
    late = [r["late"][i] - revoked_at[i] for r in results for i in revoked_at if r["late"].get(i, 0) > revoked_at[i]]
    print(
        "| revocations seen | delay p50 ms | p99 ms | max ms | never seen | accepted after it returned | latest, ms "
        "| rejecting request's end: p50 ms | p99 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    finite = [d for d in stopped if d != float("inf")]
    ends = [d for d in answered if d != float("inf")]
    latest = f"{max(late) * 1e3:.2f}" if late else "-"

    def p99(values: list[float]) -> float:
        return values[max(0, int(len(values) * 0.99) - 1)]

    print(
        f"| {len(finite)} | {statistics.median(finite) * 1e3:.2f} | {p99(finite) * 1e3:.2f} | "
        f"{finite[-1] * 1e3:.2f} | {len(stopped) - len(finite)} | {len(late)} | {latest} | "
        f"{statistics.median(ends) * 1e3:.2f} | {p99(ends) * 1e3:.2f} |"
    )


if __name__ == "__main__":
    main()
