"""A cached record expires when its token does: at the same instant the database's expiry
says, whatever the time-zone settings and the time zone a request activates."""

from __future__ import annotations

import time
from datetime import timedelta

from django.utils import timezone
from knox.models import AuthToken

from tests.helpers import accepted, record_exists


def test_use_tz_false_with_an_activated_time_zone_keeps_expiry(user, settings, redis_conn):
    """With USE_TZ off, datetimes are naive: a time zone activated for the request (14 hours
    ahead of UTC here) must not move the cached expiry."""
    settings.USE_TZ = False
    _instance, token = AuthToken.objects.create(user=user, expiry=timedelta(seconds=1))
    assert accepted(token)
    assert record_exists(redis_conn, token)
    time.sleep(1.2)
    with timezone.override("Etc/GMT-14"):  # a middleware activating the user's zone
        assert not accepted(token)
