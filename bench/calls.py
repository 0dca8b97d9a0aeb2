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
- knox + django-cacheops: knox with cacheops caching both its queries in Redis (0 queries once
  warm, 2 GETs), if installed. In a process of its own (cacheops patches every QuerySet),
  on the same database and tokens, a round per request over a pipe. Its Redis lookups are
  the GETs the redis-server served during the round (INFO commandstats). After the table,
  one line says whether it accepts the token of a user just deactivated by save() or by
  QuerySet.update() (see deactivated_accepted).
- knox_redis (default): knox_redis.auth.TokenAuthentication, every token cached (1 query: the
  user).
- knox_redis (USER_CACHE): the same with USER_CACHE on, every user's row cached too (0 queries).
  USER_CACHE_TTL is an hour here so that rows don't lapse between rounds; with the default
  60 s each user costs one more query a minute.
- knox_redis (USER_CACHE, BUSY_POLL_US=0): the same, each Redis reply waited for asleep in
  poll() at once, as redis-rs and most clients do: what the default's busy polling (100 µs)
  buys, in the same run.
- knox_redis (USER_CACHE + LOCAL_CACHE_SIZE): and an in-process cache of 2,000 entries, warmed
  before each round (every token authenticated once): no network call at all.
- ceiling: an authentication class that builds the user and token objects in memory from a
  dict, no I/O at all: the most any cache could reach in this process. The user is the one a
  hit returns (every column but the password and last_login, which USER_CACHE defers); a
  user of fewer columns would query the database when a view reads the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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


def has_cacheops() -> bool:
    """Installed? (Importing cacheops needs settings configured: only look for it.)"""
    return importlib.util.find_spec("cacheops") is not None


def django_settings(database: dict[str, Any], redis_url: str) -> dict[str, Any]:
    apps = ["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "rest_framework.authtoken"]
    apps += ["knox", "knox_redis"]
    return {
        "SECRET_KEY": "bench-calls-" + "x" * 40,
        "DEBUG": False,
        "USE_TZ": True,
        "INSTALLED_APPS": apps,
        "DATABASES": {"default": database},
        "CACHES": {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url}},
        "REST_KNOX_REDIS": {"CACHE_ALIAS": "default"},
        "REST_KNOX": {"TOKEN_TTL": timedelta(hours=10), "AUTO_REFRESH": False},
        "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
        "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
        "SIMPLE_JWT": {"ACCESS_TOKEN_LIFETIME": timedelta(hours=10)},
        "LOGGING": {"version": 1, "loggers": {"knox_redis": {"level": "ERROR"}}},
    }


def configure(database: dict[str, Any], redis_url: str) -> None:
    settings.configure(**django_settings(database, redis_url))
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
    # Runs in a process of its own, a round per request, instead of in this one.
    remote: CacheopsProcess | None = None


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
    sleeping = {**user_cache, "BUSY_POLL_US": 0}
    name = "knox_redis (USER_CACHE, BUSY_POLL_US=0)"
    scenarios.append(Scenario(name, KnoxRedisAuth(), knox_tokens, knox_redis=sleeping))
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
    # A client built with this scenario's settings (those the native client takes, such as
    # BUSY_POLL_US and LOCAL_CACHE_SIZE, apply to a new one only).
    cache.reset_client()
    local = bool(scenario.knox_redis.get("LOCAL_CACHE_SIZE"))
    try:
        if local:  # a client with an in-process cache: live, then warm
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
        cache.reset_client()


def _request(scenario: Scenario, token: str) -> Any:
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    return Request(APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"{scenario.header_prefix} {token}"))


def run_round(scenario: Scenario, calls: int, threads: int) -> Round:
    if scenario.remote is not None:
        return scenario.remote.run_round(calls, threads)
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


CACHEOPS = "knox + django-cacheops"


def cacheops_settings(database: dict[str, Any], redis_url: str, cacheops_redis: str) -> dict[str, Any]:
    """django_settings with cacheops in front of knox's two queries, as a deployment of knox and
    cacheops alone would run it (no knox_redis app, whose receivers would add Redis calls to a
    user's save()). Both queries fetch the token model: the token by its token_key with
    select_related('user'), then that user's auth_token_set (knox's _cleanup_token, looking for
    expired tokens). The user model has a profile too ("get", as cacheops' README has it), so
    that its save() invalidates what cacheops tracks of it; but not a row that came through
    select_related (its README's CAVEATS, 3), which is how knox's user comes. An hour, so that
    nothing lapses between rounds."""
    base = django_settings(database, redis_url)
    return {
        **base,
        "INSTALLED_APPS": [app for app in base["INSTALLED_APPS"] if app != "knox_redis"] + ["cacheops"],
        "CACHEOPS_REDIS": cacheops_redis,
        "CACHEOPS": {"auth.user": {"ops": "get", "timeout": 3600}, "knox.authtoken": {"ops": "all", "timeout": 3600}},
    }


