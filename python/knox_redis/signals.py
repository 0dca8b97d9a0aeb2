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
    # An expired token is rejected by every reader of its record, so revoking it may fail
    # without refusing the delete: knox's cleanup of expired tokens never becomes a 503.
    cache.revoke([instance], required=not cache.is_expired(instance), using=using)


def revoke_before_update(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    """An edited token (say, a shorter expiry set in the admin) must be re-read."""
    if instance._state.adding:
        return
    if _refreshing.get() == instance.digest:
        return
    cache.revoke([instance], required=not cache.is_expired(instance), using=using)


def mark_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    # Tells auth.TokenAuthentication that renew_token wrote the new expiry.
    if not created and _refreshing.get() == instance.digest:
        instance.__dict__["_knox_redis_saved"] = True
