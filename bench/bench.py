"""Plain knox against knox_redis, side by side, in one process.

Starts its own redis-server, uses PostgreSQL if one is reachable (in a throwaway database)
or SQLite in a temporary directory, and times GET requests to a tiny DRF view through
django.test.Client. Every scenario sends the same number of requests, first from one thread,
then from several, and one Markdown table compares database queries per request,
throughput and latency. Run with `make bench` or:

    .venv/bin/python bench/bench.py [--requests 2000] [--threads 1,4] [--db auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from tests.servers import RedisServer, free_port  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Untimed requests per thread before each run: opens the thread's database connection and a
# pooled Redis connection, and gets every code path imported and warm.
WARMUP_REQUESTS = 20
KNOX_ROUTE = "/knox/"
KNOX_REDIS_ROUTE = "/knox-redis/"

# Filled in by configure_django(): ROOT_URLCONF points at this module, and the views can
# only be defined once Django's apps are loaded.
urlpatterns: list[Any] = []


class BenchError(RuntimeError):
    pass


# --- the database ------------------------------------------------------------------------


@dataclass
class Database:
    """The Django DATABASES entry to use, and how to throw the database away afterwards."""

    engine: str  # "postgresql" or "sqlite"
    settings: dict[str, Any]
    cleanup: Callable[[], None]


def open_database(choice: str) -> Database:
    if choice in ("postgres", "auto"):
        url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        try:
            return _postgres_database(url)
        except Exception as exc:
            if choice == "postgres":
                raise BenchError(f"PostgreSQL not available at {url}: {exc}") from exc
            print(f"PostgreSQL not available at {url} ({exc}); using SQLite", file=sys.stderr)
    return _sqlite_database()


def _postgres_database(url: str) -> Database:
    import psycopg
    from psycopg import sql

    name = f"knox_redis_bench_{os.getpid()}"
    # CREATE/DROP DATABASE can't run inside a transaction: autocommit.
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as admin:
            # FORCE (PostgreSQL 13+) ends any connection a crashed thread may have left open.
            try:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            except psycopg.errors.SyntaxError:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    parts = urlsplit(url)
    return Database(
        engine="postgresql",
        settings={
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": parts.username or "postgres",
            "PASSWORD": parts.password or "",
            "HOST": parts.hostname or "127.0.0.1",
            "PORT": str(parts.port or 5432),
            # Persistent connections: the test client's own request_finished juggling is not
            # thread-safe, and with CONN_MAX_AGE=0 a request in one thread could close another
            # thread's connection, timing reconnects instead of authentication.
            "CONN_MAX_AGE": None,
        },
        cleanup=drop,
    )


def _sqlite_database() -> Database:
    workdir = tempfile.mkdtemp(prefix="knox-redis-bench-")
    return Database(
        engine="sqlite",
        # A file, not :memory:, so that every thread sees the same database.
        settings={
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": f"{workdir}/bench.sqlite3",
            "CONN_MAX_AGE": None,
        },
        cleanup=lambda: shutil.rmtree(workdir, ignore_errors=True),
    )


# --- Django ------------------------------------------------------------------------------


def configure_django(database: dict[str, Any], redis_url: str) -> None:
    settings.configure(
        SECRET_KEY="bench",
        # DEBUG off: with it on, every query is recorded in connection.queries.
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        # No middleware: the rows of the table should differ only in authentication.
        MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "knox", "knox_redis"],
        DATABASES={"default": database},
        CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url}},
        REST_KNOX_REDIS={"CACHE_ALIAS": "default"},
        # knox's defaults, spelled out: no AUTO_REFRESH, so authenticating never writes.
        REST_KNOX={"TOKEN_TTL": timedelta(hours=10), "AUTO_REFRESH": False},
        REST_FRAMEWORK={
            "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
            "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
            "DEFAULT_THROTTLE_CLASSES": [],
        },
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            # The Redis-down scenario makes knox_redis warn that it is using the database: that
            # is the point of the scenario, and the counters in --json record it.
            "loggers": {"knox_redis": {"level": "ERROR"}, "django.request": {"level": "ERROR"}},
        },
    )
    django.setup()

    import knox.auth
    from django.urls import path
    from rest_framework.permissions import IsAuthenticated
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    import knox_redis.auth

    class OkView(APIView):
        permission_classes = (IsAuthenticated,)

        def get(self, request: Request) -> Response:
            return Response({"ok": True})

    class KnoxOkView(OkView):
        authentication_classes = (knox.auth.TokenAuthentication,)

    class KnoxRedisOkView(OkView):
        authentication_classes = (knox_redis.auth.TokenAuthentication,)

    urlpatterns[:] = [
        path(KNOX_ROUTE.strip("/") + "/", KnoxOkView.as_view()),
        path(KNOX_REDIS_ROUTE.strip("/") + "/", KnoxRedisOkView.as_view()),
    ]


class TokenPool:
    """Tokens made up front, handed out once each.

    All are made before the first timed request, so every scenario sees the same number of
    rows. Each belongs to its own user: knox reads all of a user's tokens on every request
    (its expired-token cleanup), so thousands of tokens on one user would slow plain knox
    and the miss path with a cost no real user has.
    """

    def __init__(self, count: int) -> None:
        from django.contrib.auth import get_user_model
        from django.db import transaction
        from knox.models import AuthToken

        user_model = get_user_model()
        with transaction.atomic():
            users = user_model.objects.bulk_create(
                # "!" is an unusable password: nothing hashes one for each user.
                user_model(username=f"bench-{i}", password="!")
                for i in range(count)
            )
            if users and users[0].pk is None:  # backends that can't return bulk-created keys
                users = list(user_model.objects.filter(username__startswith="bench-").order_by("pk"))
            self._tokens = [AuthToken.objects.create(user=user)[1] for user in users]
        # Creating them wrote each through to Redis (as a login does). Start instead from
        # tokens Redis has never seen, as when knox_redis is installed on a running site:
        # each scenario brings them to the state it measures (cached, due, or first seen).
        import redis as redis_py

        redis_py.Redis.from_url(settings.CACHES["default"]["LOCATION"]).flushall()
        self._next = 0

    def take(self, n: int) -> list[str]:
        if self._next + n > len(self._tokens):
            raise BenchError(f"token pool exhausted: {len(self._tokens)} made, {self._next + n} wanted")
        tokens = self._tokens[self._next : self._next + n]
        self._next += n
        return tokens


# --- scenarios ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    route: str
    # True: every timed request presents a token never seen before (the miss path).
    cold: bool = False
    # With cold: each token was cached once and its record has since lapsed (MAX_CACHE_TTL);
    # its generation is still there, so the miss costs knox's queries only.
    seen_before: bool = False
    # With cold: each token was just created through the ORM, as a login does (its
    # write-through cached it): the first request after a login.
    after_login: bool = False
    # A context manager around the whole run (the Redis-down scenario changes settings).
    context: Callable[[], Any] | None = None

    def tokens_needed(self, threads: int, requests: int) -> int:
        # One warm-up token per thread, reused by the timed requests unless they are cold.
        return threads + (requests if self.cold else 0)


@contextmanager
def redis_down() -> Iterator[None]:
    """Point knox_redis at a port nothing listens on.

    override_settings sends setting_changed, which makes knox_redis reload its settings and
    drop its client; the next one connects to the dead port, fails, and opens the breaker.
    """
    from django.test import override_settings

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(REST_KNOX_REDIS={"CACHE_ALIAS": "default", "REDIS_URL": dead}):
        yield


SCENARIOS = [
    Scenario("knox (DB only)", KNOX_ROUTE),
    # The same tokens-never-repeated workload as the miss rows, for a like-for-like baseline.
    Scenario("knox (DB only), a new token each request", KNOX_ROUTE, cold=True),
    Scenario("knox_redis hit", KNOX_REDIS_ROUTE),
    Scenario("knox_redis miss, first sight", KNOX_REDIS_ROUTE, cold=True),
    Scenario("knox_redis miss, record lapsed", KNOX_REDIS_ROUTE, cold=True, seen_before=True),
    Scenario("knox_redis, first request after login", KNOX_REDIS_ROUTE, cold=True, after_login=True),
    Scenario("knox_redis, Redis down", KNOX_REDIS_ROUTE, context=redis_down),
]


@dataclass
class Result:
    scenario: str
    threads: int
    requests: int
    db_queries_per_request: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    # The native client's counters over the timed requests only (hits, misses, fills, ...).
    cache_counters: dict[str, int] = field(default_factory=dict)
    # Raw material for merging rounds; not reported.
    latencies: list[float] = field(default_factory=list, repr=False)
    elapsed: float = 0.0


def merge(rounds: list[Result]) -> Result:
    """One row from several interleaved rounds of the same scenario and thread count."""
    latencies = [latency for r in rounds for latency in r.latencies]
    elapsed = sum(r.elapsed for r in rounds)
    counters: dict[str, int] = {}
    for r in rounds:
        for key, value in r.cache_counters.items():
            counters[key] = counters.get(key, 0) + value
    queries = sum(r.db_queries_per_request * r.requests for r in rounds)
    return _summarize(rounds[0].scenario, rounds[0].threads, latencies, queries, elapsed, counters)


def _summarize(
    scenario: str, threads: int, latencies: list[float], queries: float, elapsed: float, counters: dict[str, int]
) -> Result:
    latencies = sorted(latencies)
    requests = len(latencies)
    return Result(
        scenario=scenario,
        threads=threads,
        requests=requests,
        db_queries_per_request=queries / requests,
        requests_per_second=requests / elapsed,
        p50_ms=_percentile(latencies, 50) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000,
        mean_ms=sum(latencies) / requests * 1000,
        cache_counters=counters,
        latencies=latencies,
        elapsed=elapsed,
    )


@dataclass
class ThreadOutcome:
    latencies: list[float] = field(default_factory=list)
    queries: int = 0
    error: BaseException | None = None


class QueryCounter:
    """Counts the statements a connection executes.

    An execute_wrapper, rather than CaptureQueriesContext: both see only the connection of the
    thread that installs them (right for counting per thread), but CaptureQueriesContext forces
    the debug cursor, which records each statement's SQL and timing inside the timed loop.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


