"""pytest plugin that runs knox's own tests against knox_redis.

- `knox.auth.TokenAuthentication` is replaced by ours before knox's test modules import it,
  and the URL names they use point at our views.
- Two modes (KNOX_SUITE_MODE). "as-written": knox's TestCase classes unchanged; their
  transaction never commits, so knox_redis looks every token up but never fills (it caches
  committed rows only). "transactional": TestCase runs as TransactionTestCase, so requests after
  the first really are served from Redis; the session fails if none was. With
  KNOX_SUITE_USER_CACHE=1 (USER_CACHE on), it also fails if no user was built from a cached row;
  KNOX_SUITE_LOCAL_CACHE=1 turns LOCAL_CACHE_SIZE on as well.
"""

from __future__ import annotations

import os

import pytest

from tests import installed
from tests.servers import RedisServer

_server = RedisServer()
TRANSACTIONAL = os.environ.get("KNOX_SUITE_MODE", "as-written") == "transactional"
USER_CACHE = os.environ.get("KNOX_SUITE_USER_CACHE") == "1"
LOCAL_CACHE = os.environ.get("KNOX_SUITE_LOCAL_CACHE") == "1"


def pytest_configure(config: pytest.Config) -> None:
    import django.test
    import rest_framework.test
    from django.conf import settings

    try:
        installed.check()  # CI: the installed wheel, not the source tree
    except RuntimeError as exc:
        raise pytest.UsageError(str(exc)) from None
    _server.start()
    settings.CACHES["redis"]["LOCATION"] = _server.url

    import knox.auth

    from knox_redis.auth import TokenAuthentication

    knox.auth.TokenAuthentication = TokenAuthentication
    if TRANSACTIONAL:
        django.test.TestCase = django.test.TransactionTestCase
        rest_framework.test.APITestCase = rest_framework.test.APITransactionTestCase


def pytest_unconfigure(config: pytest.Config) -> None:
    _server.stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [installed.check()]


@pytest.fixture(autouse=True)
def _fresh_redis() -> None:
    import redis

    from knox_redis import cache

    redis.Redis(port=_server.port).flushall()
    cache.reset_client()
    yield
    stats = cache.get_client().stats()
    _totals["hits"] += stats["hits"]
    _totals["fills"] += stats["fills"]
    _totals["user_hits"] += stats["user_hits"]
    _totals["local_hits"] += stats.get("local_hits", 0)


_totals = {"hits": 0, "fills": 0, "user_hits": 0, "local_hits": 0}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    mode = ("transactional" if TRANSACTIONAL else "as-written") + (", USER_CACHE" if USER_CACHE else "")
    mode += ", LOCAL_CACHE_SIZE" if LOCAL_CACHE else ""
    print(
        f"\nknox suite ({mode}) with knox_redis: cache hits {_totals['hits']}, fills {_totals['fills']}, "
        f"users built from cached rows {_totals['user_hits']}, in-process hits {_totals['local_hits']}"
    )
    if TRANSACTIONAL and exitstatus == 0 and session.testscollected and _totals["hits"] == 0:
        print("knox suite: no request was served from the cache; the swap did not take effect")
        session.exitstatus = 1
    if TRANSACTIONAL and USER_CACHE and exitstatus == 0 and session.testscollected and _totals["user_hits"] == 0:
        print("knox suite: USER_CACHE is on but no user was built from a cached row")
        session.exitstatus = 1
