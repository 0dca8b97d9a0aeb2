"""Small helpers the test modules share."""

from __future__ import annotations

import threading
from typing import Any

from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from knox.models import AuthToken
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from knox_redis.auth import TokenAuthentication
from tests.conftest import auth_header

factory = APIRequestFactory()


def authenticate(token: str, cls: type = TokenAuthentication) -> Any:
    return cls().authenticate(factory.get("/", **auth_header(token)))


def accepted(token: str, cls: type = TokenAuthentication) -> bool:
    try:
        return authenticate(token, cls) is not None
    except AuthenticationFailed:
        return False


def whoami(client: Any, token: str) -> int:
    """The status of a request with the token through the test API: 200 accepted, 401 refused."""
    return client.get("/api/whoami/", **auth_header(token)).status_code


def queries_of(fn: Any) -> tuple[Any, list[str]]:
    """fn's result and the SQL it sent to the default database."""
    with CaptureQueriesContext(connection) as ctx:
        result = fn()
    return result, [q["sql"] for q in ctx.captured_queries]


def record_field(token: str) -> tuple[str, str]:
    """The Redis key and hash field of the token's cached record."""
    row = AuthToken.objects.get(token_key=token[:15])
    return f"knox:token:{token[:15]}", f"r:{row.digest[:32]}"


def record_exists(redis_conn: Any, token: str) -> bool:
    return any(f.startswith(b"r:") for f in redis_conn.hkeys(f"knox:token:{token[:15]}"))


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict]:
    """Run fn in a thread with its own database connection; return (thread, result box)."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box
