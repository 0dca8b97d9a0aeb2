"""Answer 503, not 500, when a token can't be revoked outside a DRF view.

DRF views turn `RevocationUnavailable` into a 503 themselves. The admin, plain Django views
and cascades from `user.delete()` don't: add this middleware for them.

    MIDDLEWARE = [..., "knox_redis.middleware.RevocationUnavailableMiddleware"]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from knox_redis.cache import RevocationUnavailable


class RevocationUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        if isinstance(exception, RevocationUnavailable):
            response = HttpResponse(str(exception.detail), status=503, content_type="text/plain")
            response["Retry-After"] = "5"
            return response
        return None