def _request(client: Any, route: str, token: str) -> None:
    response = client.get(route, HTTP_AUTHORIZATION=f"Token {token}")
    if response.status_code != 200:
        raise BenchError(f"GET {route} answered {response.status_code}: {response.content[:200]!r}")


def _worker(
    route: str,
    warm_token: str,
    tokens: list[str],
    ready: threading.Barrier,
    go: threading.Event,
    outcome: ThreadOutcome,
) -> None:
    from django.db import close_old_connections, connection
    from django.test import Client

    client = Client()
    try:
        for _ in range(WARMUP_REQUESTS):
            _request(client, route, warm_token)
        counter = QueryCounter()
        latencies: list[float] = []
        ready.wait()
        go.wait()
        with connection.execute_wrapper(counter):
            for token in tokens:
                started = time.perf_counter()
                _request(client, route, token)
                latencies.append(time.perf_counter() - started)
        outcome.latencies = latencies
        outcome.queries = counter.count
    except BaseException as exc:
        outcome.error = exc
        ready.abort()  # so that the other threads and the main thread stop waiting
    finally:
        # Each thread has its own connection; nothing else would close it.
        close_old_connections()
        connection.close()


def selected(args: Any) -> list[Scenario]:
    return [s for s in SCENARIOS if not args.only or args.only in s.name]


