"""The main job, end to end: SQLite, a Redis this script starts, knox_redis in front of knox.

Logs in, makes authenticated requests (showing cache hits and database queries for each),
logs out, and shows the token rejected. Run with `make demo`.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from tests.servers import RedisServer  # noqa: E402

redis_server = RedisServer().start()
workdir = tempfile.mkdtemp(prefix="knox-redis-demo-")
settings.configure(
    SECRET_KEY="demo",
    USE_TZ=True,
    TIME_ZONE="UTC",
    LOGGING={"version": 1, "loggers": {"django.request": {"level": "ERROR"}}},
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF="demo.urls",
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "knox", "knox_redis"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{workdir}/demo.sqlite3"}},
    CACHES={"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_server.url}},
    REST_KNOX_REDIS={"CACHE_ALIAS": "default", "REDIS_KEY_PREFIX": "knox"},
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": [
            "rest_framework.authentication.BasicAuthentication",
            "knox_redis.auth.TokenAuthentication",
        ],
        "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    },
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    DEBUG=True,
)
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from knox_redis import cache  # noqa: E402


def main() -> None:
    call_command("migrate", verbosity=0)
    get_user_model().objects.create_user("demo", password="demo-password")
    client = Client()
    redis = cache.get_client()
    print(f"redis-server on port {redis_server.port}, SQLite at {workdir}/demo.sqlite3\n")

    basic = base64.b64encode(b"demo:demo-password").decode()
    response = client.post("/api/login/", HTTP_AUTHORIZATION=f"Basic {basic}")
    token = response.json()["token"]
    print(
        f"POST /api/login/            -> {response.status_code}, token {token[:8]}... "
        f"expires {response.json()['expiry']}"
    )

    header = {"HTTP_AUTHORIZATION": f"Token {token}"}
    print(f"\n{'request':27} {'status':>6} {'cache':>6} {'DB queries':>11} {'time':>9}")
    for i in range(6):
        before = redis.stats()
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = client.get("/api/whoami/", **header)
            elapsed = (time.perf_counter() - started) * 1000
        after = redis.stats()
        outcome = "hit" if after["hits"] > before["hits"] else "miss"
        print(
            f"GET /api/whoami/ #{i + 1:<10} {response.status_code:>6} {outcome:>6} {len(queries):>11} {elapsed:>7.2f}ms"
        )
    print("  (the login cached the new token once it committed, so even the first request is a hit:")
    print("   no token row is read, only the user by primary key, so a deactivated user is refused)")

    keys = sorted(k.decode() for k in _raw_redis().keys("knox:*"))
    print(f"\nRedis keys: {keys}")

    response = client.post("/api/logout/", **header)
    print(f"\nPOST /api/logout/           -> {response.status_code}")
    response = client.get("/api/whoami/", **header)
    print(f"GET /api/whoami/ after logout -> {response.status_code} {response.json()}")
    print(f"\nnative client counters: {redis.stats()}")
    print("(hits/misses count lookups; the logout request is a hit too)")


def _raw_redis():
    import redis as redis_py

    return redis_py.Redis(port=redis_server.port)


if __name__ == "__main__":
    try:
        main()
    finally:
        redis_server.stop()
