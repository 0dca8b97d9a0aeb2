"""Settings of the test project served by real gunicorn workers (tests/test_metrics_gunicorn.py):
the test's own database and redis-server, handed over in the environment."""

import json
import os

from tests.settings import *  # noqa: F403

DATABASES = {"default": json.loads(os.environ["KNOX_REDIS_TEST_DATABASE"])}
DATABASES["replica"] = DATABASES["default"]
CACHES["redis"]["LOCATION"] = os.environ["KNOX_REDIS_TEST_REDIS_URL"]  # noqa: F405
MIDDLEWARE = ["tests.settings_gunicorn.worker_pid", *MIDDLEWARE]  # noqa: F405


def worker_pid(get_response):
    """Says which worker answered."""

    def middleware(request):
        response = get_response(request)
        response["X-Worker-Pid"] = str(os.getpid())
        return response

    return middleware
