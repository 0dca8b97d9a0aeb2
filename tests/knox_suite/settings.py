"""Settings for running knox's own test suite with knox_redis swapped in."""

from tests.settings import *  # noqa: F403  (the same project, with knox's URLs)

ROOT_URLCONF = "tests.knox_suite.urls"
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": (
        "rest_framework.authentication.BasicAuthentication",
        "knox_redis.auth.TokenAuthentication",
    ),
}
