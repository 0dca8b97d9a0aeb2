"""The one adapter between Django and the native Redis client (``knox_redis._knox_redis``).

Policy lives here, in one place:
- reads and fills fail open: if Redis is slow, down or misconfigured, authentication goes to
  the database (misconfiguration is also reported by `manage.py check`);
- revocations fail closed: if Redis can't be told that a live token is gone, the deletion is
  refused (503), so no process can keep accepting it from a stale record.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from functools import lru_cache, partial
from typing import Any, NamedTuple

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import router, transaction
from django.db.models import F
from django.utils import timezone
from knox.models import get_token_model
from knox.settings import knox_settings
from rest_framework import status
from rest_framework.exceptions import APIException

from knox_redis import _knox_redis
from knox_redis._knox_redis import CacheError, CacheUnavailable  # noqa: F401  (re-exported: checks)
from knox_redis.settings import knox_redis_settings, redis_target
from knox_redis.users import FetchedUser, UncacheableValue, fetch_user

logger = logging.getLogger("knox_redis")

# SHA-512 hex, as knox.crypto.hash_token computes it by default (the Rust one is faster).
sha512_hex = _knox_redis.hash_token

_EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


class RevocationUnavailable(APIException):
    """Redis could not be told that a live token is revoked, so the token was kept."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Token revocation is temporarily unavailable; please retry."
    default_code = "revocation_unavailable"


# Immutable (a hit's Lookup may serve many requests: LOCAL_CACHE_SIZE), and tuples: built on
# every lookup, where a frozen dataclass's __init__ would cost more than the rest of it.


class CachedToken(NamedTuple):
    """A token's record, authenticated: found under its token_key and digest, MAC verified."""

    user_pk: int | str
    created: datetime
    expiry: datetime | None
    fresh_until: datetime


class CachedUserRow(NamedTuple):
    """A user's row (USER_CACHE), authenticated: MAC verified for the user the record names.
    `values` are the columns as the database driver returned them, as `(tag, primitive)`
    pairs (users.py turns them back into a user)."""

    fresh_until: datetime
    values: tuple[tuple[str, Any], ...]
    # The row converted for a query (users.build_user), kept for the repeat hits that
    # LOCAL_CACHE_SIZE serves from this same object.
    prepared: dict[Any, Any]


class Lookup(NamedTuple):
    """What Redis knows about a token: its record, if any, and the generation a fill needs
    (None until a request that the database authenticated has created one); with USER_CACHE
    and a record, the row of the user it names, and the generation a fill of that row needs."""

    record: CachedToken | None
    generation: bytes | None
    user_row: CachedUserRow | None = None
    user_generation: bytes | None = None


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
                _client = _new_client(target)
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                    from knox_redis import metrics as prometheus_metrics

                    prometheus_metrics.publish_in_background()
            client = _client
    return client


def _new_client(target: Any) -> _knox_redis.TokenCache:
    try:
        return _knox_redis.TokenCache(
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
            record_secret=signing_key(),
            record_fallback_secrets=signing_key_fallbacks(),
            local_cache_size=int(knox_redis_settings.LOCAL_CACHE_SIZE),
            sentinels=list(target.sentinels),
            sentinel_service_name=target.sentinel_service_name,
            sentinel_username=target.sentinel_username,
            sentinel_password=target.sentinel_password,
            sentinel_tls=target.sentinel_tls,
            sentinel_tls_ca_certs=target.sentinel_tls_ca_certs,
            cluster_nodes=list(target.cluster_nodes),
            busy_poll_us=int(knox_redis_settings.BUSY_POLL_US),
        )
    except (CacheError, OverflowError, TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"knox_redis can't use {target}: {exc}") from exc


def signing_key() -> bytes:
    """The secret records are authenticated with (the native side derives the MAC key from
    it): SIGNING_KEY, or Django's SECRET_KEY."""
    secret = knox_redis_settings.SIGNING_KEY or settings.SECRET_KEY
    if not secret:
        raise ImproperlyConfigured("knox_redis needs REST_KNOX_REDIS['SIGNING_KEY'] or SECRET_KEY to sign records.")
    return _bytes(secret)


