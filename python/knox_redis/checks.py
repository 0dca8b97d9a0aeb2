"""System checks: a misconfigured REST_KNOX_REDIS fails at startup, not on the first request."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured


@checks.register(checks.Tags.caches)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from knox_redis import cache
    from knox_redis.settings import knox_redis_settings, redis_target

    try:
        knox_redis_settings.reload()
        knox_redis_settings.CACHE_ENABLED  # noqa: B018  (loads and validates every key)
        # Builds the client without connecting: rejects what the native side can't use
        # (a database number out of range, an unreadable ssl_ca_certs file).
        cache._new_client(redis_target())
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="knox_redis.E001")]
    return []


@checks.register(checks.Tags.security)
def check_token_length(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """knox_redis refuses any token longer than auth.MAX_TOKEN_LENGTH before hashing it; a knox
    configured to issue longer ones would issue tokens that can never authenticate."""
    from knox.settings import knox_settings

    from knox_redis.auth import MAX_TOKEN_LENGTH

    try:
        # What knox.crypto.create_token_string makes (hex of length // 2 bytes), after the prefix.
        length = len(knox_settings.TOKEN_PREFIX) + 2 * int(knox_settings.AUTH_TOKEN_CHARACTER_LENGTH / 2)
    except (TypeError, ValueError):
        return []  # knox's own settings are knox's to report
    if length <= MAX_TOKEN_LENGTH:
        return []
    return [
        checks.Error(
            f"knox issues tokens of {length} characters (TOKEN_PREFIX plus AUTH_TOKEN_CHARACTER_LENGTH), "
            f"but knox_redis.auth.TokenAuthentication refuses tokens longer than {MAX_TOKEN_LENGTH}: "
            "every token would be rejected.",
            hint=f"Set REST_KNOX['AUTH_TOKEN_CHARACTER_LENGTH'] so that tokens stay within {MAX_TOKEN_LENGTH} "
            "characters (knox's default, 64, is plenty: 256 bits).",
            id="knox_redis.E002",
        )
    ]
