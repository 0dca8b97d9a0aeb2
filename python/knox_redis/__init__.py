"""django-rest-knox-redis: a Redis cache for django-rest-knox token authentication.

For writes that bypass Django signals (raw SQL, ``QuerySet.update``, another service):
``invalidate_token``, ``invalidate_user_tokens`` and, with USER_CACHE, ``invalidate_user``.
This process's counters: ``stats()``; for Prometheus: ``knox_redis.metrics``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "invalidate_token", "invalidate_user", "invalidate_user_tokens", "stats"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from knox_redis._knox_redis import __version__

        return __version__
    if name == "metrics":  # `knox_redis.metrics.view` without importing the submodule first
        import importlib

        return importlib.import_module("knox_redis.metrics")
    raise AttributeError(name)


def stats() -> dict[str, Any]:
    """This process's counters since it started (or was forked), by the names the README's
    "Metrics" table lists: lookups by outcome, fills, revocations, Redis errors by kind, the
    circuit breaker, connections, and the latency histogram of Redis calls. Never connects to
    Redis."""
    from knox_redis import cache

    return cache.metrics()


def invalidate_token(token: Any) -> None:
    """Drop one token (an AuthToken instance) from the cache; it is re-read on next use.

    Raises knox_redis.cache.RevocationUnavailable if Redis can't be reached.
    """
    from knox_redis import cache

    cache.revoke([token])


def invalidate_user_tokens(user: Any) -> None:
    """Drop every cached token of `user` (a user instance or primary key).

    Covers tokens still in the database and tokens only Redis remembers (rows already gone).
    Raises knox_redis.cache.RevocationUnavailable if Redis can't be reached.
    """
    from knox.models import get_token_model

    from knox_redis import cache

    user_pk = getattr(user, "pk", user)
    tokens = list(get_token_model()._base_manager.filter(user_id=user_pk))
    cache.revoke(tokens, users=[user_pk])


def invalidate_user(user: Any, *, using: str | None = None) -> None:
    """Drop the cached row of `user` (a user instance or primary key) (USER_CACHE): the next
    request builds the user from the database. Call it after changing users in ways that send
    no signal (``QuerySet.update``, raw SQL); inside a transaction, it is sent again after
    commit (on `using`, the database the change was written to: by default the user model's
    write database). Without it, such a change is seen within USER_CACHE_TTL.

    Raises knox_redis.cache.RevocationUnavailable if Redis can't be reached.
    """
    from django.db import router

    from knox_redis import cache, users

    pks = [getattr(user, "pk", user)]
    using = using or router.db_for_write(users.token_models()[1])
    cache.finish_user_revocation(pks, cache.revoke([], user_rows=pks, using=using, after_commit=False), using)