def signing_key_fallbacks() -> list[bytes]:
    """Older secrets whose records still verify during a rotation (never used to sign)."""
    if knox_redis_settings.SIGNING_KEY:
        fallbacks = knox_redis_settings.SIGNING_KEY_FALLBACKS
    else:
        fallbacks = getattr(settings, "SECRET_KEY_FALLBACKS", ())
    return [_bytes(secret) for secret in fallbacks if secret]


def _bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def reset_client() -> None:
    global _client
    pending_revocations.clear()
    _breaker_log.reported_open = False  # the next client starts closed
    with _client_lock:
        if _client is not None:
            _client.reset()
        _client = None


def _forget_client_after_fork() -> None:
    """In a forked child, drop the parent's client without touching its locks (another thread
    of the parent may have held them at the fork). The child builds its own on first use; the
    native pool would also refuse the parent's connections (it checks the pid)."""
    global _client, _client_lock
    _client_lock = threading.Lock()
    _client = None
    pending_revocations.after_fork_in_child()
    _knox_redis.reset_metrics()  # the child counts its own calls, from zero
    _breaker_log.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_client_after_fork)


# --- fail-open logging ------------------------------------------------------------------

_last_warning: dict[str, float] = {}
WARNING_INTERVAL = 10.0


def _warn(operation: str, exc: BaseException) -> None:
    """Log a Redis failure at most once per WARNING_INTERVAL per operation."""
    now = time.monotonic()
    if _breaker_log.check(operation, exc):
        _last_warning[operation] = now  # the line saying the breaker opened said this too
        return
    if now - _last_warning.get(operation, -WARNING_INTERVAL) >= WARNING_INTERVAL:
        _last_warning[operation] = now
        logger.warning("knox_redis: %s failed, using the database: %s", operation, exc)
    else:
        logger.debug("knox_redis: %s failed: %s", operation, exc)


class BreakerLog:
    """Logs each state change of the native circuit breaker once: opened (with the kind of
    error that opened it) and closed again. Checked after failures, and after successes only
    while it is reported open: a healthy process never asks."""

    def __init__(self) -> None:
        self.reported_open = False
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def check(self, operation: str = "a call", exc: BaseException | None = None) -> bool:
        """Log a change since the last check; True if this logged the breaker opening."""
        client = _client
        if client is None or not self._lock.acquire(blocking=False):
            return False  # another thread is reporting this very change
        try:
            is_open = client.breaker_open
            if is_open and not self.reported_open:
                self.reported_open, self._opened_at = True, time.monotonic()
                logger.warning(
                    "knox_redis: circuit breaker open after a Redis %s error (%s failed: %s): this process "
                    "authenticates from the database and probes Redis every %ss",
                    _knox_redis.last_trip_kind() or "connection",
                    operation,
                    exc,
                    knox_redis_settings.CIRCUIT_BREAKER_COOLDOWN,
                )
                return True
            if not is_open and self.reported_open:
                self.reported_open = False
                logger.warning(
                    "knox_redis: Redis answers again, circuit breaker closed after %.1fs",
                    time.monotonic() - self._opened_at,
                )
            return False
        finally:
            self._lock.release()

    def after_fork_in_child(self) -> None:
        # The parent's lock may have been held by one of its threads; its breaker is not ours.
        self._lock = threading.Lock()
        self.reported_open = False


_breaker_log = BreakerLog()


# --- metrics (knox_redis.stats(), knox_redis.metrics) ----------------------------------

# A hit whose record says the token expired: auth.py decides that, the native side counts it.
count_expired = _knox_redis.count_expired


def metrics() -> dict[str, Any]:
    """This process's counters (README, "Metrics"), and the gauges of its client (none built
    yet: zero). Never builds a client nor talks to Redis."""
    values: dict[str, Any] = _knox_redis.process_metrics()
    client = _client
    values["breaker_open"] = int(client is not None and client.breaker_open)
    values["connections_idle"] = client.stats()["idle_connections"] if client is not None else 0
    values["local_cache_live"] = int(client is not None and client.local_cache_live)
    return values


# --- time -------------------------------------------------------------------------------


# With USE_TZ = False, Django stores naive datetimes in the default time zone (TIME_ZONE), not
# in whatever zone a request activated: convert with that one, or expiry would shift.


def to_us(value: datetime) -> int:
    if timezone.is_naive(value):
        value = timezone.make_aware(value, timezone.get_default_timezone())
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int) -> datetime:
    moment = _EPOCH + value * _MICROSECOND
    return moment if settings.USE_TZ else timezone.make_naive(moment, timezone.get_default_timezone())


