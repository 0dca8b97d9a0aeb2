"""Where a USER_CACHE hit's time goes, in one run: the whole `authenticate()` call (and the
same with BUSY_POLL_US=0: every reply waited for asleep), the same call with the lookup
replaced by the Lookup it returned (the Python side alone), with that Lookup plus a `PING`
(one round trip in place), and the Lua script's own time in Redis (`INFO commandstats`, the
incarnation check's `INFO` shown apart). Then the loopback round trip, each a `PING` over a
plain socket: waiting in `recv` and polling without sleeping, to show what the process pays
to be put to sleep and woken; and, with redis-server held to one vCPU for the while, waiting
in `recv` from that vCPU and from another (a wake-up across vCPUs goes through the
hypervisor). A random one of 1,000 users' tokens per call, PostgreSQL when reachable (as
bench.py), its own redis-server; knox's call is timed alongside, for the ratio.

    .venv/bin/python bench/hit_breakdown.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import calls  # noqa: E402  (the same Django set-up, users, tokens and scenarios)


def per_call(fn: Callable[[Any], Any], items: Iterable[Any]) -> float:
    items = list(items)
    started = time.perf_counter_ns()
    for item in items:
        fn(item)
    return (time.perf_counter_ns() - started) / len(items) / 1000


@contextmanager
def busy_poll_off() -> Iterator[None]:
    """The current settings with BUSY_POLL_US=0, on a client of their own (warmed)."""
    from django.conf import settings

    from knox_redis import cache
    from knox_redis.settings import knox_redis_settings

    before = settings.REST_KNOX_REDIS
    settings.REST_KNOX_REDIS = {**before, "BUSY_POLL_US": 0}
    knox_redis_settings.reload()
    cache.reset_client()
    try:
        cache.get_client().ping()
        yield
    finally:
        settings.REST_KNOX_REDIS = before
        knox_redis_settings.reload()
        cache.reset_client()
        cache.get_client().ping()


def ping_over_socket(port: int, calls_: int, *, sleep: bool) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def ping(_: Any) -> None:
            sock.sendall(b"PING\r\n")
            if sleep:
                sock.recv(64)
                return
            while True:
                try:
                    sock.recv(64, socket.MSG_DONTWAIT)
                    return
                except BlockingIOError:
                    pass

        return per_call(ping, range(calls_))


def ping_from_cpu(server_pid: int, port: int, calls_: int, *, same: bool) -> float | None:
    """A PING waiting in recv, redis-server held to one vCPU and this thread to the same one or
    another; None on a single-CPU machine. Both affinities are restored."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    server_cpus, own_cpus = os.sched_getaffinity(server_pid), os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(server_pid, {cpus[-1]})
        os.sched_setaffinity(0, {cpus[-1] if same else cpus[0]})
        return ping_over_socket(port, calls_, sleep=True)
    finally:
        os.sched_setaffinity(0, own_cpus)
        os.sched_setaffinity(server_pid, server_cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    args = parser.parse_args()
    import redis

    with calls.django_and_redis(args.db) as (engine, server):
        scenarios = calls.build_scenarios()
        knox = scenarios[0]
        ours = next(s for s in scenarios if s.name == "knox_redis (USER_CACHE)")
        from knox_redis import cache

        conn = redis.Redis(port=server.port)
        rng = random.Random(1)
        with calls.knox_redis_settings_of(ours):
            requests = [calls._request(ours, rng.choice(ours.tokens)) for _ in range(args.calls)]
            for request in requests:
                ours.auth.authenticate(request)
            found: dict[tuple[str, str], Any] = {}
            real_lookup = cache.lookup

            def kept(token_key: str, digest: str, create: bool = False) -> Any:
                if (token_key, digest) not in found:
                    found[token_key, digest] = real_lookup(token_key, digest, create=create)
                return found[token_key, digest]

            def kept_after_ping(token_key: str, digest: str, create: bool = False) -> Any:
                cache.get_client().command([b"PING"])
                return found[token_key, digest]

            rows: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                rows.setdefault("knox: authenticate()", []).append(per_call(knox.auth.authenticate, requests[:300]))
                # Warm, as the BUSY_POLL_US=0 row below is: a client of its own each round (its
                # connection, its decoded replies).
                per_call(ours.auth.authenticate, requests)
                conn.config_resetstat()
                rows.setdefault("USER_CACHE hit: authenticate()", []).append(per_call(ours.auth.authenticate, requests))
                stats = conn.info("commandstats")
                with busy_poll_off():
                    per_call(ours.auth.authenticate, requests)  # warm, as the row above is
                    rows.setdefault("  the same, BUSY_POLL_US=0 (asleep for the reply)", []).append(
                        per_call(ours.auth.authenticate, requests)
                    )
                rows.setdefault("  the lookup script, in Redis", []).append(stats["cmdstat_evalsha"]["usec_per_call"])
                info = stats.get("cmdstat_info", {}).get("usec_per_call", 0.0)
                rows.setdefault("    of which its INFO (incarnation check)", []).append(info)
                try:
                    cache.lookup = kept
                    per_call(ours.auth.authenticate, requests)  # every Lookup kept once
                    rows.setdefault("  Python side (lookup returned from memory)", []).append(
                        per_call(ours.auth.authenticate, requests)
                    )
                    cache.lookup = kept_after_ping
                    rows.setdefault("  Python side + one PING in its place", []).append(
                        per_call(ours.auth.authenticate, requests)
                    )
                finally:
                    cache.lookup = real_lookup
                rows.setdefault("PING, socket, sleeping in recv", []).append(
                    ping_over_socket(server.port, args.calls, sleep=True)
                )
                rows.setdefault("PING, socket, polling without sleeping", []).append(
                    ping_over_socket(server.port, args.calls, sleep=False)
                )
                assert server.process is not None
                for same, name in ((True, "the same vCPU as redis-server"), (False, "another vCPU")):
                    took = ping_from_cpu(server.process.pid, server.port, args.calls, same=same)
                    if took is not None:
                        rows.setdefault(f"PING, socket, waiting in recv, from {name}", []).append(took)
        print(f"{engine}, 1 thread, {args.rounds} rounds of {args.calls} calls; median (min-max) µs per call\n")
        print("| what | µs per call |")
        print("|---|---:|")
        for name, values in rows.items():
            print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |")
        knox_us = statistics.median(rows["knox: authenticate()"])
        hit_us = statistics.median(rows["USER_CACHE hit: authenticate()"])
        print(f"\nknox / USER_CACHE hit: {knox_us / hit_us:.2f}x")


if __name__ == "__main__":
    main()
