"""Review (Sentinel settings).

1. django-redis' Sentinel cache reaches TLS data nodes only through
   `OPTIONS["CONNECTION_POOL_KWARGS"] = {"ssl": True, ...}` with a `redis://` LOCATION:
   redis-py's SentinelConnectionPool picks SentinelManagedSSLConnection from that `ssl`
   kwarg, while a `rediss://` LOCATION makes it use a plain SSLConnection to the host
   "mymaster" itself (the form tests/test_settings.py and the README accept, which breaks the
   app's own cache). knox_redis reads TLS from the scheme alone, so for the working form it
   connects to the data nodes in clear text, sending AUTH (the password) unencrypted before
   the TLS port drops it: credentials on the wire, and every request from the database.
2. A SENTINELS entry that is not a (host, port) pair is echoed whole in the error: a URL as
   Celery/kombu write sentinels (`sentinel://:password@host:26379`) puts the password in the
   ImproperlyConfigured message (and so in logs, `manage.py check` output).
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from knox_redis.settings import redis_target
from tests.test_settings import target_for


def test_tls_data_nodes_as_django_redis_sentinel_configures_them():
    options = {
        "CLIENT_CLASS": "django_redis.client.SentinelClient",
        "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
        "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
        "SENTINELS": [("10.0.0.1", 26379)],
        "CONNECTION_POOL_KWARGS": {"ssl": True, "ssl_ca_certs": "/data.pem"},
    }
    target = target_for("redis://:data-pw@mymaster/0", options=options)
    assert (target.tls, target.tls_ca_certs) == (True, "/data.pem"), target


def test_what_redis_py_makes_of_both_forms():
    """The premise of the test above, from redis-py itself."""
    from redis.connection import SSLConnection
    from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedSSLConnection

    manager = Sentinel([("127.0.0.1", 1)])
    pool = SentinelConnectionPool.from_url(
        "redis://mymaster/0", service_name="mymaster", sentinel_manager=manager, ssl=True
    )
    assert pool.connection_class is SentinelManagedSSLConnection
    pool = SentinelConnectionPool.from_url("rediss://mymaster/0", service_name="mymaster", sentinel_manager=manager)
    assert pool.connection_class is SSLConnection  # not Sentinel-managed: connects to "mymaster":6379


def test_a_sentinel_url_in_sentinels_is_not_echoed_with_its_password():
    explicit = {"SENTINELS": ["sentinel://:hunter2@10.0.0.1:26379"], "SENTINEL_SERVICE_NAME": "mymaster"}
    with override_settings(REST_KNOX_REDIS=explicit), pytest.raises(ImproperlyConfigured) as raised:
        redis_target()
    assert "hunter2" not in str(raised.value), str(raised.value)