# --- reads and fills (fail open) --------------------------------------------------------


def lookup(token_key: str, digest: str, *, create: bool = False) -> Lookup | None:
    """One round trip; None when Redis can't answer (the caller uses the database alone)."""
    if len(pending_revocations) and not pending_revocations.drain(fail_fast=True):
        return None  # a revocation Redis hasn't taken yet: no cached record can be trusted
    try:
        client = get_client()
        # With LOCAL_CACHE_SIZE, a repeat hit returns the Lookup built for the first one.
        found: Lookup = client.lookup(token_key, digest, create, knox_redis_settings.USER_CACHE, _build_lookup)
    except (CacheError, ImproperlyConfigured) as exc:
        _warn("lookup", exc)
        return None
    if _breaker_log.reported_open:
        _breaker_log.check()  # a success: did it close the breaker?
    listener_error = client.local_cache_error  # LOCAL_CACHE_SIZE's listener can't go live
    if listener_error is not None:
        _warn("the in-process cache's listener", CacheError(f"{listener_error} (requests ask Redis meanwhile)"))
    return found


def _build_lookup(raw: Any, generation: bytes | None, raw_row: Any, user_generation: bytes | None) -> Lookup:
    """The Lookup of the native client's reply (immutable: an in-process cache shares it)."""
    return Lookup(_record(raw), generation, _user_row(raw_row), user_generation)


def _record(raw: Any) -> CachedToken | None:
    if raw is None:
        return None
    user_pk, created_us, expiry_us, fresh_until_us = raw
    try:
        record = CachedToken(
            user_pk=user_pk,
            created=from_us(created_us),
            expiry=None if expiry_us is None else from_us(expiry_us),
            fresh_until=from_us(fresh_until_us),
        )
        # The one sum a hit computes from a record's times: knox's renew_token caps the new
        # expiry at created + AUTO_REFRESH_MAX_TTL. (The rest is comparisons and differences.)
        if knox_settings.AUTO_REFRESH and knox_settings.AUTO_REFRESH_MAX_TTL is not None:
            with suppress(TypeError):  # not a timedelta: knox's own misconfiguration to report
                record.created + knox_settings.AUTO_REFRESH_MAX_TTL
    except (OverflowError, ValueError) as exc:  # no datetime of this zone can hold it: garbage
        _warn("decode", exc)
        return None
    return record


def _user_row(raw: Any) -> CachedUserRow | None:
    if raw is None:
        return None
    fresh_until_us, values = raw
    try:
        return CachedUserRow(from_us(fresh_until_us), tuple(values), {})
    except (OverflowError, ValueError) as exc:
        _warn("decode", exc)
        return None


def fresh(record: CachedToken, now: datetime) -> bool:
    """May a hit trust this record without re-reading the row?

    Not once its re-read deadline has passed, nor while that deadline lies further ahead
    than MAX_CACHE_TTL allows now: it was set under a longer setting, or by a writer whose
    clock runs fast, and a lowered MAX_CACHE_TTL must bound records cached before it."""
    return now < record.fresh_until <= now + _seconds(knox_redis_settings.MAX_CACHE_TTL)


def fresh_user_row(row: CachedUserRow, now: datetime) -> bool:
    """May a hit build the user from this row? As `fresh`, with USER_CACHE_TTL."""
    return now < row.fresh_until <= now + _seconds(knox_redis_settings.USER_CACHE_TTL)


