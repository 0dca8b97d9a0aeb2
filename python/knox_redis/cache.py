"""The one adapter between Django and the native Redis client (``knox_redis._knox_redis``).

Policy lives here, in one place:
- reads and fills fail open: if Redis is slow or down, authentication goes to the database;
- revocations fail closed: if Redis can't be told that a live token is gone, the deletion is
  refused (503), so no process can keep accepting it from a stale record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from functools import partial
from typing import Any

from django.conf import settings
from django.db import router, transaction
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import APIException

from knox.models import get_token_model

from knox_redis import _knox_redis
from knox_redis._knox_redis import CacheError
from knox_redis.settings import knox_redis_settings, redis_target

logger = logging.getLogger("knox_redis")

_EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


class RevocationUnavailable(APIException):
    """Redis could not be told that a live token is revoked, so the token was kept."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Token revocation is temporarily unavailable; please retry."
    default_code = "revocation_unavailable"


@dataclass(frozen=True)
class CachedToken:
    user_pk: int | str
    created: datetime
    expiry: datetime | None
    fresh_until: datetime


@dataclass(frozen=True)
class Lookup:
    """What Redis knows about a token: its record, if any, and the generation a fill needs."""

    record: CachedToken | None
    generation: str


# --- the client -------------------------------------------------------------------------

_client: _knox_redis.TokenCache | None = None
_client_lock = threading.Lock()


def get_client() -> _knox_redis.TokenCache:
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                target = redis_target()
                _client = _knox_redis.TokenCache(
                    host=target.host,
                    port=target.port,
                    unix_path=target.unix_path,
                    db=target.db,
                    username=target.username,
                    password=target.password,
                    tls=target.tls,
                    tls_ca_certs=target.tls_ca_certs,
                    key_prefix=knox_redis_settings.REDIS_KEY_PREFIX,
                    connect_timeout=float(knox_redis_settings.SOCKET_CONNECT_TIMEOUT),
                    socket_timeout=float(knox_redis_settings.SOCKET_TIMEOUT),
                    breaker_cooldown=float(knox_redis_settings.CIRCUIT_BREAKER_COOLDOWN),
                    max_idle=int(knox_redis_settings.MAX_IDLE_CONNECTIONS),
                    lease_ms=int(knox_redis_settings.REVOCATION_TOMBSTONE_TTL * 1000),
                )
            client = _client
    return client


def reset_client() -> None:
    global _client
    with _client_lock:
        if _client is not None:
            _client.reset()
        _client = None


# --- fail-open logging ------------------------------------------------------------------

_last_warning: dict[str, float] = {}
WARNING_INTERVAL = 10.0


def _warn(operation: str, exc: BaseException) -> None:
    """Log a Redis failure at most once per WARNING_INTERVAL per operation."""
    now = time.monotonic()
    if now - _last_warning.get(operation, -WARNING_INTERVAL) >= WARNING_INTERVAL:
        _last_warning[operation] = now
        logger.warning("knox_redis: %s failed, using the database: %s", operation, exc)
    else:
        logger.debug("knox_redis: %s failed: %s", operation, exc)


# --- time -------------------------------------------------------------------------------


def to_us(value: datetime) -> int:
    if timezone.is_naive(value):
        value = timezone.make_aware(value)
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    moment = _EPOCH + value * _MICROSECOND
    return moment if settings.USE_TZ else timezone.make_naive(moment)


# --- reads and fills (fail open) --------------------------------------------------------


def lookup(token_key: str, digest: str) -> Lookup | None:
    """One round trip; None when Redis can't answer (the caller uses the database alone)."""
    try:
        raw, generation = get_client().lookup(token_key, digest)
    except CacheError as exc:
        _warn("lookup", exc)
        return None
    record = None
    if raw is not None:
        user_pk, created_us, expiry_us, fresh_until_us = raw
        record = CachedToken(
            user_pk=user_pk,
            created=from_us(created_us),
            expiry=None if expiry_us is None else from_us(expiry_us),
            fresh_until=from_us(fresh_until_us),
        )
    return Lookup(record, generation)


def store(token: Any, generation: str) -> None:
    """Cache a token row this request read (or wrote) in the database.

    Outside a transaction the row is committed data, read after `generation` was: fill now.
    Inside one, the row may be uncommitted or from an old snapshot: after commit, read it
    again under a new lookup and fill from that.
    """
    using = router.db_for_write(type(token), instance=token)
    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(partial(_refill, token.token_key, token.digest, using), using=using)
    else:
        _fill(token, generation)


