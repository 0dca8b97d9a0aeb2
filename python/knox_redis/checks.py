"""System checks: a misconfigured REST_KNOX_REDIS fails at startup, not on the first request; the
ones that ask Redis (whether it lets knox_redis run every command it sends, and how it is
configured) run only with `manage.py check --deploy`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
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
    native client itself (same target, TLS, credentials and timeouts), whether it lets
    knox_redis run every command it sends, and whether its configuration weakens a guarantee.
    One pass per check run: a PING, two INFOs, one to three script calls, then the commands
    and channels only a configured mode needs (LOCAL_CACHE_SIZE), and CONFIG GET."""
    from knox_redis import cache
    from knox_redis.settings import redis_target

    try:
        target = redis_target()
        cache.get_client()
    except ImproperlyConfigured:
        return []  # knox_redis.E001
    server = _Server(where=target.where, user=target.username or "default")
    try:
        messages = _command_messages(server)
    except cache.CacheError as exc:  # unreachable, the credentials refused, SELECT or ROLE refused
        if _unreachable_error(exc):
            return [_unreachable(server, exc)]
        if _role_refused(exc):
            return [_refused(server, "role", ROLE_PURPOSE, _refusal(exc) or "command", exc)]
        if _info_refused(exc):
            return [_refused(server, "info", INFO_PURPOSE, _refusal(exc) or "command", exc)]
        return [_select_refused(server, target.db, exc)]
    try:
        config: dict[str, Any] = {}
        for name in ("maxmemory", "maxmemory-policy"):
            reply = cache.redis_command("CONFIG", "GET", name)
            config.update(zip(reply[::2], reply[1::2], strict=True))
    except cache.CacheError as exc:
        return [
            *messages,
            checks.Warning(
                f"knox_redis could not check the configuration of its Redis at {server.where}: CONFIG GET was "
                f"refused ({exc}). Its maxmemory-policy is unverified.",
                hint="Check them by hand (see the README, System checks), or run `check --deploy` with a "
                "user allowed '+config|get'; then add 'knox_redis.W003' to SILENCED_SYSTEM_CHECKS.",
                id="knox_redis.W003",
            ),
        ]
    return [*messages, *_redis_config_messages(config, server.where)]


# --- the commands knox_redis sends, probed by check --deploy ----------------------------


@dataclass
class _Server:
    where: str
    user: str
    version: str = "?"
    replicas: int = 0  # connected_slaves


def _setting(name: str, default: Any) -> Any:
    from knox_redis.settings import knox_redis_settings

    # A setting of a mode still being built reads as its default until it exists.
    return getattr(knox_redis_settings, name, default)


@dataclass(frozen=True)
class _Needed:
    """A command a configured mode sends: how to probe it harmlessly, and what fails without it."""

    acl: str  # its name in an ACL rule: 'wait', 'client|tracking'
    probe: tuple[str, ...]
    purpose: str
    when: Callable[[_Server], bool]


# Probed after INFO and the scripts, only when `when` says the configuration sends them.
# (CLIENT TRACKING: LOCAL_CACHE_SIZE does not exist yet, so it reads 0 until it does.)
CONDITIONAL_COMMANDS = (
    _Needed(
        "client|tracking",
        ("CLIENT", "TRACKING", "off"),  # this connection tracks nothing: a no-op
        "LOCAL_CACHE_SIZE keeps records in the process and drops them when Redis reports a write "
        "through CLIENT TRACKING",
        when=lambda server: _setting("LOCAL_CACHE_SIZE", 0) > 0,
    ),
    _Needed(
        "client|id",
        ("CLIENT", "ID"),
        "LOCAL_CACHE_SIZE's listener redirects CLIENT TRACKING's invalidations to itself by its id",
        when=lambda server: _setting("LOCAL_CACHE_SIZE", 0) > 0,
    ),
    _Needed(
        "wait",
        ("WAIT", "0", "0"),  # no replica to wait for: answers at once
        "a revocation on a primary with replicas online waits for one of them to have it (WAIT 1), and is "
        "refused (503) if it can't",
        when=lambda server: True,
    ),
    _Needed(
        "cluster|slots",
        ("CLUSTER", "SLOTS"),
        "on a Redis Cluster (REDIS_CLUSTER_NODES), each process asks where the slots live",
        when=lambda server: bool(_setting("REDIS_CLUSTER_NODES", None)),
    ),
    _Needed(
        "asking",
        ("ASKING",),  # a flag for the next command only: harmless
        "on a Redis Cluster, a key whose slot is migrating is asked for at the new node after ASKING",
        when=lambda server: bool(_setting("REDIS_CLUSTER_NODES", None)),
    ),
    _Needed(
        "publish",
        # Nobody listens on this channel: 0 receivers. (SUBSCRIBE, which the listener also
        # needs, can't be probed on a pooled connection; the README's line allows it.)
        ("PUBLISH", "{prefix}:heartbeat:check", "0"),
        "LOCAL_CACHE_SIZE's listener proves it is live with a heartbeat published through Redis every 100 ms "
        "(on channels under the key prefix, and `__redis__:invalidate`, which need `&` rules)",
        when=lambda server: _setting("LOCAL_CACHE_SIZE", 0) > 0,
    ),
)