@lru_cache(maxsize=16)
def _seconds(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def store(token: Any, found: Lookup) -> None:
    """Cache a token row this request read from the database, after looking it up (`found`).

    In autocommit mode, a row read from the token model's write database is committed data,
    read after `found.generation` was: fill now. Inside a transaction the row may be
    uncommitted or from an old snapshot, and a read replica may lag: then (after commit, in
    a transaction) read it again from the write database under a new lookup, and fill from
    that. So does the first request for a token, which has no generation yet.
    """
    write_db = router.db_for_write(type(token), instance=token)
    _fill_or_refill(
        write_db,
        token._state.db or write_db,
        found.generation,
        fill=lambda generation: _fill(_values(token), generation),
        refill=lambda: _refill(token.token_key, token.digest, write_db),
    )


def _fill_or_refill(write_db: str, read_db: str, generation: bytes | None, *, fill: Any, refill: Any) -> None:
    """What `store` and `store_user` decide: fill from the row this request read when it is
    committed data from the write database, read after `generation` was; else `refill` (read
    it again from the write database under a new lookup, after commit); never under manual
    transaction management."""
    # The write database first: the refill reads it, and must not see its uncommitted rows.
    states = {db: _when_committed(db) for db in (write_db, read_db)}
    if "never" in states.values():
        return
    if set(states.values()) == {"now"} and generation is not None and read_db == write_db:
        fill(generation)
    else:
        refill()  # defers itself until commit


def _deferred_until_commit(dbs: tuple[str, str], again: Any) -> bool:
    """While any of `dbs` is in a transaction, run `again` after its commit (True)."""
    for db in dict.fromkeys(dbs):
        if transaction.get_connection(db).in_atomic_block:
            transaction.on_commit(again, using=db, robust=True)
            return True
    return False


def store_refreshed(token: Any, generation: bytes | None, *, fresh_until: datetime) -> None:
    """Cache a token whose new expiry this request just saved (its UPDATE matched a row
    holding the cached expiry).

    The UPDATE proved the row exists; the generation, read before it, proves no revocation
    started since. Only the commit is missing."""
    if generation is None:
        return  # the record keeps the older, shorter expiry: safe
    using = router.db_for_write(type(token), instance=token)
    values = _values(token)  # as saved now, whatever the view does to the instance later
    when = _when_committed(using)
    if when == "now":
        _fill(values, generation, fresh_until)
    elif when == "on_commit":
        transaction.on_commit(partial(_fill, values, generation, fresh_until), using=using, robust=True)


def _when_committed(using: str) -> str:
    """When what this connection reads or writes is known to be committed."""
    connection = transaction.get_connection(using)
    if connection.in_atomic_block:
        return "on_commit"
    if not connection.get_autocommit():
        return "never"  # manual transaction management: on_commit isn't available
    return "now"


def _refill(token_key: str, digest: str, using: str) -> None:
    """Re-read the row from the write database under a fresh generation, and cache it; while
    that database (or the one this request read from) is in a transaction, after commit."""
    again = partial(_refill, token_key, digest, using)
    if _deferred_until_commit((using, router.db_for_read(get_token_model())), again):
        return
    found = lookup(token_key, digest, create=True)
    if found is None or found.generation is None:
        return
    token = get_token_model()._base_manager.using(using).filter(digest=digest).first()
    if token is not None:
        _fill(_values(token), found.generation)


def store_user(model: Any, pk: Any, fetched: FetchedUser, found: Lookup, read_db: str) -> None:
    """Cache a user row this request read from `read_db` (USER_CACHE), under the lease of
    the lookup that found its token (`found.user_generation`): as `store` does for tokens."""
    if fetched.values is None:
        _warn("user row", UncacheableValue(fetched.problem))
        return
    write_db = router.db_for_write(model)
    values = fetched.values
    _fill_or_refill(
        write_db,
        read_db,
        found.user_generation,
        fill=lambda generation: _fill_user(pk, values, generation),
        refill=lambda: _refill_user(model, pk, write_db),
    )


def _refill_user(model: Any, pk: Any, using: str) -> None:
    """Read the user row again from the write database under a fresh generation, and cache
    it; after commit if that database (or the one requests read from) is in a transaction."""
    if _deferred_until_commit((using, router.db_for_read(model)), partial(_refill_user, model, pk, using)):
        return
    if len(pending_revocations) and not pending_revocations.drain(fail_fast=True):
        return
    try:
        _row, generation = get_client().lookup_user(_user_pk(pk), create=True)
    except (CacheError, ImproperlyConfigured) as exc:
        _warn("lookup", exc)
        return
    fetched = None if generation is None else fetch_user(model, pk, using)
    if fetched is not None and fetched.values is not None:
        _fill_user(pk, fetched.values, generation)


def _fill_user(pk: Any, values: list[tuple[str, Any]], generation: bytes) -> bool:
    """Store the user row if `generation` still stands and no tombstone does."""
    period = timedelta(seconds=knox_redis_settings.USER_CACHE_TTL)
    fresh_until = timezone.now() + period
    # The key (and the generation the row carries) outlives the row by one period, so the
    # re-read after USER_CACHE_TTL is a plain miss, not a first sight.
    ttl_ms = int(2 * period.total_seconds() * 1000)
    try:
        return get_client().fill_user(_user_pk(pk), generation, to_us(fresh_until), values, ttl_ms)
    except (CacheError, ImproperlyConfigured) as exc:
        _warn("fill", exc)
        return False


@dataclass(frozen=True)
class TokenValues:
    """The columns of a token row that a record holds."""

    token_key: str
    digest: str
    user_id: Any
    created: datetime
    expiry: datetime | None


def _values(token: Any) -> TokenValues:
    return TokenValues(token.token_key, token.digest, token.user_id, _stored(token.created), _stored(token.expiry))


def _stored(value: datetime | None) -> datetime | None:
    """A time as the database stores it, in the zone convention of USE_TZ: a naive one
    given with USE_TZ (Django warns, and stores it in the default time zone) made aware the
    same way; an aware one without USE_TZ made naive in the default time zone."""
    if value is None:
        return value
    if settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value, timezone.get_default_timezone())
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value, timezone.get_default_timezone())
    return value


