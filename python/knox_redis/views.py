"""knox's views, authenticated by knox_redis and revoking in Redis before the database.

LoginView and LogoutView need nothing else: creating a token caches it once committed (the
post_save signal's write-through), and deleting one revokes it through the pre_delete signal.
LogoutAllView revokes all of the user's tokens in one round trip, however many there are.
"""

from __future__ import annotations

from typing import Any

from knox import views as knox_views

from knox_redis.auth import TokenAuthentication
from knox_redis.cache import revoking_all_tokens_of


class LoginView(knox_views.LoginView):
    pass


class LogoutView(knox_views.LogoutView):
    authentication_classes = (TokenAuthentication,)


class LogoutAllView(knox_views.LogoutAllView):
    authentication_classes = (TokenAuthentication,)

    def post(self, request: Any, format: Any = None) -> Any:
        with revoking_all_tokens_of(request.user):
            return super().post(request, format=format)