# A script of the check's own: every command knox_redis's Lua scripts (src/lua/*.lua) call,
# on key names they use, each in redis.pcall; it returns each failure as a command and its
# error. A script's commands run with its caller's permissions, so an ACL that allows EVALSHA
# but not, say, HGETALL fails logoutall (503) and nothing else: this finds it before a user
# does. It leaves nothing behind: the one field it writes, in a key no token has (a token_key
# has 15 characters), it deletes again. tests/test_checks.py keeps its command list equal to
# the product scripts'.
PROBE_SCRIPT = """\
local token, index, field = KEYS[1], KEYS[2], ARGV[1]
local failed = {}
local function try(command, ...)
  local reply = redis.pcall(command, ...)
  if type(reply) == 'table' and reply['err'] then
    failed[#failed + 1] = command
    failed[#failed + 1] = reply['err']
  end
end
try('HSET', token, field, '1')
try('PEXPIRE', token, 60000)
try('PTTL', token)
try('HMGET', token, field)
try('HGET', token, field)
try('HDEL', token, field)
try('DEL', token)
try('TYPE', index)
try('HGETALL', index)
try('SMEMBERS', index)
try('SREM', index, field)
try('TIME')
try('INFO', 'replication')
return failed
"""
PROBE_SHA = hashlib.sha1(PROBE_SCRIPT.encode()).hexdigest()  # Redis names scripts by their SHA-1
PROBE_NAME = "knox_redis.check"

SCRIPT_FAILURE = "every request would authenticate from the database, and every logout answer 503"


def _command_messages(server: _Server) -> list[checks.CheckMessage]:
    """An Error for each command the configured modes need that Redis refuses (an ACL) or
    doesn't know (rename-command, a server without it). Raises CacheError when Redis can't be
    used at all (unreachable, credentials or SELECT refused)."""
    from knox_redis import cache

    refused: list[checks.CheckMessage] = []

    def ask(acl: str, purpose: str, *args: str | bytes) -> Any:
        """The reply; the error if Redis ran the command and answered one (NOSCRIPT, a READONLY
        replica...); None if it refused the command, which is then reported."""
        try:
            return cache.redis_command(*args)
        except cache.CacheError as exc:
            if isinstance(exc, cache.CacheUnavailable) or _connection_refused(exc):
                raise
            kind = _refusal(exc)
            if kind is None:
                return exc
            if kind == "key":
                refused.append(_keys_refused(server, [acl]))
            elif kind == "channel":  # PUBLISH to the heartbeat channel, under the prefix
                refused.append(_channel_refused(server, f"{knox_redis_settings_prefix()}:*", purpose, exc))
            else:
                refused.append(_refused(server, acl, purpose, kind, exc))
            return None

    ask("ping", "PING is how `manage.py knox_redis ping` and these checks reach Redis", "PING")
    info = ask(
        "info",
        "INFO tells knox_redis the server's version and replicas (`manage.py knox_redis ping` and `stats`, "
        "these checks)",
        "INFO",
        "server",
    )
    if isinstance(info, bytes | str):
        server.version = _info(info).get("redis_version", "?")
        replication = _info(cache.redis_command("INFO", "replication"))
        server.replicas = int(replication.get("connected_slaves", "0") or 0)

    # EVALSHA of a script the server may not have: NOSCRIPT means it may run it.
    evalsha = "every lookup, fill and revocation is a Lua script run with EVALSHA: " + SCRIPT_FAILURE
    native = cache.get_client()
    run = ("EVALSHA", PROBE_SHA, "2", native.token_key(PROBE_NAME), native.user_key(PROBE_NAME), PROBE_NAME)
    failed = ask("evalsha", evalsha, *run)
    if isinstance(failed, cache.CacheError) and "NOSCRIPT" in str(failed).upper():
        load = (
            "the scripts are loaded with SCRIPT LOAD whenever the server lacks them (their first use, after "
            "a restart or SCRIPT FLUSH): until then " + SCRIPT_FAILURE
        )
        if ask("script|load", load, "SCRIPT", "LOAD", PROBE_SCRIPT) is not None:
            failed = ask("evalsha", evalsha, *run)
    if isinstance(failed, list):
        refused += _script_messages(server, failed)

    prefix = knox_redis_settings_prefix()
    for needed in CONDITIONAL_COMMANDS:
        if needed.when(server):
            ask(needed.acl, needed.purpose, *(arg.format(prefix=prefix) for arg in needed.probe))
    if _setting("LOCAL_CACHE_SIZE", 0) > 0:
        refused += _subscribe_messages(server, prefix)
    return refused


