"""`manage.py knox_clear_expired`: the old name of `manage.py knox_redis clear-expired`.

knox deletes a user's expired tokens whenever it reads that user's tokens from the database.
With knox_redis, cache hits skip the database, so a user who keeps using one cached token no
longer sweeps their other, expired ones. The miss path still does (it is knox's own code), a
token found expired in its record is deleted on use, and this command sweeps the rest: run it
from cron.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from knox_redis.management.commands.knox_redis import clear_expired_tokens


class Command(BaseCommand):
    help = "Delete expired knox tokens (and their cached records), in batches. Also: knox_redis clear-expired."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args: Any, batch_size: int, **options: Any) -> None:
        total = clear_expired_tokens(batch_size, sender=type(self))
        self.stdout.write(f"Deleted {total} expired token(s).")