def _cache_then_drop_records(route: str, tokens: list[str]) -> None:
    """Authenticate each token once (untimed), then make its record due for a re-read, as
    after MAX_CACHE_TTL: the record stays (with the generation it carries), its deadline has
    passed."""
    from django.test import Client
    from django.utils import timezone
    from knox.models import AuthToken

    from knox_redis import cache

    client = Client()
    for token in tokens:
        _request(client, route, token)
    native = cache.get_client()
    past_us = cache.to_us(timezone.now()) - 1_000_000
    rows = {row.token_key: row for row in AuthToken.objects.filter(token_key__in=[t[:15] for t in tokens])}
    for token in tokens:
        row = rows[token[:15]]
        record, generation, *_ = native.lookup(row.token_key, row.digest)
        if record is None or generation is None:
            raise BenchError("a token that was just authenticated is not cached")
        user_pk, created_us, expiry_us, _fresh_until_us = record
        if not native.fill(row.token_key, row.digest, generation, user_pk, created_us, expiry_us, past_us, 60_000):
            raise BenchError("could not mark a record as due for a re-read")


def _logged_in_again(tokens: list[str]) -> list[str]:
    """A new token for each of these tokens' users, created as a login creates it (so cached
    by its write-through once created: autocommit here)."""
    from knox.models import AuthToken

    rows = AuthToken.objects.filter(token_key__in=[t[:15] for t in tokens]).select_related("user")
    users = {row.token_key: row.user for row in rows}
    return [AuthToken.objects.create(user=users[token[:15]])[1] for token in tokens]