def _fill(token: TokenValues, generation: bytes, fresh_until: datetime | None = None) -> bool:
    """Store the record if `generation` still stands and no tombstone does."""
    now = timezone.now()
    # The record is re-read from the database after MAX_CACHE_TTL. The key, and with it the
    # generation, lives one period longer (so that re-read is knox's 2 queries, not a first
    # sight's 3), but never longer than the token. Durations from now, never sums of
    # datetimes: a time near year 9999 must not overflow after the database was written.
    period = timedelta(seconds=knox_redis_settings.MAX_CACHE_TTL)
    if fresh_until is None:
        fresh_until = now + period
    if fresh_until <= now:
        return False
    lifetime = (fresh_until - now) + period
    if token.expiry is not None:
        if token.expiry <= now:
            return False
        lifetime = min(lifetime, token.expiry - now)
    ttl_ms = max(1, int(lifetime.total_seconds() * 1000))
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
    except (CacheError, ImproperlyConfigured) as exc:
        _warn("fill", exc)
        return False


def _user_pk(pk: Any) -> int | str:
    """The user's primary key as the user index key spells it: canonical, through the pk
    field's own to_python (a UUID in upper case or without dashes names the same user).

    Raises ValidationError for a value that can't be a primary key of the user model."""
    value = _user_pk_field().to_python(pk)
    return value if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _user_pk_field() -> Any:
    # The field the token's user foreign key points at: the user model's primary key.
    return get_token_model()._meta.get_field("user").target_field


# --- operators' tools -------------------------------------------------------------------


def redis_command(*args: str | bytes | int, node: str | None = None) -> Any:
    """One Redis command through the native client (timeouts, TLS, auth as configured), for
    `manage.py knox_redis` and the system checks; on a Redis Cluster, to `node` (one of
    `redis_nodes()`) if given. Raises CacheError."""
    return get_client().command([a if isinstance(a, bytes) else str(a).encode() for a in args], node)


def redis_nodes() -> list[str | None]:
    """Where a command must go to reach every key: each primary of a Redis Cluster, else the
    one server (None)."""
    return list(get_client().primaries()) or [None]


def key_pattern() -> str:
    """SCAN's MATCH pattern for every key under the prefix, and nothing else: glob characters
    in the prefix (`*`, `?`, `[`, `\\`) are escaped."""
    prefix = "".join("\\" + c if c in "*?[]\\" else c for c in knox_redis_settings.REDIS_KEY_PREFIX)
    return f"{prefix}:*"


def warm(tokens: Iterable[Any], using: str) -> int:
    """Cache these token rows under the same lease as requests: a generation is created for
    each first, then the rows are read again from the write database, then each is filled
    only if its generation still stands. A logout at any point in between wins: its row is
    gone from the re-read, or its revocation replaced the generation. Returns how many were
    filled."""
    tokens = [t for t in tokens if _cacheable(t.digest)]
    generations = {}
    for token in tokens:
        found = lookup(token.token_key, token.digest, create=True)
        if found is not None and found.generation is not None and found.record is None:
            generations[token.digest] = found.generation
    rows = get_token_model()._base_manager.using(using).filter(digest__in=list(generations))
    return sum(_fill(_values(row), generations[row.digest]) for row in rows)


