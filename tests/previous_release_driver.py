"""Runs under the previous release's virtualenv (tests/previous_release.py): a process of the
old code beside the tests' own, against the same database and Redis. Reads one command per
line on stdin, answers one line on stdout:

    auth <token>            -> "200 <username>" | "401"
    delete <token>          -> "deleted <n>"     (an ORM delete: the old release revokes)
    logoutall <username>    -> "deleted <n>"     (the old LogoutAllView's revocation path)
"""

import json
import sys

import django
from django.conf import settings

config = json.loads(sys.argv[1])
settings.configure(
    SECRET_KEY="knox-redis-tests",
    USE_TZ=True,
    TIME_ZONE="UTC",
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "rest_framework",
        "knox",
        "knox_redis",
    ],
    DATABASES={"default": config["database"]},
    CACHES={"redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": config["redis_url"]}},
    REST_KNOX_REDIS={"CACHE_ALIAS": "redis"},
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
)
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from knox.models import AuthToken  # noqa: E402
from rest_framework.exceptions import AuthenticationFailed  # noqa: E402
from rest_framework.test import APIRequestFactory  # noqa: E402

from knox_redis.auth import TokenAuthentication  # noqa: E402
from knox_redis.cache import revoking_all_tokens_of  # noqa: E402

factory = APIRequestFactory()


def run(command: str, arg: str) -> str:
    if command == "auth":
        try:
            found = TokenAuthentication().authenticate(factory.get("/", HTTP_AUTHORIZATION=f"Token {arg}"))
        except AuthenticationFailed:
            return "401"
        return "401" if found is None else f"200 {found[0].get_username()}"
    if command == "delete":
        return f"deleted {AuthToken.objects.filter(token_key=arg[:15]).delete()[0]}"
    if command == "logoutall":
        user = get_user_model().objects.get(username=arg)
        with revoking_all_tokens_of(user):
            return f"deleted {user.auth_token_set.all().delete()[0]}"
    return f"unknown command {command}"


print("ready", flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    try:
        print(run(command, arg), flush=True)
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
