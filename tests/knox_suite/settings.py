"""Settings for running knox's own test suite with knox_redis swapped in."""

import os

from tests.settings import *  # noqa: F403  (the same project, with knox's URLs)

if os.environ.get("KNOX_SUITE_USER_CACHE") == "1":
    REST_KNOX_REDIS = {**REST_KNOX_REDIS, "USER_CACHE": True}  # noqa: F405
if os.environ.get("KNOX_SUITE_LOCAL_CACHE") == "1":
    REST_KNOX_REDIS = {**REST_KNOX_REDIS, "LOCAL_CACHE_SIZE": 1000}

ROOT_URLCONF = "tests.knox_suite.urls"
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": (
        "rest_framework.authentication.BasicAuthentication",
        "knox_redis.auth.TokenAuthentication",
    ),
}