def store_refreshed(token: Any, generation: str) -> None:
    """Cache a token whose new expiry this request just saved (UPDATE matched its row)."""
    using = router.db_for_write(type(token), instance=token)
    # The UPDATE proved the row exists; the generation, read before it, proves no revocation
    # started since. Only the commit is missing.
    transaction.on_commit(partial(_fill, token, generation), using=using)


def _refill(token_key: str, digest: str, using: str) -> None:
    found = lookup(token_key, digest)
    if found is None:
        return
    token = get_token_model()._base_manager.using(using).filter(digest=digest).first()
    if token is not None:
        _fill(token, found.generation)


def _fill(token: Any, generation: str) -> bool:
    now = timezone.now()
    fresh_until = now + timedelta(seconds=knox_redis_settings.MAX_CACHE_TTL)
    if token.expiry is not None:
        if token.expiry <= now:
            return False
        fresh_until = min(fresh_until, token.expiry)
    ttl_ms = max(1, int((fresh_until - now).total_seconds() * 1000))
    try:
        return get_client().fill(
            token.token_key,
            token.digest,
            generation,
            _user_pk(token.user_id),
            to_us(token.created),
            None if token.expiry is None else to_us(token.expiry),
            to_us(fresh_until),
            ttl_ms,
        )
    except CacheError as exc:
        _warn("fill", exc)
        return False


def _user_pk(pk: Any) -> int | str:
    return pk if isinstance(pk, int) and not isinstance(pk, bool) else str(pk)


# --- revocation (fails closed) ----------------------------------------------------------

# Digests this context already revoked in one batch (logoutall): their per-row pre_delete
# signals need no second round trip.
_already_revoked: ContextVar[frozenset[str]] = ContextVar("knox_redis_already_revoked", default=frozenset())


def already_revoked(digest: str) -> bool:
    return digest in _already_revoked.get()


def revoke(tokens: Iterable[Any], *, users: Iterable[Any] = (), required: bool, using: str | None = None) -> None:
    """Revoke cached tokens before their rows change or go; again after commit.

    With `required`, a failure raises RevocationUnavailable (the caller's transaction rolls
    back, the token stays valid everywhere). Without it, the failure is only logged: callers
    pass required=False only for tokens that every cache reader already rejects (expired).
    """
    entries = [(t.token_key, t.digest, _user_pk(t.user_id)) for t in tokens]
    user_pks = [_user_pk(pk) for pk in users]
    if not entries and not user_pks:
        return
    tombstone_ms = int(knox_redis_settings.REVOCATION_TOMBSTONE_TTL * 1000)
    try:
        get_client().revoke(entries, user_pks, tombstone_ms)
    except CacheError as exc:
        if required:
            logger.error("knox_redis: refusing to revoke tokens while Redis is unreachable: %s", exc)
            raise RevocationUnavailable() from exc
        _warn("revoke", exc)
        return
    # After commit, revoke once more without a tombstone: a reader that looked the token up
    # after the first revocation but read the row before the commit can't fill it now.
    if using is None:
        using = router.db_for_write(get_token_model())
    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(partial(_revoke_quietly, entries, user_pks), using=using)


def _revoke_quietly(entries: list[tuple[str, str, int | str]], user_pks: list[int | str]) -> None:
    try:
        get_client().revoke(entries, user_pks, 0)
    except CacheError as exc:
        # The tombstone written before the delete still blocks stale fills for its lifetime.
        _warn("revoke after commit", exc)


@contextmanager
def revoking_all_tokens_of(user: Any) -> Iterator[None]:
    """Revoke every token of `user` in one round trip, then run the block that deletes them.

    The tokens are read from the database (cached or not: one may be mid-fill right now),
    plus whatever the user's index in Redis lists.
    """
    token_model = get_token_model()
    using = router.db_for_write(token_model)
    with transaction.atomic(using=using):
        tokens = list(
            token_model._base_manager.using(using)
            .filter(user=user)
            .only("digest", "token_key", "user_id", "expiry")
        )
        revoke(tokens, users=[user.pk], required=True, using=using)
        reset = _already_revoked.set(_already_revoked.get() | {t.digest for t in tokens})
        try:
            yield
        finally:
            _already_revoked.reset(reset)


def is_expired(token: Any) -> bool:
    return token.expiry is not None and token.expiry < timezone.now()