class CacheopsProcess:
    """knox + django-cacheops, in a Python process of its own: once installed, cacheops patches
    every QuerySet, so in this process it would stand in front of the other scenarios' queries
    too (plain knox must stay plain). Started once (Django set up on this database, every
    token's queries cached), it then runs a round per request over a pipe (a JSON line each
    way), so that its rounds cost no start-up and take their turns among the others'. It
    authenticates this process's knox tokens: the database keeps only their digests."""

    def __init__(self, server: RedisServer, tokens: list[str]) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--cacheops-process"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        setup = {
            "database": settings.DATABASES["default"],
            "redis_url": server.url,
            # Another db of the same redis-server: its keys apart from knox_redis's.
            "cacheops_redis": f"redis://127.0.0.1:{server.port}/1",
            "tokens": tokens,
        }
        try:
            self._ask(setup)  # answered once warm
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the {CACHEOPS} process ended (exit status {self.process.wait()}): its stderr above")
        return json.loads(answer)

    def run_round(self, calls: int, threads: int) -> Round:
        return Round(**self._ask({"calls": calls, "threads": threads}))

    def deactivated_accepted(self) -> dict[str, bool]:
        return self._ask({"deactivate": True})

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # its loop ends with its input
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still in a round this process gave up on
            self.process.kill()
            self.process.wait()


@contextmanager
def cacheops_process(server: RedisServer, tokens: list[str]) -> Iterator[CacheopsProcess | None]:
    """The knox + django-cacheops process, running until the end; None, with a note, if
    django-cacheops is not installed."""
    if not has_cacheops():
        print(f"{CACHEOPS}: skipped, django-cacheops is not installed (the [bench] extra)\n")
        yield None
        return
    process = CacheopsProcess(server, tokens)
    try:
        yield process
    finally:
        process.stop()


def serve_cacheops_rounds() -> None:
    """The other end of CacheopsProcess: Django with cacheops on the parent's database (no
    migrate: the parent made the tables, users and tokens), every token authenticated once,
    then an answer per request until the parent closes stdin."""
    answers, sys.stdout = sys.stdout, sys.stderr  # a stray print must not garble the answers
    setup = json.loads(sys.stdin.readline())
    settings.configure(**cacheops_settings(setup["database"], setup["redis_url"], setup["cacheops_redis"]))
    django.setup()
    from cacheops.redis import redis_client
    from knox.auth import TokenAuthentication as KnoxAuth

    scenario = Scenario(CACHEOPS, KnoxAuth(), setup["tokens"])
    for token in scenario.tokens:  # every token's queries cached (a first request each)
        scenario.auth.authenticate(_request(scenario, token))

    def gets() -> int:
        """GETs the redis-server has served: cacheops reads a cached query with one GET, and
        the parent, waiting for this round, sends none."""
        return redis_client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)

    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("deactivate"):
            answer: Any = deactivated_accepted(scenario)
        else:
            answer = asdict(_run_round(scenario, request["calls"], request["threads"], gets))
        print(json.dumps(answer), file=answers, flush=True)


def deactivated_accepted(scenario: Scenario) -> dict[str, bool]:
    """Is the token of a user just deactivated still accepted, with its queries cached? Once
    by save(), which cacheops sees (post_save of a model with a profile) but which invalidates
    no query that holds the user only through select_related, as knox's does; once by
    QuerySet.update(), which sends no signal at all. Each time the user is restored by save()."""
    from rest_framework.exceptions import AuthenticationFailed

    token = scenario.tokens[0]

    def accepted() -> bool:
        try:
            return scenario.auth.authenticate(_request(scenario, token)) is not None
        except AuthenticationFailed:
            return False

    user, _ = scenario.auth.authenticate(_request(scenario, token))
    found = {}
    for way in ("save", "update"):
        assert accepted(), "the token is not accepted before its user is deactivated"  # and cached
        if way == "save":
            user.is_active = False
            user.save()
        else:
            type(user).objects.filter(pk=user.pk).update(is_active=False)
        found[way] = accepted()
        user.is_active = True
        user.save()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per scenario, round and thread count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    parser.add_argument("--cacheops-process", action="store_true", help=argparse.SUPPRESS)  # CacheopsProcess
    args = parser.parse_args()
    if args.cacheops_process:
        serve_cacheops_rounds()
        return
    with django_and_redis(args.db) as (engine, server):
        scenarios = build_scenarios()
        knox_tokens = scenarios[0].tokens
        with cacheops_process(server, knox_tokens) as cacheops:
            if cacheops is not None:  # after the other alternatives, before knox_redis's modes
                ours = next(i for i, s in enumerate(scenarios) if s.name.startswith("knox_redis"))
                scenarios.insert(ours, Scenario(CACHEOPS, None, knox_tokens, remote=cacheops))
            report(args, scenarios, engine)
            if cacheops is not None:
                found = cacheops.deactivated_accepted()
                print(
                    f"\n{CACHEOPS}: a token of a user deactivated by save() accepted: {_yes_no(found['save'])}; "
                    f"by QuerySet.update(): {_yes_no(found['update'])}"
                )


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


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