def _subscribe_messages(server: _Server, prefix: str) -> list[checks.CheckMessage]:
    """LOCAL_CACHE_SIZE's listener subscribes to CLIENT TRACKING's invalidations and to its own
    heartbeat: tried on a connection of its own (never a pooled one)."""
    from knox_redis import cache

    purpose = (
        "LOCAL_CACHE_SIZE's listener subscribes to __redis__:invalidate (what CLIENT TRACKING sends) and "
        f"to its heartbeat under {prefix}:; without them it never goes live and every request asks Redis"
    )
    for channel in ("__redis__:invalidate", f"{prefix}:heartbeat:check"):
        try:
            cache.get_client().probe_subscribe([channel])
        except cache.CacheError as exc:
            if isinstance(exc, cache.CacheUnavailable) or _connection_refused(exc):
                raise
            kind = _refusal(exc)
            if kind == "channel":
                pattern = channel if channel.startswith("__redis__") else f"{prefix}:*"
                return [_channel_refused(server, pattern, purpose, exc)]
            if kind is not None:
                return [_refused(server, "subscribe", purpose, kind, exc)]
    return []


def _channel_refused(server: _Server, pattern: str, purpose: str, error: object) -> checks.CheckMessage:
    return checks.Error(
        f"The Redis at {server.where} (Redis {server.version}) refuses channel {pattern!r} to user "
        f"{server.user!r} ({error}): {purpose}.",
        hint=f"Allow it: ACL SETUSER {server.user} &{pattern} (the README's least-privilege line has "
        "every channel knox_redis uses).",
        id="knox_redis.E004",
    )


def knox_redis_settings_prefix() -> str:
    from knox_redis.settings import knox_redis_settings

    return knox_redis_settings.REDIS_KEY_PREFIX


def _script_messages(server: _Server, failed: list[Any]) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    keys_refused = []
    for raw_command, raw_error in zip(failed[::2], failed[1::2], strict=True):
        command, error = _decoded(raw_command), _decoded(raw_error)
        kind = _refusal(error)
        if kind == "key":
            keys_refused.append(command)
        elif kind is not None:
            purpose = (
                f"knox_redis's Lua scripts call {command}, and a script's commands run with its caller's "
                "permissions: each script that calls it fails (a lookup or a fill: the request authenticates "
                "from the database; a revocation: the logout answers 503)"
            )
            messages.append(_refused(server, command.lower(), purpose, kind, error))
    if keys_refused:
        messages.append(_keys_refused(server, keys_refused))
    return messages


def _keys_refused(server: _Server, commands: list[str]) -> checks.CheckMessage:
    from knox_redis import cache

    pattern = cache.key_pattern()
    return checks.Error(
        f"The Redis at {server.where} (Redis {server.version}) does not let user {server.user!r} use the keys "
        f"knox_redis's scripts use, under {pattern!r} ({', '.join(c.upper() for c in commands)} refused): "
        f"{SCRIPT_FAILURE}.",
        hint=f"Allow the prefix's keys: ACL SETUSER {server.user} ~{pattern} (see the README, Operations).",
        id="knox_redis.E004",
    )


