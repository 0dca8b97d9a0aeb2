"""Revoke cached tokens on every ORM path by which a token row changes or leaves the database,
and cache the ones it inserts.

Instance and queryset deletes, the admin, and cascades from a deleted user all send
`pre_delete` for each token row (Django skips its fast-delete path when a receiver exists);
saves send `pre_save`, and a new row's `post_save` caches it once committed (write-through:
the first request after a login is a hit). Receivers are connected for the token model and
its proxies, and revoke even with CACHE_ENABLED False: a fleet may mix processes with and
without it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

from django.db.models import Model

from knox_redis import cache, users
from knox_redis.settings import knox_redis_settings

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
        # Never a token_key in a log line: it is the token's first 15 characters.
        cache.logger.info("knox_redis: deleting an expired token without Redis")


def revoke_before_update(sender: Any, instance: Any, using: str, update_fields: Any = None, **kwargs: Any) -> None:
    """A token row about to change (an admin edit, a save over an existing digest) is revoked
    as the database holds it, so its record, under its old token_key too, can't outlive it."""
    if _refreshing.get() == instance.digest:
        return
    if update_fields is not None and not RECORD_FIELDS.intersection(update_fields):
        return  # e.g. a custom model's last_used: the record still says the truth
    if instance._state.adding and _inserting_only(instance):
        # QuerySet.create (every login): an INSERT can't overwrite a cached row, so no read;
        # claim the new token's lease for the write-through after commit instead.
        cache.claim_new_token(instance)
        return
    current = type(instance)._base_manager.using(using).filter(pk=instance.pk).first()
    if current is None:
        return  # an insert: nothing can be cached yet
    changed = [current] if current.token_key == instance.token_key else [current, instance]
    cache.revoke(changed, using=using)


def after_save(sender: Any, instance: Any, created: bool, using: str, raw: bool = False, **kwargs: Any) -> None:
    if created and not raw:
        cache.cache_new_token(instance, using)
    elif _refreshing.get() == instance.digest:
        # Tells auth.TokenAuthentication that renew_token wrote the new expiry.
        instance.__dict__["_knox_redis_saved"] = True


# --- user rows (USER_CACHE) -------------------------------------------------------------
# Connected for the user model, its proxies and multi-table children, and every model that
# shares a multi-table parent with it (a save of the parent row changes the user's columns):
# see apps.py.


def revoke_user_row_before_save(
    sender: Any, instance: Any, using: str, update_fields: Any = None, **kwargs: Any
) -> None:
    """A user row about to change: its cached copy is revoked first, as a token's record is
    before a logout, so once the save returns no process builds the user from the old row."""
    if update_fields is not None and not _cached_columns().intersection(update_fields):
        return  # a login's last_login, a password change, a child's own column: nothing cached
    pks = _user_rows_of(instance)
    # An INSERT can't change a cached row; but with multi-table parents, force_insert covers
    # the child's table only (a child created over an existing user UPDATEs the user's row).
    if not pks or (instance._state.adding and not instance._meta.parents and _inserting_only(instance)):
        return
    tombstone = _revoke_user_rows(pks, using, after_commit=False)
    if tombstone:
        instance.__dict__[_USER_TOMBSTONE] = (pks, tombstone)


def finish_user_row_revocation(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    """After the UPDATE: once it commits, revoke again and lift the tombstone (see
    cache.finish_user_revocation), or the user would go uncached for a whole lease."""
    pending = instance.__dict__.pop(_USER_TOMBSTONE, None)
    if pending is not None:
        pks, tombstone = pending
        cache.finish_user_revocation(pks, tombstone, using)


def revoke_user_row_before_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    pks = _user_rows_of(instance)
    if pks:
        _revoke_user_rows(pks, using)


_USER_TOMBSTONE = "_knox_redis_user_tombstone"


def _user_rows_of(instance: Any) -> list[Any]:
    """The user rows a write of `instance` may change: its own, and, through multi-table
    parents, each parent's (saved under the parent's pk attname, which `child.pk = None`
    doesn't clear)."""
    pks = [instance.pk, *(getattr(instance, parent._meta.pk.attname) for parent in instance._meta.get_parent_list())]
    return list(dict.fromkeys(pk for pk in pks if pk is not None))


def _cached_columns() -> frozenset[str]:
    return _columns_of(_user_model())


@lru_cache(maxsize=8)
def _columns_of(model: type[Model]) -> frozenset[str]:
    return frozenset(name for field in users.cached_fields(model) for name in (field.name, field.attname))


def _user_model() -> Any:
    return users.token_models()[1]


def _revoke_user_rows(pks: list[Any], using: str, *, after_commit: bool = True) -> str:
    if knox_redis_settings.USER_CACHE:
        # Refused (503) if Redis can't be told, exactly as a logout is.
        return cache.revoke([], user_rows=pks, using=using, after_commit=after_commit)
    # This process caches no user rows, but others may (a rollout turning USER_CACHE on): tell
    # Redis (not through the breaker: a recent failed lookup says nothing about now), but go
    # on without it. A user save then waits at most one timeout.
    try:
        return cache.revoke([], user_rows=pks, using=using, quiet=True, after_commit=after_commit)
    except cache.RevocationUnavailable:
        return ""


_SAVE_BASE = Model.save_base.__code__


def _inserting_only(instance: Any) -> bool:
    """Is this save an INSERT that can't touch an existing row (QuerySet.create, or
    save(force_insert=True))? Then the SELECT that revoke_before_update needs for an edit is
    not, and a login costs knox's queries, no more.

    pre_save doesn't say; Model.save_base, which sends it, holds force_insert: it is found a
    few frames up. If it can't be (a save_base overridden, another Django), False: the caller
    reads the row, as for any save."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code is _SAVE_BASE and frame.f_locals.get("self") is instance:
            return bool(frame.f_locals.get("force_insert"))
        frame = frame.f_back
    return False
