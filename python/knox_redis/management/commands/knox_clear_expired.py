"""Delete expired knox tokens.

knox deletes a user's expired tokens whenever it reads that user's tokens from the database.
With knox_redis, cache hits skip the database, so a user who keeps using one cached token no
longer sweeps their other, expired ones. The miss path still does (it is knox's own code), a
token found expired in its record is deleted on use, and this command sweeps the rest: run it
from cron. Each deleted row goes through the ORM, so its cached record is revoked too.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.utils import timezone
from knox.models import get_token_model


class Command(BaseCommand):
    help = "Delete expired knox tokens (and their cached records), in batches."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args: Any, batch_size: int, **options: Any) -> None:
        token_model = get_token_model()
        now = timezone.now()
        total = 0
        while True:
            batch = list(token_model._base_manager.filter(expiry__lt=now).values_list("pk", flat=True)[:batch_size])
            if not batch:
                break
            deleted, _ = token_model._base_manager.filter(pk__in=batch, expiry__lt=now).delete()
            total += deleted
        self.stdout.write(f"Deleted {total} expired token(s).")