# --- user rows (USER_CACHE) -------------------------------------------------------------


def encode_user_row(user_pk: Any, fresh_until: datetime, values: list[tuple[str, Any]]) -> bytes:
    """A user row (`users.row_values`) as Redis stores it, signed for this user."""
    return get_client().encode_user_row(_user_pk(user_pk), to_us(fresh_until), values)


def decode_user_row(user_pk: Any, data: bytes) -> tuple[datetime, list[tuple[str, Any]]] | None:
    """`(fresh_until, values)`, or None for anything that isn't a row signed for this user."""
    decoded = get_client().decode_user_row(_user_pk(user_pk), data)
    if decoded is None:
        return None
    fresh_until_us, values = decoded
    return from_us(fresh_until_us), values


# --- write-through at login ------------------------------------------------------------


def claim_new_token(token: Any) -> None:
    """Before a token's INSERT: claim its lease in Redis, a generation of this process's own
    that the fill after commit must present (see claim.lua), so that a revocation anywhere,
    or Redis forgetting the token, before that fill makes it fail. Fails open: without a
    claim, the token is simply not written through."""
    if not knox_redis_settings.CACHE_ENABLED or not _cacheable(token.digest):
        return
    try:
        generation = get_client().claim(token.token_key, token.digest)
    except (CacheError, ImproperlyConfigured) as exc:
        _warn("claim", exc)
        return
    if generation is not None:
        token.__dict__[_CLAIM] = generation


_CLAIM = "_knox_redis_claimed_generation"


def cache_new_token(token: Any, using: str) -> None:
    """After a token's INSERT (a login): cache it once committed, under the generation
    claimed before, so the first request with it is a hit instead of three queries. Not under
    manual transaction management."""
    generation = token.__dict__.pop(_CLAIM, None)
    if generation is None:
        return
    when = _when_committed(using)
    if when == "never":
        return
    try:
        values = _values(token)  # as inserted, whatever the view does to the instance later
    except (TypeError, ValueError, OverflowError) as exc:  # a time no record can hold
        _warn("write-through", exc)
        return
    if when == "now":  # autocommit: the INSERT is committed already
        _fill(values, generation)
    else:
        _on_commit_unless_rolled_back(partial(_fill, values, generation), using)


def _on_commit_unless_rolled_back(callback: Any, using: str) -> None:
    """transaction.on_commit, also dropped if a savepoint made with transaction.savepoint()
    before it is rolled back.

    Django drops a callback when a savepoint rolls back only if it is an atomic block's open
    one (savepoint_ids): a token inserted after a manual savepoint that is rolled back would
    otherwise be cached, though its row never committed. Django matches the rolled-back
    savepoint's id against the set it keeps with the callback; this set also contains every
    savepoint created before the callback (ids count up per thread, "s<thread>_x<n>")."""
    connection = transaction.get_connection(using)
    state = {"cancelled": False}

    def run() -> None:
        if not state["cancelled"]:
            callback()

    transaction.on_commit(run, using=using, robust=True)
    pending = connection.run_on_commit[-1] if connection.run_on_commit else None
    if pending is None or pending[1] is not run:
        state["cancelled"] = True  # not the shape this code knows: never fill blind
        return
    sids, func, robust = pending
    connection.run_on_commit[-1] = (_SavepointsBefore(sids, connection), func, robust)


class _SavepointsBefore(set):
    """Matches, besides the atomic savepoints Django recorded, every savepoint that may have
    been made before the callback: its id's counter is at most the connection's counter then.
    When that can't be told (the counter was reset by clean_savepoints(), so ids repeat),
    every savepoint matches: the fill is dropped, which only costs a miss."""

    def __init__(self, sids: Iterable[str], connection: Any) -> None:
        super().__init__(sids)
        self.connection = connection
        self.savepoint_state = connection.savepoint_state

    def __contains__(self, sid: object) -> bool:
        if super().__contains__(sid):
            return True
        counter = str(sid).rpartition("_x")[2]
        if not counter.isdigit():
            return True
        now = self.connection.savepoint_state
        return int(counter) <= self.savepoint_state or now < self.savepoint_state or int(counter) > now


# --- revocation (fails closed) ----------------------------------------------------------

