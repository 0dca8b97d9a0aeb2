"""The test settings with a UUID-keyed user model (AUTH_USER_MODEL can't change at runtime):
`pytest --ds=tests.settings_uuid tests/test_uuid_users.py`, as `make test` runs it."""

from tests.settings import *  # noqa: F403

# tests.userapp subclasses the stock user model, which this one replaces.
INSTALLED_APPS = [*(app for app in INSTALLED_APPS if app != "tests.userapp"), "tests.uuidapp"]  # noqa: F405
AUTH_USER_MODEL = "uuidapp.UUIDUser"
