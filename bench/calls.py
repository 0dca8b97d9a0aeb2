"""In-process `authenticate()` calls/s: knox_redis against plain knox and the alternatives.

Every scenario authenticates the same kind of request object, a random one of 1,000 users'
tokens per call, calling the DRF authentication class directly (no view, no middleware), so
the table compares authentication alone. Scenarios take turns in interleaved rounds (at
least 5), so the machine's noise lands on all of them; each ratio to plain knox is the
median over the rounds, with its spread (min-max). PostgreSQL when reachable (as bench.py),
its own redis-server.

    .venv/bin/python bench/calls.py [--calls 2000] [--rounds 5] [--threads 1,4] [--db auto]

Scenarios:
- knox: knox.auth.TokenAuthentication (2 queries).
- DRF TokenAuthentication: rest_framework.authtoken (1 query, a join).
- simplejwt: JWTAuthentication, an access token per user (1 query: the user), if installed.
- knox_redis (default): knox_redis.auth.TokenAuthentication, every token cached (1 query: the
  user).
- knox_redis (USER_CACHE): the same with USER_CACHE on, every user's row cached too (0 queries).
  USER_CACHE_TTL is an hour here so that rows don't lapse between rounds; with the default
  60 s each user costs one more query a minute.
- knox_redis (USER_CACHE + LOCAL_CACHE_SIZE): and an in-process cache of 2,000 entries, warmed
  before each round (every token authenticated once): no network call at all.
- ceiling: an authentication class that builds the user and token objects in memory from a
  dict, no I/O at all: the most any cache could reach in this process. The user is the one a
  hit returns (every column but the password and last_login, which USER_CACHE defers); a
  user of fewer columns would query the database when a view reads the rest.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from bench import open_database  # noqa: E402  (bench/bench.py: the same databases)
from tests.servers import RedisServer  # noqa: E402

USERS = 1000


def has_simplejwt() -> bool:
    try:
        import rest_framework_simplejwt  # noqa: F401
    except ImportError:
        return False
    return True


def configure(database: dict[str, Any], redis_url: str) -> None:
    apps = ["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "rest_framework.authtoken"]
    apps += ["knox", "knox_redis"]
    settings.configure(
        SECRET_KEY="bench-calls-" + "x" * 40,
        DEBUG=False,
        USE_TZ=True,
        INSTALLED_APPS=apps,
        DATABASES={"default": database},
        CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url}},
        REST_KNOX_REDIS={"CACHE_ALIAS": "default"},
        REST_KNOX={"TOKEN_TTL": timedelta(hours=10), "AUTO_REFRESH": False},
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        SIMPLE_JWT={"ACCESS_TOKEN_LIFETIME": timedelta(hours=10)},
        LOGGING={"version": 1, "loggers": {"knox_redis": {"level": "ERROR"}}},
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


@dataclass
class Scenario:
    name: str
    auth: Any
    tokens: list[str]
    header_prefix: str = "Token"
    # REST_KNOX_REDIS while this scenario runs.
    knox_redis: dict[str, Any] = field(default_factory=dict)


@dataclass
class Round:
    calls: int = 0
    seconds: float = 0.0
    queries: int = 0
    redis_lookups: int = 0
    latencies: list[float] = field(default_factory=list)


def build_scenarios() -> list[Scenario]:
    from django.contrib.auth import get_user_model
    from knox.auth import TokenAuthentication as KnoxAuth
    from knox.models import AuthToken
    from rest_framework.authentication import BaseAuthentication, TokenAuthentication as DRFAuth
    from rest_framework.authtoken.models import Token

    from knox_redis.auth import TokenAuthentication as KnoxRedisAuth

    user_model = get_user_model()
    users = [user_model.objects.create_user(username=f"u{i}") for i in range(USERS)]
    knox_tokens = [AuthToken.objects.create(user=u)[1] for u in users]  # cached by write-through
    drf_tokens = [Token.objects.create(user=u).key for u in users]
    scenarios = [
        Scenario("knox", KnoxAuth(), knox_tokens),
        Scenario("DRF TokenAuthentication", DRFAuth(), drf_tokens),
    ]
    if has_simplejwt():
        from rest_framework_simplejwt.authentication import JWTAuthentication
        from rest_framework_simplejwt.tokens import AccessToken

        jwts = [str(AccessToken.for_user(u)) for u in users]
        scenarios.append(Scenario("simplejwt", JWTAuthentication(), jwts, header_prefix="Bearer"))
    scenarios.append(Scenario("knox_redis (default)", KnoxRedisAuth(), knox_tokens))
    user_cache = {"USER_CACHE": True, "USER_CACHE_TTL": 3600}
    scenarios.append(Scenario("knox_redis (USER_CACHE)", KnoxRedisAuth(), knox_tokens, knox_redis=user_cache))
    with knox_redis_settings_of(scenarios[-1]):
        for token in knox_tokens:  # every user's row cached (a first request each)
            scenarios[-1].auth.authenticate(_request(scenarios[-1], token))
    local = {**user_cache, "LOCAL_CACHE_SIZE": 2 * USERS}
    name = "knox_redis (USER_CACHE + LOCAL_CACHE_SIZE)"
    scenarios.append(Scenario(name, KnoxRedisAuth(), knox_tokens, knox_redis=local))

    # The user a hit returns: every column but the two USER_CACHE defers (password, last_login).
    columns = [f.attname for f in user_model._meta.concrete_fields if f.attname not in ("password", "last_login")]
    rows = {t[:15]: [u.__dict__[c] for c in columns] for t, u in zip(knox_tokens, users, strict=True)}
    known = AuthToken.objects.in_bulk(field_name="digest")

    class CeilingAuth(BaseAuthentication):
        """Builds the user and the token from a dict: the cost of DRF plus object building."""

        def authenticate(self, request: Any) -> tuple[Any, Any] | None:
            token = request.META["HTTP_AUTHORIZATION"].split()[1]
            values = rows[token[:15]]
            pk = values[0]
            user = user_model.from_db("default", columns, values)
            row = known_by_key[token[:15]]
            auth_token = AuthToken.from_db(
                "default",
                ["digest", "token_key", "user_id", "created", "expiry"],
                [row.digest, row.token_key, pk, row.created, row.expiry],
            )
            auth_token.user = user
            return user, auth_token

    known_by_key = {row.token_key: row for row in known.values()}
    scenarios.append(Scenario("ceiling (no I/O)", CeilingAuth(), knox_tokens))
    return scenarios


@contextmanager
def knox_redis_settings_of(scenario: Scenario) -> Iterator[None]:
    from knox_redis import cache
    from knox_redis.settings import knox_redis_settings

    default = settings.REST_KNOX_REDIS
    settings.REST_KNOX_REDIS = {**default, **scenario.knox_redis}
    knox_redis_settings.reload()
    local = bool(scenario.knox_redis.get("LOCAL_CACHE_SIZE"))
    try:
        if local:  # a client with an in-process cache: live, then warm
            cache.reset_client()
            deadline = time.monotonic() + 10
            while not cache.get_client().local_cache_live:
                assert time.monotonic() < deadline, "the tracking listener never went live"
                time.sleep(0.001)
            for token in scenario.tokens:
                scenario.auth.authenticate(_request(scenario, token))
        yield
    finally:
        settings.REST_KNOX_REDIS = default
        knox_redis_settings.reload()
        if local:
            cache.reset_client()


def _request(scenario: Scenario, token: str) -> Any:
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    return Request(APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"{scenario.header_prefix} {token}"))


def run_round(scenario: Scenario, calls: int, threads: int) -> Round:
    from knox_redis import cache

    with knox_redis_settings_of(scenario):
        return _run_round(scenario, calls, threads, lambda: _lookups(cache))


def _run_round(scenario: Scenario, calls: int, threads: int, lookups: Callable[[], int]) -> Round:
    """One round in this process: `calls` split over `threads`, each warmed first. The Redis
    lookups are `lookups()` after the round less before it, read once every thread is warm and
    before any starts, so the warm-up's own lookups don't count."""
    from django.db import connection, connections

    result = Round()
    lock = threading.Lock()
    per_thread = calls // threads
    warm_barrier = threading.Barrier(threads + 1)
    start_barrier = threading.Barrier(threads + 1)
    spans: list[tuple[float, float]] = []  # each thread's own clock: the main thread may wake late

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        requests = [_request(scenario, rng.choice(scenario.tokens)) for _ in range(per_thread)]
        counted = [0]

        def count(execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
            counted[0] += 1
            return execute(sql, params, many, context)

        latencies = []
        with connection.execute_wrapper(count):
            for request in requests[:20]:  # warm: this thread's connection, code paths
                scenario.auth.authenticate(request)
            counted[0] = 0
            warm_barrier.wait()
            start_barrier.wait()
            first = time.perf_counter()
            for request in requests:
                began = time.perf_counter()
                scenario.auth.authenticate(request)
                latencies.append(time.perf_counter() - began)
            last = time.perf_counter()
        with lock:
            result.queries += counted[0]
            result.latencies += latencies
            spans.append((first, last))
        connections.close_all()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    warm_barrier.wait()
    lookups_before = lookups()
    start_barrier.wait()
    for thread in pool:
        thread.join()
    result.seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    result.calls = per_thread * threads
    result.redis_lookups = lookups() - lookups_before
    return result


def _lookups(cache: Any) -> int:
    """Lookups that went to Redis (a hit from the in-process cache makes no call)."""
    stats = cache.get_client().stats()
    return stats["hits"] + stats["misses"] - stats.get("local_hits", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per scenario, round and thread count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    args = parser.parse_args()
    with django_and_redis(args.db) as (engine, _server):
        report(args, build_scenarios(), engine)


@contextmanager
def django_and_redis(db: str) -> Iterator[tuple[str, RedisServer]]:
    """Django configured for the benchmarks, on a database (bench.py's choice) and a
    redis-server of their own; both gone afterwards. Yields the database's name and the server."""
    server = RedisServer().start()
    database = open_database(db)
    try:
        configure(database.settings, server.url)
        yield database.engine, server
    finally:
        from django.db import connections

        connections.close_all()
        database.cleanup()
        server.stop()


def report(args: argparse.Namespace, scenarios: list[Scenario], engine: str) -> None:
    import platform
    from importlib.metadata import version

    print(
        f"Python {platform.python_version()}, Django {version('django')}, knox {version('django-rest-knox')}, "
        f"{engine}, {USERS} users, a random token per call, {args.rounds} interleaved rounds of "
        f"{args.calls} calls per scenario\n"
    )
    print(
        "| scenario | threads | calls/s (median) | x knox (median, min-max) | x ceiling (median) | queries/call "
        "| Redis lookups/call | p50 µs | p99 µs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in [int(t) for t in args.threads.split(",")]:
        rounds: dict[str, list[Round]] = {s.name: [] for s in scenarios}
        for number in range(args.rounds):
            order = scenarios if number % 2 == 0 else scenarios[::-1]
            for scenario in order:
                rounds[scenario.name].append(run_round(scenario, args.calls, threads))
        knox_rates = [r.calls / r.seconds for r in rounds["knox"]]
        ceiling_rates = [r.calls / r.seconds for r in rounds["ceiling (no I/O)"]]
        for scenario in scenarios:
            rs = rounds[scenario.name]
            rates = [r.calls / r.seconds for r in rs]
            ratios = sorted(rate / base for rate, base in zip(rates, knox_rates, strict=True))
            of_ceiling = statistics.median(rate / top for rate, top in zip(rates, ceiling_rates, strict=True))
            latencies = sorted(x for r in rs for x in r.latencies)
            calls = sum(r.calls for r in rs)
            print(
                f"| {scenario.name} | {threads} | {statistics.median(rates):,.0f} | "
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) | {of_ceiling:.2f} | "
                f"{sum(r.queries for r in rs) / calls:.2f} | {sum(r.redis_lookups for r in rs) / calls:.2f} | "
                f"{latencies[len(latencies) // 2] * 1e6:,.0f} | {latencies[int(len(latencies) * 0.99)] * 1e6:,.0f} |"
            )


if __name__ == "__main__":
    main()
