"""The Django project bench/http_ratio.py serves with gunicorn: settings and URLs in one module.

Configured from the environment that bench/http_ratio.py sets: KNOX_BENCH_DATABASE (the DATABASES
entry, JSON), KNOX_BENCH_REDIS_URL, KNOX_BENCH_MODE (which authentication class /auth/ uses).
`/anon/` answers without authentication: the same view, the same middleware.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

MODE = os.environ.get("KNOX_BENCH_MODE", "knox")
MODES = {
    "knox": ("knox.auth.TokenAuthentication", {}),
    "knox_redis": ("knox_redis.auth.TokenAuthentication", {}),
    "knox_redis USER_CACHE + LOCAL_CACHE_SIZE": (
        "knox_redis.auth.TokenAuthentication",
        {"USER_CACHE": True, "USER_CACHE_TTL": 3600, "LOCAL_CACHE_SIZE": 4000},
    ),
    "ceiling (no I/O)": ("http_app.CeilingAuthentication", {}),
}
AUTH_CLASS, EXTRA = MODES[MODE]

SECRET_KEY = "bench-http-" + "x" * 40
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "http_app"
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "rest_framework", "knox", "knox_redis"]
MIDDLEWARE: list[str] = []
DATABASES = {"default": json.loads(os.environ.get("KNOX_BENCH_DATABASE", "{}") or "{}")}
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": os.environ.get("KNOX_BENCH_REDIS_URL", ""),
    }
}
REST_KNOX_REDIS = {"CACHE_ALIAS": "default", **EXTRA}
REST_KNOX = {"TOKEN_TTL": timedelta(hours=10), "AUTO_REFRESH": False}
REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": [AUTH_CLASS], "UNAUTHENTICATED_USER": None}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {"version": 1, "loggers": {"knox_redis": {"level": "ERROR"}}}


def _urlpatterns() -> list[Any]:
    from django.urls import path
    from rest_framework.permissions import AllowAny, IsAuthenticated
    from rest_framework.response import Response
    from rest_framework.views import APIView

    class Authenticated(APIView):
        permission_classes = (IsAuthenticated,)

        def get(self, request: Any) -> Response:
            return Response({"user": request.user.pk})

    class Anonymous(APIView):
        authentication_classes = ()
        permission_classes = (AllowAny,)

        def get(self, request: Any) -> Response:
            return Response({"user": None})

    return [path("auth/", Authenticated.as_view()), path("anon/", Anonymous.as_view())]


class CeilingAuthentication:
    """Builds the user and the token from a dict loaded once per worker: no I/O per request.
    The user is the one a knox_redis hit returns: every column but the password and
    last_login (which USER_CACHE defers)."""

    _rows: dict[str, tuple[Any, ...]] | None = None
    _columns: tuple[str, ...] = ()

    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        from django.contrib.auth import get_user_model
        from knox.models import AuthToken

        user_model = get_user_model()
        if CeilingAuthentication._rows is None:
            columns = [
                f.attname for f in user_model._meta.concrete_fields if f.attname not in ("password", "last_login")
            ]
            CeilingAuthentication._columns = columns
            CeilingAuthentication._rows = {
                row.token_key: ([row.user.__dict__[c] for c in columns], row.digest, row.created, row.expiry)
                for row in AuthToken.objects.select_related("user")
            }
        token = request.META["HTTP_AUTHORIZATION"].split()[1]
        values, digest, created, expiry = CeilingAuthentication._rows[token[:15]]
        user = user_model.from_db("default", list(CeilingAuthentication._columns), values)
        auth_token = AuthToken.from_db(
            "default",
            ["digest", "token_key", "user_id", "created", "expiry"],
            [digest, token[:15], user.pk, created, expiry],
        )
        auth_token.user = user
        return user, auth_token

    def authenticate_header(self, request: Any) -> str:
        return "Token"


def __getattr__(name: str) -> Any:
    # urlpatterns, built once Django's apps are loaded (ROOT_URLCONF is this module).
    if name == "urlpatterns":
        patterns = _urlpatterns()
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


def application(environ: Any, start_response: Any) -> Any:
    global _wsgi
    if _wsgi is None:
        from django.core.wsgi import get_wsgi_application

        _wsgi = get_wsgi_application()
    return _wsgi(environ, start_response)


_wsgi: Any = None
