"""Test settings: SQLite by default; PostgreSQL with KNOX_REDIS_TEST_DB=postgres (DATABASE_URL
or the local server). The Redis LOCATION is filled in by conftest, which starts the server."""

import os
import tempfile
from urllib.parse import urlsplit

SECRET_KEY = "knox-redis-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "rest_framework",
    "knox",
    "knox_redis",
    "tests.testapp",
    "tests.userapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "knox_redis.middleware.RevocationUnavailableMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _postgres() -> dict:
    url = urlsplit(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/") or "postgres",
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
        "TEST": {"NAME": f"test_knox_redis_{os.getpid()}"},
    }


if os.environ.get("KNOX_REDIS_TEST_DB") == "postgres":
    DATABASES = {"default": _postgres()}
else:
    # A file, not :memory:, so that threads and forked processes share one database.
    _db = os.path.join(tempfile.gettempdir(), f"knox_redis_test_{os.getpid()}.sqlite3")
    # A generous lock timeout: the stress tests write from several threads on a busy machine.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _db,
            "TEST": {"NAME": _db},
            "OPTIONS": {"timeout": 30},
        }
    }

# A read replica alias (a mirror of default in tests) for the primary/replica router test.
DATABASES["replica"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "redis": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:6399/0",  # replaced by conftest with the server it starts
    },
}
REST_KNOX_REDIS = {"CACHE_ALIAS": "redis"}
REST_KNOX = {}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.BasicAuthentication",
        "knox_redis.auth.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"knox_redis": {"handlers": ["console"], "level": "ERROR"}},
}
