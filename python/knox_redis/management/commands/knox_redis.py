"""`manage.py knox_redis <action>`: look at and manage the token cache.

    ping           connectivity, server version, round-trip latency (exit 1 if unreachable)
    stats          this process's counters, keys and memory under the prefix (SCAN sampling),
                   the server's eviction policy and persistence
    warm           cache live, unexpired tokens, in batches, under the same lease as requests
    purge          remove every key under the prefix (SCAN + UNLINK, never KEYS)
    clear-expired  delete expired tokens in batches, revoking them and sending token_expired

`--json` prints one JSON object instead of text, for scripts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import router
from django.utils import timezone
from knox.models import get_token_model
from knox.signals import token_expired

import knox_redis
from knox_redis import cache
from knox_redis.settings import knox_redis_settings

SCAN_COUNT = 1000
MEMORY_SAMPLE = 200


class Command(BaseCommand):
    help = "Look at and manage the knox_redis token cache: ping, stats, warm, purge, clear-expired."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        actions = parser.add_subparsers(dest="action", required=True)
        actions.add_parser("ping", help="connectivity, server version and latency")
        actions.add_parser("stats", help="counters, keys and memory under the prefix, server policy")
        warm = actions.add_parser("warm", help="cache live, unexpired tokens")
        warm.add_argument("--batch-size", type=int, default=500)
        purge = actions.add_parser("purge", help="remove every key under the prefix")
        purge.add_argument("--noinput", "--no-input", action="store_false", dest="interactive")
        clear = actions.add_parser("clear-expired", help="delete expired tokens")
        clear.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        handler = {
            "ping": self.ping,
            "stats": self.stats,
            "warm": self.warm,
            "purge": self.purge,
            "clear-expired": self.clear_expired,
        }[action]
        try:
            result = handler(**options)
        except (cache.CacheError, ImproperlyConfigured) as exc:
            raise CommandError(f"Redis can't be reached or used: {exc}") from exc
        if options["json"]:
            self.stdout.write(json.dumps(result, default=str))

    def say(self, options: dict[str, Any], text: str) -> None:
        if not options["json"]:
            self.stdout.write(text)

    # --- actions ---------------------------------------------------------------------

    def ping(self, **options: Any) -> dict[str, Any]:
        started = time.perf_counter()
        cache.redis_command("PING")
        latency_ms = (time.perf_counter() - started) * 1000
        version = _info(cache.redis_command("INFO", "server")).get("redis_version", "?")
        self.say(options, f"PONG from Redis {version} in {latency_ms:.2f} ms")
        return {"ok": True, "redis_version": version, "latency_ms": round(latency_ms, 3)}

    def stats(self, **options: Any) -> dict[str, Any]:
        keys, sampled, sampled_bytes = 0, 0, 0
        for node, batch in _scan(cache.key_pattern()):
            keys += len(batch)
            for key in batch[: max(0, MEMORY_SAMPLE - sampled)]:
                sampled_bytes += cache.redis_command("MEMORY", "USAGE", key, node=node) or 0
                sampled += 1
        memory = _info(cache.redis_command("INFO", "memory"))
        persistence = _info(cache.redis_command("INFO", "persistence"))
        result = {
            # This command's own process: a server's workers are scraped (knox_redis.metrics).
            "process_counters": knox_redis.stats(),
            "prefix": knox_redis_settings.REDIS_KEY_PREFIX,
            "keys": keys,
            "estimated_bytes": round(sampled_bytes / sampled * keys) if sampled else 0,
            "maxmemory": memory.get("maxmemory"),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            # RDB snapshots as configured (CONFIG may be refused: then None, "unknown").
            "rdb_save": _config("save"),
            "aof_enabled": persistence.get("aof_enabled") == "1",
        }
        rdb = result["rdb_save"] if result["rdb_save"] is not None else "unknown"
        aof = "on" if result["aof_enabled"] else "off"
        size = f"about {result['estimated_bytes']} bytes, from {sampled} sampled"
        policy = f"maxmemory {result['maxmemory']}, policy {result['maxmemory_policy']}"
        lines = [
            f"keys under {result['prefix']}:*  {keys} ({size})",
            f"{policy}, RDB save {rdb!r}, AOF {aof}",
            "this process: "
            + ", ".join(f"{k} {v}" for k, v in result["process_counters"].items() if not isinstance(v, dict)),
        ]
        self.say(options, "\n".join(lines))
        return result

    def warm(self, *, batch_size: int, **options: Any) -> dict[str, Any]:
        token_model = get_token_model()
        using = router.db_for_write(token_model)
        live = token_model._base_manager.using(using).exclude(expiry__lt=timezone.now()).order_by("pk")
        total = live.count()
        seen, filled, last = 0, 0, None
        while True:
            batch = live.filter(pk__gt=last) if last is not None else live
            rows = list(batch.only("digest", "token_key", "user_id", "created", "expiry")[:batch_size])
            if not rows:
                break
            filled += cache.warm(rows, using)
            seen += len(rows)
            last = rows[-1].pk
            if not options["json"]:
                self.stdout.write(f"\rwarming: {seen}/{total} tokens read, {filled} cached", ending="")
                self.stdout.flush()
        self.say(options, "")
        return {"tokens": seen, "cached": filled}

    def purge(self, *, interactive: bool, **options: Any) -> dict[str, Any]:
        pattern = cache.key_pattern()
        if interactive and not _confirm(f"Remove every key matching {pattern!r} from Redis? [y/N] "):
            raise CommandError("Purge cancelled.")
        removed = 0
        for node, batch in _scan(pattern):
            if node is None:
                removed += cache.redis_command("UNLINK", *batch) if batch else 0
            else:
                # A Cluster refuses keys of several slots in one command: one at a time.
                removed += sum(cache.redis_command("UNLINK", key, node=node) for key in batch)
        self.say(options, f"Removed {removed} key(s) matching {pattern}.")
        return {"removed": removed}

    def clear_expired(self, *, batch_size: int, **options: Any) -> dict[str, Any]:
        deleted = clear_expired_tokens(batch_size, sender=type(self))
        self.say(options, f"Deleted {deleted} expired token(s).")
        return {"deleted": deleted}


def clear_expired_tokens(batch_size: int, sender: type) -> int:
    """Delete expired tokens in batches through the ORM (each is revoked in Redis by the
    pre_delete signal) and send knox's token_expired for each, as knox's own cleanup does."""
    token_model = get_token_model()
    # Reads from the write database too: a lagging replica would show deleted rows again.
    tokens = token_model._base_manager.using(router.db_for_write(token_model))
    now = timezone.now()
    total = 0
    while True:
        batch = list(tokens.filter(expiry__lt=now).select_related("user").only("pk", "user")[:batch_size])
        if not batch:
            break
        pks = [t.pk for t in batch]
        deleted, _ = tokens.filter(pk__in=pks, expiry__lt=now).delete()
        total += deleted
        # Only for rows that went (one refreshed in between stays, and expired nothing).
        kept = set(tokens.filter(pk__in=pks).values_list("pk", flat=True))
        for token in batch:
            if token.pk not in kept:
                token_expired.send(sender=sender, username=token.user.get_username(), source="clear_expired")
    return total


def _scan(pattern: str) -> Iterator[tuple[str | None, list[bytes]]]:
    """Every key matching `pattern`, in SCAN's batches, with the node it is on: each primary of
    a Redis Cluster in turn (a SCAN sees one node's keys), else the one server (None)."""
    for node in cache.redis_nodes():
        cursor = b"0"
        while True:
            cursor, batch = cache.redis_command("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT, node=node)
            yield node, batch
            if cursor in (b"0", 0, "0"):
                break


def _config(name: str) -> str | None:
    try:
        reply = cache.redis_command("CONFIG", "GET", name)
    except cache.CacheError:
        return None  # refused (a managed Redis, an ACL without CONFIG)
    return reply[1].decode() if isinstance(reply, list) and len(reply) == 2 else None


def _info(raw: Any) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return {key: value.strip() for key, value in pairs}


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(question).strip().lower() in ("y", "yes")