def run(scenario: Scenario, threads: int, requests: int, pool: TokenPool) -> Result:
    from knox_redis import cache

    with scenario.context() if scenario.context else nullcontext():
        shares = [requests // threads + (1 if i < requests % threads else 0) for i in range(threads)]
        warm_tokens = pool.take(threads)
        if scenario.cold:
            cold = pool.take(requests)
            if scenario.seen_before:
                _cache_then_drop_records(scenario.route, cold)
            if scenario.after_login:
                cold = _logged_in_again(cold)
            per_thread = [cold[sum(shares[:i]) : sum(shares[: i + 1])] for i in range(threads)]
        else:
            per_thread = [[warm_tokens[i]] * shares[i] for i in range(threads)]

        outcomes = [ThreadOutcome() for _ in range(threads)]
        ready = threading.Barrier(threads + 1)
        go = threading.Event()
        workers = [
            threading.Thread(
                target=_worker,
                args=(scenario.route, warm_tokens[i], per_thread[i], ready, go, outcomes[i]),
                name=f"bench-{i}",
            )
            for i in range(threads)
        ]
        gc.collect()
        for worker in workers:
            worker.start()
        with suppress(threading.BrokenBarrierError):
            ready.wait()  # every thread has warmed up
        # Read after the warm-up: the Redis-down scenario made a new client during it.
        before = cache.get_client().stats()
        started = time.perf_counter()
        go.set()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        after = cache.get_client().stats()

    # The first real error, not the BrokenBarrierError it caused in the other threads.
    errors = sorted(
        (o.error for o in outcomes if o.error is not None),
        key=lambda e: isinstance(e, threading.BrokenBarrierError),
    )
    if errors:
        raise BenchError(f"{scenario.name}, {threads} thread(s): {errors[0]!r}") from errors[0]

    latencies = [latency for outcome in outcomes for latency in outcome.latencies]
    assert len(latencies) == requests
    counters = {k: after[k] - before[k] for k in after if k != "idle_connections"}
    result = _summarize(scenario.name, threads, latencies, sum(o.queries for o in outcomes), elapsed, counters)
    _check(scenario, result)
    return result


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _check(scenario: Scenario, result: Result) -> None:
    """Fail loudly if a scenario didn't measure the path it is named after."""
    c, n = result.cache_counters, result.requests
    expected = {
        "knox (DB only)": c["hits"] + c["misses"] + c["errors"] + c["short_circuits"] == 0,
        "knox (DB only), a new token each request": c["hits"] + c["misses"] + c["errors"] + c["short_circuits"] == 0,
        # The native "hits" counter counts valid records found; a hit fills nothing.
        "knox_redis hit": c["hits"] == n and c["misses"] == 0 and c["fills"] == 0,
        # A token seen for the first time is looked up twice: once by the request (nothing
        # there), once after the database confirmed it, to create its generation.
        "knox_redis miss, first sight": c["misses"] == 2 * n and c["fills"] == n and c["hits"] == 0,
        # The record is found, due for a re-read: the database path runs, then a fill.
        "knox_redis miss, record lapsed": c["hits"] == n and c["fills"] == n and c["misses"] == 0,
        # The login's write-through cached the token: its first request is a hit.
        "knox_redis, first request after login": c["hits"] == n and c["misses"] == 0 and c["fills"] == 0,
        "knox_redis, Redis down": c["hits"] + c["misses"] == 0 and c["errors"] + c["short_circuits"] == n,
    }[scenario.name]
    if not expected:
        raise BenchError(f"{scenario.name}, {result.threads} thread(s): unexpected cache counters {c}")


# --- report ------------------------------------------------------------------------------


def machine_facts(engine: str, redis_port: int) -> dict[str, Any]:
    import redis as redis_py
    from django.db import connection

    if engine == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            db = f"PostgreSQL {cursor.fetchone()[0].split()[0]}"
    else:
        db = f"SQLite {sqlite3.sqlite_version}"
    connection.close()
    return {
        "python": platform.python_version(),
        "django": django.get_version(),
        "django_rest_knox": version("django-rest-knox"),
        "database": db,
        "redis_server": redis_py.Redis(port=redis_port).info("server")["redis_version"],
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def render(facts: dict[str, Any], results: list[Result]) -> str:
    header = (
        f"Python {facts['python']}, Django {facts['django']}, knox {facts['django_rest_knox']}, "
        f"{facts['database']}, redis-server {facts['redis_server']}, nproc {facts['nproc']}, {facts['date']}"
    )
    lines = [
        header,
        "",
        "| scenario | threads | DB queries/req | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.threads} | {r.db_queries_per_request:.2f} | {r.requests_per_second:,.0f} "
            f"| {r.p50_ms:.3f} | {r.p99_ms:.3f} |"
        )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per scenario and thread count")
    parser.add_argument("--threads", default="1,4", help="comma-separated thread counts (default 1,4)")
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", metavar="TEXT", help="run only the scenarios whose name contains TEXT")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the requests are split into")
    args = parser.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error("--threads must be comma-separated integers, such as 1,4")
    if args.requests < 1 or any(t < 1 for t in args.threads):
        parser.error("--requests and every --threads value must be at least 1")
    if any(t > args.requests for t in args.threads):
        parser.error("every --threads value must be at most --requests")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    redis_server = RedisServer().start()
    try:
        database = open_database(args.db)
        try:
            configure_django(database.settings, redis_server.url)
            bench(args, database.engine, redis_server.port)
        finally:
            if settings.configured:
                from django.db import connections

                connections.close_all()
            database.cleanup()
    finally:
        redis_server.stop()


def bench(args: argparse.Namespace, engine: str, redis_port: int) -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    facts = machine_facts(engine, redis_port)
    per_round = max(1, args.requests // args.rounds)
    pool = TokenPool(args.rounds * sum(s.tokens_needed(t, per_round) for t in args.threads for s in selected(args)))

    # Scenarios take turns, round after round, so that a slow spell of this (shared, noisy)
    # machine lands on all of them rather than on whichever ran during it.
    results = []
    for threads in args.threads:
        rounds: dict[str, list[Result]] = {s.name: [] for s in selected(args)}
        for round_number in range(args.rounds):
            for scenario in selected(args):
                print(
                    f"  {scenario.name}, {threads} thread(s), round {round_number + 1}/{args.rounds}...",
                    file=sys.stderr,
                    flush=True,
                )
                rounds[scenario.name].append(run(scenario, threads, per_round, pool))
        results.extend(merge(r) for r in rounds.values())

    print(render(facts, results))
    if args.json:
        payload = {
            "machine": facts,
            "requests_per_row": args.requests,
            "warmup_requests_per_thread": WARMUP_REQUESTS,
            "rounds": args.rounds,
            "results": [{k: v for k, v in asdict(r).items() if k not in ("latencies", "elapsed")} for r in results],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"bench failed: {exc}")