def _refused(server: _Server, acl: str, purpose: str, kind: str, error: object) -> checks.CheckMessage:
    command = acl.replace("|", " ").upper()
    if kind == "unknown":
        return checks.Error(
            f"The Redis at {server.where} (Redis {server.version}) does not know {command} ({error}): {purpose}.",
            hint=f"Use a Redis 6.2 or later that has {command} under its own name (no rename-command for it).",
            id="knox_redis.E004",
        )
    return checks.Error(
        f"The Redis at {server.where} (Redis {server.version}) refuses {command} to user {server.user!r} "
        f"({error}): {purpose}.",
        hint=f"Allow it: ACL SETUSER {server.user} +{acl} (the README's least-privilege line, in Operations, "
        "has every command knox_redis sends).",
        id="knox_redis.E004",
    )


def _refusal(error: object) -> str | None:
    """'command', 'key' or 'channel' when an ACL refused, 'unknown' when the server doesn't know the
    command; None for any other error. Redis words it differently inside scripts and across
    versions (6.2, 7.x)."""
    text = str(error).lower()
    if any(marker in text for marker in ("unknown command", "unknown redis command", "unknown subcommand")):
        return "unknown"
    if "noperm" in text or "no permissions" in text or "can't run" in text or "can't access" in text:
        if "channel" in text:
            return "channel"
        return "key" if "access" in text and "key" in text else "command"
    return None


def _connection_refused(exc: BaseException) -> bool:
    """The connection itself failed: the credentials, or the SELECT or INFO (or, with
    Sentinel, the ROLE) each new one sends."""
    text = str(exc).lower()
    return _credentials_refused(exc) or "switch database" in text or _role_refused(exc) or _info_refused(exc)


# src/sentinel.rs words a refused ROLE so (it is sent before the connection is used).
ROLE_PURPOSE = (
    "with Sentinel, each new connection asks the node its ROLE and is used only if it answers master "
    "(never a replica): no connection can be used, so every request authenticates from the database "
    "and every logout answers 503"
)


def _role_refused(exc: BaseException) -> bool:
    return "role (sent on each new connection in sentinel mode) failed" in str(exc).lower()


# src/incarnation.rs words a refused INFO so (it is sent before the connection is used).
INFO_PURPOSE = (
    "each new connection asks the server its run_id and replication id (one INFO), "
    "so that a record restored from an older snapshot or replicated before a failover is never trusted: "
    "no connection can be used, so every request authenticates from the database and every logout "
    "answers 503"
)


def _info_refused(exc: BaseException) -> bool:
    return "info (sent on each new connection, to learn the server's run_id) failed" in str(exc).lower()


def _unreachable_error(exc: BaseException) -> bool:
    from knox_redis import cache

    return isinstance(exc, cache.CacheUnavailable) or _credentials_refused(exc)


def _unreachable(server: _Server, exc: BaseException) -> checks.CheckMessage:
    return checks.Warning(
        f"knox_redis could not reach its Redis at {server.where}: {exc}. "
        "Every request will authenticate from the database, and logouts will answer 503.",
        hint="Check the cache's LOCATION (or REST_KNOX_REDIS['REDIS_URL']), its credentials, "
        "and that this host can reach the server.",
        id="knox_redis.W002",
    )


def _select_refused(server: _Server, db: int, exc: BaseException) -> checks.CheckMessage:
    kind = _refusal(exc)
    if kind is None:  # another reason (a database number the server doesn't have)
        return _unreachable(server, exc)
    purpose = f"knox_redis uses database {db}, selected on every new connection: " + SCRIPT_FAILURE
    return _refused(server, "select", purpose, kind, exc)


def _info(raw: Any) -> dict[str, str]:
    text = _decoded(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return {key: value.strip() for key, value in pairs}


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
                "is read from the database on each request, each time with an OOM error reply from Redis "
                '(counted as errors_total{kind="reply"}; the circuit breaker stays closed: Redis answers) '
                "(revocations still succeed, past maxmemory).",
                hint="Set maxmemory-policy allkeys-lru (volatile-lru if the Redis also holds keys without "
                "a TTL): every knox_redis key has a TTL, and LRU keeps the keys a revocation just wrote "
                "longest. Avoid volatile-ttl: it evicts the short-lived keys of revoked tokens first.",
                id="knox_redis.W004",
            )
        )
    return messages


@checks.register(checks.Tags.models)
def check_user_cache(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """USER_CACHE keeps the user's columns as the database driver returns them: a column type
    the row can't be trusted to hold (an array, a custom db_type) is an error naming it."""
    from knox_redis.settings import knox_redis_settings
    from knox_redis.users import token_models

    try:
        enabled = knox_redis_settings.USER_CACHE
    except ImproperlyConfigured:
        return []  # E001 reports it
    return user_cache_errors(token_models()[1]) if enabled else []


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
