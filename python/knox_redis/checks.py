"""System checks: a misconfigured REST_KNOX_REDIS fails at startup, not on the first request; the
Redis-probing ones run only with `manage.py check --deploy`."""

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


@checks.register(checks.Tags.security)
def check_token_prefix(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """knox refuses a longer TOKEN_PREFIX only when REST_KNOX changes at runtime, never at startup."""
    from knox.settings import CONSTANTS, knox_settings

    prefix = knox_settings.TOKEN_PREFIX
    if not isinstance(prefix, str) or len(prefix) <= CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH:
        return []
    return [
        checks.Error(
            f"REST_KNOX['TOKEN_PREFIX'] has {len(prefix)} characters; knox allows at most "
            f"{CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH} (knox.settings.CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH). "
            f"A token's token_key is its first {CONSTANTS.TOKEN_KEY_LENGTH} characters, so a longer prefix "
            "leaves too few random characters in it: tokens pile up under the same token_key (one database "
            "lookup and one Redis hash for all of them), and knox raises ValueError if the setting is "
            "changed at runtime.",
            hint=f"Shorten REST_KNOX['TOKEN_PREFIX'] to at most {CONSTANTS.MAXIMUM_TOKEN_PREFIX_LENGTH} characters.",
            id="knox_redis.E003",
        )
    ]


@checks.register(checks.Tags.security)
def check_authentication_classes(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """knox's own class authenticates from the database alone: requests it handles skip the cache.
    Only knox's exact class is flagged; knox_redis's subclasses it."""
    from django.conf import settings
    from django.utils.module_loading import import_string
    from knox.auth import TokenAuthentication as KnoxTokenAuthentication

    configured = (getattr(settings, "REST_FRAMEWORK", None) or {}).get("DEFAULT_AUTHENTICATION_CLASSES") or ()
    if isinstance(configured, str):
        configured = (configured,)
    for entry in configured:
        try:
            cls = import_string(entry) if isinstance(entry, str) else entry
        except ImportError:
            continue  # DRF's to report
        if cls is KnoxTokenAuthentication:
            return [
                checks.Warning(
                    f"REST_FRAMEWORK['DEFAULT_AUTHENTICATION_CLASSES'] lists knox's own {entry!r} while "
                    "knox_redis is installed: requests authenticated by it skip the Redis cache (they stay "
                    "correct, only as slow as knox).",
                    hint="Use 'knox_redis.auth.TokenAuthentication' instead.",
                    id="knox_redis.W001",
                )
            ]
    return []


@checks.register(checks.Tags.caches, deploy=True)
def check_redis_server(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """`manage.py check --deploy` only: asks the Redis the native client uses, through the
    native client itself (same target, TLS, credentials and timeouts), whether its
    configuration weakens a guarantee."""
    from knox_redis import cache
    from knox_redis.settings import redis_target

    try:
        target = redis_target()
        cache.get_client()
    except ImproperlyConfigured:
        return []  # knox_redis.E001
    where = target.unix_path or f"{target.host}:{target.port}"
    unreachable: BaseException | None = None
    try:
        cache.redis_command("PING")
    except cache.CacheError as exc:
        # Not reachable, or the credentials refused; else PING itself was refused by an ACL,
        # and CONFIG GET below tells.
        if isinstance(exc, cache.CacheUnavailable) or _credentials_refused(exc):
            unreachable = exc
    if unreachable is not None:
        return [
            checks.Warning(
                f"knox_redis could not reach its Redis at {where}: {unreachable}. "
                "Every request will authenticate from the database, and logouts will answer 503.",
                hint="Check the cache's LOCATION (or REST_KNOX_REDIS['REDIS_URL']), its credentials, "
                "and that this host can reach the server.",
                id="knox_redis.W002",
            )
        ]
    try:
        config: dict[str, Any] = {}
        for name in ("maxmemory", "maxmemory-policy", "save", "appendonly"):
            reply = cache.redis_command("CONFIG", "GET", name)
            config.update(zip(reply[::2], reply[1::2], strict=True))
    except cache.CacheError as exc:
        return [
            checks.Warning(
                f"knox_redis could not check the configuration of its Redis at {where}: CONFIG GET was "
                f"refused ({exc}). Its maxmemory-policy and persistence are unverified.",
                hint="Check them by hand (see the README, System checks), or run `check --deploy` with a "
                "user allowed '+config|get'; then add 'knox_redis.W003' to SILENCED_SYSTEM_CHECKS.",
                id="knox_redis.W003",
            )
        ]
    return _redis_config_messages(config, where)


def _credentials_refused(exc: BaseException) -> bool:
    text = str(exc).upper()
    return any(marker in text for marker in ("WRONGPASS", "NOAUTH", "AUTHENTICATION", "INVALID USERNAME-PASSWORD"))


def _decoded(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _redis_config_messages(config: dict[Any, Any], where: str) -> list[checks.CheckMessage]:
    config = {_decoded(k): _decoded(v) for k, v in config.items()}
    messages: list[checks.CheckMessage] = []
    if config.get("maxmemory", "0") not in ("", "0") and config.get("maxmemory-policy") == "noeviction":
        messages.append(
            checks.Warning(
                f"The Redis at {where} has maxmemory {config['maxmemory']} with maxmemory-policy noeviction: "
                "once memory is full it refuses the writes that cache a token, so every token not cached yet "
                "is read from the database on each request, each time a Redis error that opens the circuit "
                "breaker (revocations still succeed, past maxmemory).",
                hint="Set maxmemory-policy allkeys-lru (volatile-lru if the Redis also holds keys without "
                "a TTL): every knox_redis key has a TTL, and LRU keeps the keys a revocation just wrote "
                "longest. Avoid volatile-ttl: it evicts the short-lived keys of revoked tokens first.",
                id="knox_redis.W004",
            )
        )
    persistence = []
    if config.get("save", "").strip():
        persistence.append(f"save {config['save']!r}")
    if config.get("appendonly") == "yes":
        persistence.append("appendonly yes")
    if persistence:
        messages.append(
            checks.Warning(
                f"The Redis at {where} persists its data ({', '.join(persistence)}): restarted from an "
                "older RDB/AOF file, it can bring back records of tokens revoked since, which are then "
                "accepted until MAX_CACHE_TTL.",
                hint='For a Redis dedicated to this cache, turn persistence off: save "" and appendonly no.',
                id="knox_redis.W005",
            )
        )
    return messages


@checks.register(checks.Tags.models)
def check_user_cache(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """USER_CACHE keeps the user's columns as the database driver returns them: a column type
    the row can't be trusted to hold (an array, a custom db_type) is an error naming it."""
    from django.contrib.auth import get_user_model

    from knox_redis.settings import knox_redis_settings

    try:
        enabled = knox_redis_settings.USER_CACHE
    except ImproperlyConfigured:
        return []  # E001 reports it
    return user_cache_errors(get_user_model()) if enabled else []


def user_cache_errors(user_model: Any) -> list[checks.CheckMessage]:
    from knox_redis.users import unsupported_fields

    return [
        checks.Error(
            f"REST_KNOX_REDIS['USER_CACHE'] can't cache {user_model._meta.label}.{problem.field.name}: "
            f"{problem.reason}.",
            hint="Turn USER_CACHE off, or store that value in a column of a supported type (text, integer, "
            "JSON, ...); knox_redis.users.fields_that_cant_round_trip(user) tries a saved user's row.",
            obj=problem.field,
            id="knox_redis.E010",
        )
        for problem in unsupported_fields(user_model)
    ]
