"""The test project as a WSGI application, for real servers (gunicorn in the tests)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings_gunicorn")
application = get_wsgi_application()
