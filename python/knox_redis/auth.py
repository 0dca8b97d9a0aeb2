"""knox's TokenAuthentication, with each token looked up in Redis before the database.

The story of one request:

1. The header is parsed exactly as knox does; bytes that can't be a token get a 401 here
   (knox would answer non-UTF-8 with a 500, NUL bytes with a database error).
2. The token is hashed and its record fetched from Redis in one round trip: the record is
   stored under the token_key and the first 128 bits of the digest, and the native client
   returns it only if its MAC (keyed from SIGNING_KEY) verifies for both, so a record planted
   or altered by whoever can write to Redis is a miss.
3. Hit: the record gives user, created and expiry, so no token row is read. The user is
   loaded by primary key (the one query), so a deactivated user is rejected at once. With
   USER_CACHE, the user's row came back in the same round trip and the user is built from
   it (no query at all): every save or delete of a user revokes its row first, as a logout
   revokes a token, so it is as current as the database. Without a usable row, the user is
   read by primary key and its row cached under the same lease as tokens.
4. Miss (or Redis unavailable): knox's own database path runs unchanged, then the row is
   cached, unless a revocation started since the lookup.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DatabaseError, router, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from knox import auth as knox_auth
from knox.crypto import hash_token as knox_hash_token
from knox.settings import CONSTANTS, knox_settings
from knox.signals import token_expired
from rest_framework import HTTP_HEADER_ENCODING, exceptions

from knox_redis import cache, instances, users
from knox_redis.settings import knox_redis_settings
from knox_redis.signals import refreshing

# Far longer than any token knox issues (a 10-character prefix and 64 hex characters), short
# enough that hashing it costs nothing.
MAX_TOKEN_LENGTH = 1024
INVALID_TOKEN = _("Invalid token.")
# What a record holds of the token's row.
TOKEN_COLUMNS = ("digest", "token_key", "user_id", "created", "expiry")


class CachedExpiryOutdated(Exception):
    """The row's expiry is no longer the one the cache had: something changed it behind the
    cache (QuerySet.update, raw SQL), so a refresh must not overwrite it."""


def hash_token(token: str) -> str:
    if knox_settings.SECURE_HASH_ALGORITHM is hashlib.sha512:
        return cache.sha512_hex(token)
    return knox_hash_token(token)


def decode_token(token: bytes) -> str:
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        raise exceptions.AuthenticationFailed(INVALID_TOKEN) from None
    if len(text) > MAX_TOKEN_LENGTH or not text.isprintable():
        raise exceptions.AuthenticationFailed(INVALID_TOKEN)
    return text


class TokenAuthentication(knox_auth.TokenAuthentication):
    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        """knox's `authenticate`, line for line, but reading the header from `request.META`:
        DRF's get_authorization_header (3.16+) goes through `request.headers`, which builds a
        dict of every header on first use, and that cost more than a whole cache hit."""
        # The HttpRequest under DRF's Request, which would find META only after a failed
        # attribute lookup (its __getattr__): a tenth of a cached hit.
        header = getattr(request, "_request", request).META.get("HTTP_AUTHORIZATION", b"")
        try:
            if isinstance(header, str):  # as DRF does (test clients give str)
                header = header.encode(HTTP_HEADER_ENCODING)
        except UnicodeError:
            # A str header that isn't latin-1 (test clients, ASGI servers that decode).
            raise exceptions.AuthenticationFailed(_("Invalid token header.")) from None
        auth = header.split()
        prefix = self.authenticate_header(request).encode()
        if not auth or auth[0].lower() != prefix.lower():
            return None  # no header, or one for another scheme
        if len(auth) == 1:
            raise exceptions.AuthenticationFailed(_("Invalid token header. No credentials provided."))
        if len(auth) > 2:
            raise exceptions.AuthenticationFailed(_("Invalid token header. Token string should not contain spaces."))
        return self.authenticate_credentials(auth[1])

    def authenticate_credentials(self, token: bytes) -> tuple[Any, Any]:
        text = decode_token(token)
        if not knox_redis_settings.CACHE_ENABLED:
            return super().authenticate_credentials(text.encode())
        token_key = text[: CONSTANTS.TOKEN_KEY_LENGTH]
        digest = hash_token(text)
        found = cache.lookup(token_key, digest)
        if found is not None and found.record is not None:
            result = self._authenticate_cached(token_key, digest, found)
            if result is not None:
                return result
        user, auth_token = super().authenticate_credentials(text.encode())
        auth_token.__dict__.pop("_knox_redis_saved", None)
        if found is not None:
            cache.store(auth_token, found)
        return user, auth_token

    def renew_token(self, auth_token: Any) -> None:
        """knox's renewal, made safe against the row changing under it.

        The save runs in a savepoint (so a failure can't poison an ATOMIC_REQUESTS
        transaction) and, being only an extension, is not revoked as an edit would be. If the
        row went meanwhile (a logout in another request), this is a 401, not knox's 500.
        """
        using = router.db_for_write(type(auth_token), instance=auth_token)
        current_expiry = auth_token.expiry
        model_save = auth_token.save

        def save_in_savepoint(*args: Any, **kwargs: Any) -> None:
            with transaction.atomic(using=using):
                model_save(*args, **kwargs)

        auth_token.save = save_in_savepoint
        try:
            with refreshing(auth_token.digest):
                super().renew_token(auth_token)
        except OverflowError:
            # created + AUTO_REFRESH_MAX_TTL beyond year 9999 (a row no real clock wrote):
            # knox would answer a 500; the token keeps the expiry it has.
            auth_token.expiry = current_expiry
        except DatabaseError:
            # "Save with update_fields did not affect any rows": the row went, or (from a
            # cache hit) its expiry is no longer the cached one.
            if not type(auth_token)._base_manager.using(using).filter(pk=auth_token.pk).exists():
                raise exceptions.AuthenticationFailed(INVALID_TOKEN) from None
            if "_do_update" in auth_token.__dict__:
                raise CachedExpiryOutdated() from None
            raise
        finally:
            del auth_token.save

    def _authenticate_cached(self, token_key: str, digest: str, found: cache.Lookup) -> tuple[Any, Any] | None:
        """Authenticate from the record; None sends the request down knox's database path."""
        record = found.record
        if record is None:
            return None
        now = timezone.now()
        expired = record.expiry is not None and record.expiry < now
        if expired:
            cache.count_expired()
        if not expired and not cache.fresh(record, now):
            return None  # due for a re-read from the database (MAX_CACHE_TTL)
        token_model, user_model = users.token_models()
        user = _load_user(user_model, found, now)
        if user is None:
            return None
        # As if loaded from the database: any field a custom TOKEN_MODEL adds is deferred, so
        # reading it loads the real value instead of a default.
        build_token = instances.builder(token_model, TOKEN_COLUMNS)
        auth_token = build_token(
            instances.db_for_read(token_model), (digest, token_key, user.pk, record.created, record.expiry)
        )
        instances.set_related(auth_token, "user", user)

        if expired:
            return self._expire(auth_token, now)
        if knox_settings.AUTO_REFRESH and auth_token.expiry and not self._renew(auth_token, found.generation, record):
            return None
        return self.validate_user(auth_token)

    def validate_user(self, auth_token: Any) -> tuple[Any, Any]:
        """knox's, reading the user once (each read goes through the relation's descriptor)."""
        user = auth_token.user
        if not user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (user, auth_token)

    def _expire(self, auth_token: Any, now: Any) -> None:
        """The record says expired: delete the row only if the database agrees."""
        deleted, _rows = type(auth_token)._base_manager.filter(digest=auth_token.digest, expiry__lt=now).delete()
        if not deleted:
            return None  # The database holds a later expiry: let knox's path decide.
        token_expired.send(sender=self.__class__, username=auth_token.user.get_username(), source="auth_token")
        raise exceptions.AuthenticationFailed(INVALID_TOKEN)

    def _renew(self, auth_token: Any, generation: bytes | None, record: cache.CachedToken) -> bool:
        """knox's renew_token from a cache hit; if it saved a new expiry, cache that after
        commit. False (go to the database path) if the row's expiry is no longer the cached
        one: a refresh must never overwrite what changed behind the cache."""
        model_do_update = auth_token._do_update

        def update_if_unchanged(base_qs: Any, *args: Any, **kwargs: Any) -> Any:
            # knox's one UPDATE, made a compare-and-set: "... WHERE digest = %s AND expiry =
            # <cached>". Django's save then reports 0 rows as a DatabaseError.
            return model_do_update(base_qs.filter(expiry=record.expiry), *args, **kwargs)

        auth_token._do_update = update_if_unchanged
        try:
            self.renew_token(auth_token)
        except CachedExpiryOutdated:
            return False
        finally:
            del auth_token._do_update
        if auth_token.__dict__.pop("_knox_redis_saved", False):
            # The record keeps its re-read deadline: refreshing never postpones MAX_CACHE_TTL.
            cache.store_refreshed(auth_token, generation, fresh_until=record.fresh_until)
        return True


def _load_user(user_model: Any, found: cache.Lookup, now: Any) -> Any:
    """The user the record names: built from its cached row (USER_CACHE: no query), else read
    by primary key (one query). None sends the request down knox's database path."""
    using = instances.db_for_read(user_model)
    row = found.user_row
    if row is not None and knox_redis_settings.USER_CACHE and cache.fresh_user_row(row, now):
        try:
            return users.build_user(user_model, row.values, using, prepared=row.prepared)
        except (ValidationError, ValueError, TypeError, OverflowError) as exc:
            cache.logger.debug("knox_redis: cached user row not used: %s", exc)  # re-read below
    try:
        pk = user_model._meta.pk.to_python(found.record.user_pk)  # type: ignore[union-attr]
        if not knox_redis_settings.USER_CACHE:
            return users.load_user(user_model, pk, using)
        fetched = users.fetch_user(user_model, pk, using)
    except (ValidationError, ValueError, TypeError, OverflowError):
        return None
    if fetched is None:
        return None
    cache.store_user(user_model, pk, fetched, found, using)
    return fetched.user
