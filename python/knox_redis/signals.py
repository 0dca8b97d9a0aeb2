"""Revoke cached tokens on every ORM path by which a token row changes or leaves the database.

Instance and queryset deletes, the admin, and cascades from a deleted user all send
`pre_delete` for each token row (Django skips its fast-delete path when a receiver exists);
saves send `pre_save`. Receivers are connected for the token model and its proxies, and run
even with CACHE_ENABLED False: a fleet may mix processes with and without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from knox_redis import cache

# The digest whose expiry knox's renew_token is saving in this context: that save only
# extends the token, and the authentication class re-caches it itself.
_refreshing: ContextVar[str | None] = ContextVar("knox_redis_refreshing", default=None)


@contextmanager
def refreshing(digest: str) -> Iterator[None]:
    reset = _refreshing.set(digest)
    try:
        yield
    finally:
        _refreshing.reset(reset)


# The columns a record holds: a save that touches none of them leaves the record true.
RECORD_FIELDS = frozenset({"digest", "token_key", "user", "user_id", "created", "expiry"})


def revoke_before_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    if cache.already_revoked(instance.digest):
        return
    try:
        # A token that looks expired can go without Redis if the database agrees: don't make
        # knox's cleanup wait on a Redis known to be down.
        cache.revoke([instance], using=using, fail_fast=cache.looks_expired(instance))
    except cache.RevocationUnavailable:
        # A token the database holds as expired is rejected by every reader of its record
        # (a record's expiry is never later than the row's), so it may go without Redis:
        # knox's cleanup of expired tokens never becomes a 503. The row stays locked until
        # the delete commits, so a refresh can't slip in between.
        if not cache.expired_in_database(instance, using):
            raise
        cache.logger.info("knox_redis: deleting expired token %s without Redis", instance.token_key)


def revoke_before_update(sender: Any, instance: Any, using: str, update_fields: Any = None, **kwargs: Any) -> None:
    """A token row about to change (an admin edit, a save over an existing digest) is revoked
    as the database holds it, so its record, under its old token_key too, can't outlive it."""
    if _refreshing.get() == instance.digest:
        return
    if update_fields is not None and not RECORD_FIELDS.intersection(update_fields):
        return  # e.g. a custom model's last_used: the record still says the truth
    current = type(instance)._base_manager.using(using).filter(pk=instance.pk).first()
    if current is None:
        return  # an insert: nothing can be cached yet
    changed = [current] if current.token_key == instance.token_key else [current, instance]
    cache.revoke(changed, using=using)


def mark_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    # Tells auth.TokenAuthentication that renew_token wrote the new expiry.
    if not created and _refreshing.get() == instance.digest:
        instance.__dict__["_knox_redis_saved"] = True
