"""Small helpers the test modules share."""

from __future__ import annotations

import threading
from typing import Any

from django.db import connections
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