# Digests this context already revoked in one batch (logoutall): their per-row pre_delete
# signals need no second round trip.
_already_revoked: ContextVar[frozenset[str]] = ContextVar("knox_redis_already_revoked", default=frozenset())


def already_revoked(digest: str) -> bool:
    return digest in _already_revoked.get()


# Tokens per script call: logoutall of a user with many tokens must not block Redis, nor
# outlast SOCKET_TIMEOUT, in one script.
REVOKE_BATCH = 5000


def revoke(
    tokens: Iterable[Any],
    *,
    users: Iterable[Any] = (),
    user_rows: Iterable[Any] = (),
    using: str | None = None,
    fail_fast: bool = False,
    quiet: bool = False,
    after_commit: bool = True,
) -> str:
    """Revoke cached tokens (and every token indexed for `users`, and the cached rows of
    `user_rows`) before their rows change or go; again after commit.

    Raises RevocationUnavailable when Redis can't be told: the caller's transaction rolls
    back and the token stays valid everywhere, as the database says. Revocations ignore the

    """
    # A row whose digest can't name a hash field (imported, hand-made) was never cached.
    tokens = [t for t in tokens if _cacheable(t.digest)]
    batch = Revocation(
        [(t.token_key, t.digest, _user_pk(t.user_id)) for t in tokens],
        [_user_pk(pk) for pk in users],
        [_user_pk(pk) for pk in user_rows],
    )
    if not batch:
        return ""
    try:
        tombstone = _send_revocations(batch, int(knox_redis_settings.REVOCATION_TOMBSTONE_TTL * 1000), fail_fast)
    except (CacheError, ImproperlyConfigured) as exc:
        _breaker_log.check("revocation", exc)
        if quiet:
            _warn("revocation", exc)
        else:
            logger.error("knox_redis: refusing to revoke, Redis can't be told: %s", exc)
        raise RevocationUnavailable() from exc
    # After commit, revoke once more without a tombstone: a reader that looked the token up
    # after the first revocation but read the row before the commit can't fill it now.
    if using is None:
        hints = {"instance": tokens[0]} if tokens else {}
        using = router.db_for_write(get_token_model(), **hints)
    if after_commit and transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(partial(_revoke_after_commit, batch), using=using, robust=True)
    return tombstone


def finish_user_revocation(pks: Iterable[Any], tombstone: str, using: str) -> None:
    """After a write of users' rows (post_save): once it has committed, revoke the rows
    again and lift the tombstone the revocation before the write left (`tombstone`, unique
    to it), so the new row can be cached at once instead of after REVOCATION_TOMBSTONE_TTL.
    A request that read a row before the commit holds a generation this replaces: its fill
    fails anyway. Under manual transaction management (no way to know when it commits) the
    tombstone stays and runs out."""
    batch = Revocation([], [], [_user_pk(pk) for pk in pks], lift_tombstone=tombstone)
    when = _when_committed(using)
    if when == "now":
        _revoke_after_commit(batch)
    elif when == "on_commit":
        transaction.on_commit(partial(_revoke_after_commit, batch), using=using, robust=True)


@dataclass(frozen=True)
class Revocation:
    """What one revocation tells Redis: tokens `(token_key, digest, user_pk)`, users whose
    indexed tokens all go, users whose cached row goes (and, after the write, the deadline
    of the user rows' tombstones to lift)."""

    tokens: list[tuple[str, str, int | str]]
    users: list[int | str]
    user_rows: list[int | str]
    lift_tombstone: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tokens or self.users or self.user_rows)


def _send_revocations(batch: Revocation, tombstone_ms: int, fail_fast: bool = False) -> str:
    """Returns the user rows' tombstone (revoke.lua)."""
    client = get_client()
    tokens = batch.tokens
    tombstone = ""
    for start in range(0, max(len(tokens), 1), REVOKE_BATCH):
        last = start + REVOKE_BATCH >= len(tokens)
        _removed, tombstone = client.revoke(
            tokens[start : start + REVOKE_BATCH],
            batch.users if last else [],
            tombstone_ms,
            fail_fast,
            batch.user_rows if last else [],
            batch.lift_tombstone if last else None,
        )
    return tombstone


_HEX = frozenset("0123456789abcdefABCDEF")


def _cacheable(digest: Any) -> bool:
    return isinstance(digest, str) and len(digest) >= 32 and set(digest[:32]) <= _HEX


