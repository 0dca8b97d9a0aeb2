"""Redis memory per cached token: `used_memory` growth / N, through the product's own paths.

For 1,000 users with 1 and with 10 tokens each: every token authenticated twice (the first
request fills the cache, the second is a hit), then all deleted through the ORM (each
revocation leaves a generation and a tombstone behind for REVOCATION_TOMBSTONE_TTL). Where the
release has USER_CACHE, each user's row is then cached too (a request with USER_CACHE on), and
its growth / users is the bytes per cached user row (the stock user model, short names).
Starts its own redis-server and uses SQLite in a temporary directory. With the previous
release built (`python -m tests.previous_release`), the same script runs under it too, so
both layouts are measured in one run:

    .venv/bin/python bench/memory.py [--users 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer  # noqa: E402


def measure(users: int, tokens_per_user: int, redis_port: int) -> dict[str, float]:
    import redis as redis_py
    from django.contrib.auth import get_user_model
    from knox.models import AuthToken
    from rest_framework.test import APIRequestFactory

    from knox_redis.auth import TokenAuthentication

    raw = redis_py.Redis(port=redis_port)
    factory = APIRequestFactory()
    auth = TokenAuthentication()
    AuthToken.objects.all().delete()
    get_user_model().objects.all().delete()
    # Warm up first, so that what is measured is per token: the scripts loaded, the Lua
    # engine and the connections' buffers allocated (fixed costs, some 100 KB).
    warm_user = get_user_model().objects.create_user(username="warm-up")
    warm_token = AuthToken.objects.create(user=warm_user)[1]
    for _ in range(2):
        auth.authenticate(factory.get("/", HTTP_AUTHORIZATION=f"Token {warm_token}"))
    AuthToken.objects.all().delete()
    tokens = []
    for u in range(users):
        user = get_user_model().objects.create_user(username=f"u{u}")
        tokens += [AuthToken.objects.create(user=user)[1] for _ in range(tokens_per_user)]
    raw.flushall()
    base = raw.info("memory")["used_memory"]
    for token in tokens:
        for _ in range(2):
            auth.authenticate(factory.get("/", HTTP_AUTHORIZATION=f"Token {token}"))
    cached = raw.info("memory")["used_memory"]
    keys = raw.dbsize()
    user_rows = cached
    if _has_user_cache():
        with _user_cache():
            for token in tokens[::tokens_per_user]:  # one token of each user
                auth.authenticate(factory.get("/", HTTP_AUTHORIZATION=f"Token {token}"))
        user_rows = raw.info("memory")["used_memory"]
    AuthToken.objects.all().delete()
    revoked = raw.info("memory")["used_memory"] - (user_rows - cached)
    n = len(tokens)
    return {
        "tokens": n,
        "keys": keys,
        "bytes_per_token": (cached - base) / n,
        "bytes_per_revoked_token": (revoked - base) / n,
        "bytes_per_user_row": (user_rows - cached) / users if user_rows != cached else None,
    }


def _has_user_cache() -> bool:
    from knox_redis.settings import DEFAULTS

    return "USER_CACHE" in DEFAULTS


@contextmanager
def _user_cache() -> Iterator[None]:
    from django.conf import settings

    from knox_redis.settings import knox_redis_settings

    before = settings.REST_KNOX_REDIS
    settings.REST_KNOX_REDIS = {**before, "USER_CACHE": True}
    knox_redis_settings.reload()
    try:
        yield
    finally:
        settings.REST_KNOX_REDIS = before
        knox_redis_settings.reload()


def configure(redis_port: int, db_path: str) -> None:
    import django
    from django.conf import settings
    from django.core.management import call_command

    settings.configure(
        SECRET_KEY="bench-memory",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "knox", "knox_redis"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path}},
        CACHES={
            "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": f"redis://127.0.0.1:{redis_port}/0"}
        },
        REST_KNOX_REDIS={"CACHE_ALIAS": "default"},
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    call_command("migrate", verbosity=0)


def run_here(users: int, redis_port: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        configure(redis_port, str(Path(tmp) / "memory.sqlite3"))
        return [{"tokens_per_user": k, **measure(users, k, redis_port)} for k in (1, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # run by the parent under another release's interpreter
        print(json.dumps(run_here(args.users, args.child)))
        return

    from tests import previous_release

    server = RedisServer().start()
    try:
        import redis as redis_py

        version = redis_py.Redis(port=server.port).info("server")["redis_version"]
        releases = {"this release": [sys.executable]}
        if previous_release.available() is None:
            releases[f"previous release ({previous_release.PREVIOUS_RELEASE})"] = [str(previous_release.PYTHON)]
        results = {}
        for name, python in releases.items():
            out = subprocess.run(
                [*python, __file__, "--users", str(args.users), "--child", str(server.port)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        server.stop()
    print(f"Redis {version}, {args.users} users, used_memory growth / tokens\n")
    print(
        "| release | tokens per user | bytes per cached token | bytes per revoked token (tombstone) "
        "| bytes per cached user row (USER_CACHE) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        for row in rows:
            user_row = row.get("bytes_per_user_row")
            print(
                f"| {name} | {row['tokens_per_user']} | {row['bytes_per_token']:.0f} | "
                f"{row['bytes_per_revoked_token']:.0f} | {'-' if user_row is None else f'{user_row:.0f}'} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"redis_version": version, "users": args.users, "results": results}))


if __name__ == "__main__":
    main()
