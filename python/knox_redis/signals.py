"""Revoke cached tokens on every ORM path by which a token row changes or leaves the database.

Instance and queryset deletes, the admin, and cascades from a deleted user all send
`pre_delete` for each token row (Django skips its fast-delete path when a receiver exists).
Receivers run even with CACHE_ENABLED False: a fleet may mix processes with and without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from knox_redis import cache

# The digest whose expiry this context is refreshing through knox's renew_token: that save
# only extends the token, and the caller re-caches it itself.
_refreshing: ContextVar[str | None] = ContextVar("knox_redis_refreshing", default=None)


@contextmanager
def refreshing(digest: str) -> Iterator[None]:
    reset = _refreshing.set(digest)
    try:
        yield
    finally:
        _refreshing.reset(reset)


def revoke_before_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    if cache.already_revoked(instance.digest):
        return
    try:
        cache.revoke([instance], using=using)
    except cache.RevocationUnavailable:
        # A token the database holds as expired is rejected by every reader of its record
        # (a record's expiry is never later than the row's), so it may go without Redis:
        # knox's cleanup of expired tokens never becomes a 503.
        if not cache.expired_in_database(instance, using):
            raise
        cache.logger.info("knox_redis: deleting expired token %s without Redis", instance.token_key)


def revoke_before_update(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    """An edited token (say, a shorter expiry set in the admin) must be re-read."""
    if instance._state.adding or _refreshing.get() == instance.digest:
        return
    cache.revoke([instance], using=using)


def mark_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    # Tells auth.TokenAuthentication that renew_token wrote the new expiry.
    if not created and _refreshing.get() == instance.digest:
        instance.__dict__["_knox_redis_saved"] = True