def _revoke_after_commit(batch: Revocation) -> None:
    try:
        _send_revocations(batch, 0)
    except (CacheError, ImproperlyConfigured) as exc:
        pending_revocations.add(batch, exc)


class PendingRevocations:
    """After-commit revocations that Redis didn't take, retried until it does.

    The revocation before the DELETE already stops every fill that races it, unless Redis
    lost it (the key evicted, or the database flushed) before the DELETE committed and a
    reader re-cached the row in between: then only the after-commit revocation removes that
    record. If it fails as well, it is kept here and a thread this module owns retries it
    (back-off from 50 ms to 1 s) until Redis takes it; meanwhile this process trusts no
    cached record at all. Other processes may accept the token until the retry lands, or the
    record's MAX_CACHE_TTL passes if this process dies first: the README states this bound.
    """

    THREAD_NAME = "knox_redis-revocation-retry"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[Revocation] = []
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: Revocation, exc: BaseException) -> None:
        with self._lock:
            first = not self._batches
            self._batches.append(batch)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._retry_until_drained, name=self.THREAD_NAME, daemon=True)
                self._thread.start()
        if first:
            logger.error(
                "knox_redis: a revocation after commit failed (%s); retrying until Redis takes it. "
                "Until then this process reads tokens from the database only.",
                exc,
            )

    def drain(self, *, fail_fast: bool = False) -> bool:
        """Send what is pending; True when nothing is left. `fail_fast` (from a request):
        don't wait on a Redis the circuit breaker already knows to be down.

        A batch leaves the journal only once Redis has taken it: while one thread delivers,
        every other one still finds it pending, and trusts no record."""
        if not self._drain_lock.acquire(blocking=False):
            return False
        try:
            with self._lock:
                batches = list(self._batches)
            sent = 0
            for batch in batches:
                try:
                    _send_revocations(batch, 0, fail_fast)
                except (CacheError, ImproperlyConfigured):
                    break
                sent += 1
            with self._lock:
                del self._batches[:sent]
                empty = not self._batches
        finally:
            self._drain_lock.release()
        if sent and empty:
            logger.warning("knox_redis: pending revocations delivered; the cache is trusted again.")
        return empty

    def _retry_until_drained(self) -> None:
        delay = 0.05
        while not self._stop.wait(delay):
            if self.drain():
                with self._lock:
                    if not self._batches:
                        self._thread = None
                        return
            delay = min(delay * 2, 1.0)

    def clear(self) -> None:
        """Forget everything and stop the thread (settings changed: another Redis, or tests)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._drain_lock, self._lock:
            self._batches.clear()

    def after_fork_in_child(self) -> None:
        # The parent's lock may have been held by one of its threads, and its thread is not
        # ours: start over with what was pending (retried on this process's next lookup).
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None


pending_revocations = PendingRevocations()


@contextmanager
def revoking_all_tokens_of(user: Any) -> Iterator[None]:
    """Revoke every token of `user` in one round trip, then run the block that deletes them.

    The tokens are read from the database (cached or not: one may be mid-fill right now),
    plus whatever the user's index in Redis lists.
    """
    token_model = get_token_model()
    # The database the view's `user.auth_token_set.all().delete()` will use.
    using = router.db_for_write(token_model, instance=user)
    with transaction.atomic(using=using):
        tokens = list(
            token_model._base_manager.using(using).filter(user=user).only("digest", "token_key", "user_id", "expiry")
        )
        revoke(tokens, users=[user.pk], using=using)
        reset = _already_revoked.set(_already_revoked.get() | {t.digest for t in tokens})
        try:
            yield
        finally:
            _already_revoked.reset(reset)


def looks_expired(token: Any) -> bool:
    return token.expiry is not None and token.expiry < timezone.now()


def expired_in_database(token: Any, using: str) -> bool:
    """Does the database (not this possibly stale instance) hold an expiry in the past?

    Called inside the deleting transaction. Asked with a no-op UPDATE rather than a read, so
    the row stays locked until the delete commits and no refresh can extend it in between
    (and SQLite takes its write lock at once instead of deadlocking on an upgrade)."""
    if not looks_expired(token):
        return False
    rows = type(token)._base_manager.using(using).filter(pk=token.pk, expiry__lt=timezone.now())
    return bool(rows.update(expiry=F("expiry")))
