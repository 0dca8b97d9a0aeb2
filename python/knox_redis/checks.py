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
