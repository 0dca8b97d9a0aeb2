"""``REST_KNOX_REDIS``: read once, validated, reloaded in place when a test overrides it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # The Django cache (django-redis or django.core.cache.backends.redis) whose primary Redis
    # the native client connects to. Ignored when REDIS_URL is set.
    "CACHE_ALIAS": "default",
    "REDIS_URL": None,
    "REDIS_KEY_PREFIX": "knox",
    # False: authenticate through the database only, but still revoke cached records, so a
    # fleet that mixes both settings stays consistent.
    "CACHE_ENABLED": True,
    "SOCKET_CONNECT_TIMEOUT": 0.2,
    "SOCKET_TIMEOUT": 0.2,
    # After a failed call, go straight to the database for this long before probing again.
    "CIRCUIT_BREAKER_COOLDOWN": 2.0,
    # A cached record is re-read from the database at least this often (bounds how long a
    # write that bypasses Django signals, such as raw SQL, can go unnoticed).
    "MAX_CACHE_TTL": 3600,
    # How long a revocation blocks fills of the same token (longer than any transaction that
    # deletes tokens should stay open).
    "REVOCATION_TOMBSTONE_TTL": 60,
    "MAX_IDLE_CONNECTIONS": 32,
    # Microseconds a connection keeps reading the socket for a reply before it sleeps (0:
    # sleep at once). A reply from a Redis on the same host often comes back within it, and
    # a thread that slept pays again to be woken; replies that keep taking longer turn it
    # off by itself for a while (a Redis across the network costs a few wasted polls).
    "BUSY_POLL_US": 100,
    # The secret cached records are signed with (a MAC that Redis can't forge): None uses
    # SECRET_KEY. Changing it turns every cached record into a miss, read again once.
    "SIGNING_KEY": None,
    # Older secrets that still verify records (never sign them) while a rotation rolls out;
    # with SIGNING_KEY None, Django's SECRET_KEY_FALLBACKS.
    "SIGNING_KEY_FALLBACKS": (),
    # Cache the user row too: a hit then makes no database query at all. Every ORM save or
    # delete of a user (proxies and multi-table parents included) revokes the cached row
    # first, as a logout revokes a token; writes that bypass signals (QuerySet.update, raw
    # SQL) are seen within USER_CACHE_TTL, or at once after knox_redis.invalidate_user().
    "USER_CACHE": False,
    # Seconds a cached user row is trusted before it is read from the database again.
    "USER_CACHE_TTL": 60,
    # Entries of an in-process cache in front of Redis (0: none). A repeat hit then makes no
    # network call; Redis pushes every change under the prefix to a listener thread that
    # keeps it coherent (CLIENT TRACKING), and it serves nothing unless that listener heard
    # from Redis within the last second.
    "LOCAL_CACHE_SIZE": 0,
    # Redis Sentinel, named here rather than by a django-redis Sentinel cache (CACHE_ALIAS
    # works as it is): the sentinels, as (host, port) pairs, and the service name. The
    # sentinels say which node is the primary; REDIS_URL, if set, gives only the database,
    # credentials and TLS (redis://:password@service_name/0).
    "SENTINELS": None,
    "SENTINEL_SERVICE_NAME": None,
    # The sentinels' own credentials and TLS, as django-redis' OPTIONS["SENTINEL_KWARGS"]:
    # username, password, ssl, ssl_ca_certs (other keys are ignored: the timeouts above apply).
    "SENTINEL_KWARGS": None,
    # Redis Cluster: a list of redis:// or rediss:// URLs of seed nodes (any of the cluster's
    # nodes; they tell where each slot lives). Username, password and TLS options in each URL
    # as in REDIS_URL (they must agree); database 0 only. REDIS_URL and CACHE_ALIAS are then
    # unused.
    "REDIS_CLUSTER_NODES": None,
}

REDIS_BACKENDS = (
    "django_redis.cache.RedisCache",
    "django.core.cache.backends.redis.RedisCache",
)


@dataclass(frozen=True)
class RedisTarget:
    """Where the native client connects: the primary only, never a replica."""

    host: str | None = None
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # kept out of error messages
    tls: bool = False
    tls_ca_certs: str | None = None
    # Sentinel: the primary of this service, as these sentinels name it (host and port unused).
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool = False
    sentinel_tls_ca_certs: str | None = None
    # Redis Cluster: the seed nodes (host and port unused); credentials and TLS above.
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def where(self) -> str:
        """The server, as messages name it."""
        if self.cluster_nodes:
            return "the Redis Cluster of " + ", ".join(f"{host}:{port}" for host, port in self.cluster_nodes)
        if self.sentinels:
            return f"the primary of Sentinel service {self.sentinel_service_name!r}"
        return self.unix_path or f"{self.host}:{self.port}"


class KnoxRedisSettings:
    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None
        self._generation = 0  # reloads so far
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid REST_KNOX_REDIS setting: {name!r}")
        while True:
            generation, values = self._generation, self._values
            if values is None:
                values = load()  # outside the lock: a setting_changed inside reloads
            with self._lock:
                if generation == self._generation:  # no reload since: publish
                    self._values = values
                    # Kept as an attribute: every request reads a few settings, and a plain
                    # attribute costs nothing (as DRF's APISettings does).
                    self.__dict__[name] = values[name]
                    return values[name]

    def reload(self) -> None:
        with self._lock:
            self._generation += 1
            self._values = None
            for name in DEFAULTS:
                self.__dict__.pop(name, None)


def load() -> dict[str, Any]:
    user = getattr(settings, "REST_KNOX_REDIS", {}) or {}
    if not isinstance(user, dict):
        raise ImproperlyConfigured("REST_KNOX_REDIS must be a dict.")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(f"REST_KNOX_REDIS has unknown keys: {', '.join(unknown)}.")
    values = {**DEFAULTS, **user}
    for name in ("SOCKET_CONNECT_TIMEOUT", "SOCKET_TIMEOUT"):
        _number(values, name, low=0.001, high=60)
    _number(values, "CIRCUIT_BREAKER_COOLDOWN", low=0, high=3600)
    _number(values, "MAX_CACHE_TTL", low=1, high=30 * 86400)
    _number(values, "REVOCATION_TOMBSTONE_TTL", low=1, high=86400)
    _number(values, "MAX_IDLE_CONNECTIONS", low=0, high=10_000)
    _number(values, "BUSY_POLL_US", low=0, high=10_000)
    if not isinstance(values["BUSY_POLL_US"], int):
        raise ImproperlyConfigured("REST_KNOX_REDIS['BUSY_POLL_US'] must be an integer.")
    _number(values, "USER_CACHE_TTL", low=1, high=86400)
    _number(values, "LOCAL_CACHE_SIZE", low=0, high=10_000_000)
    if not isinstance(values["LOCAL_CACHE_SIZE"], int):
        raise ImproperlyConfigured("REST_KNOX_REDIS['LOCAL_CACHE_SIZE'] must be an integer.")
    if not isinstance(values["USER_CACHE"], bool):
        raise ImproperlyConfigured("REST_KNOX_REDIS['USER_CACHE'] must be True or False.")
    if not isinstance(values["MAX_IDLE_CONNECTIONS"], int):
        raise ImproperlyConfigured("REST_KNOX_REDIS['MAX_IDLE_CONNECTIONS'] must be an integer.")
    if not isinstance(values["CACHE_ENABLED"], bool):
        raise ImproperlyConfigured("REST_KNOX_REDIS['CACHE_ENABLED'] must be True or False.")
    prefix = values["REDIS_KEY_PREFIX"]
    if not isinstance(prefix, str) or not prefix or ":" in prefix or not prefix.isprintable():
        raise ImproperlyConfigured(
            "REST_KNOX_REDIS['REDIS_KEY_PREFIX'] must be a non-empty printable string without ':'."
        )
    if values["SIGNING_KEY"] is not None and (
        not isinstance(values["SIGNING_KEY"], (str, bytes)) or len(values["SIGNING_KEY"]) < 32
    ):
        raise ImproperlyConfigured("REST_KNOX_REDIS['SIGNING_KEY'] must be a str or bytes of at least 32 characters.")
    fallbacks = values["SIGNING_KEY_FALLBACKS"]
    if not isinstance(fallbacks, (list, tuple)) or not all(isinstance(f, (str, bytes)) and f for f in fallbacks):
        raise ImproperlyConfigured("REST_KNOX_REDIS['SIGNING_KEY_FALLBACKS'] must be a list of secrets.")
    if values["REDIS_URL"] is not None and not isinstance(values["REDIS_URL"], str):
        raise ImproperlyConfigured("REST_KNOX_REDIS['REDIS_URL'] must be a redis:// URL string.")
    nodes = values["REDIS_CLUSTER_NODES"]
    if nodes is not None:
        if not isinstance(nodes, (list, tuple)) or not nodes or not all(isinstance(url, str) for url in nodes):
            raise ImproperlyConfigured(
                "REST_KNOX_REDIS['REDIS_CLUSTER_NODES'] must be a non-empty list of redis:// or rediss:// URLs."
            )
        if values["SENTINELS"] is not None:
            raise ImproperlyConfigured(
                "REST_KNOX_REDIS: REDIS_CLUSTER_NODES and SENTINELS name two topologies; set one of them."
            )
        if "{" in prefix or "}" in prefix:
            raise ImproperlyConfigured(
                "REST_KNOX_REDIS['REDIS_KEY_PREFIX'] can't hold '{' or '}' on a Redis Cluster: a hash tag there "
                "would put every key in one slot."
            )
        if values["LOCAL_CACHE_SIZE"]:
            raise ImproperlyConfigured(
                "REST_KNOX_REDIS['LOCAL_CACHE_SIZE'] is not supported on a Redis Cluster yet (CLIENT TRACKING "
                "is per node): set it to 0 with REDIS_CLUSTER_NODES."
            )
    if values["SENTINELS"] is not None:
        values["SENTINELS"] = sentinel_addresses(values["SENTINELS"], "REST_KNOX_REDIS['SENTINELS']")
        name = values["SENTINEL_SERVICE_NAME"]
        if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
            raise ImproperlyConfigured(
                "REST_KNOX_REDIS['SENTINELS'] needs SENTINEL_SERVICE_NAME: the name the sentinels monitor "
                "the primary under (as in `sentinel monitor <name> ...`), a non-empty string without spaces."
            )
        sentinel_options(values["SENTINEL_KWARGS"] or {}, "REST_KNOX_REDIS['SENTINEL_KWARGS']")
    else:
        for name in ("SENTINEL_SERVICE_NAME", "SENTINEL_KWARGS"):
            if values[name] is not None:
                raise ImproperlyConfigured(
                    f"REST_KNOX_REDIS[{name!r}] is set without SENTINELS (the sentinels' (host, port) pairs). "
                    "A django-redis Sentinel cache named by CACHE_ALIAS needs neither."
                )
    return values


def sentinel_addresses(value: Any, where: str) -> tuple[tuple[str, int], ...]:
    """SENTINELS as redis-py's Sentinel takes them: a non-empty list of (host, port) pairs.

    An error names the entry's position and type, never its value: a URL written there
    (`sentinel://:password@host:26379`, as Celery takes them) would put a password in logs."""
    problem = f"{where} must be a non-empty list of (host, port) pairs"
    if not isinstance(value, (list, tuple)) or not value:
        raise ImproperlyConfigured(f"{problem}, got a {type(value).__name__}{' (empty)' if not value else ''}.")
    addresses = []
    for index, pair in enumerate(value):
        bad = f"{problem}: entry {index} is a {type(pair).__name__}"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ImproperlyConfigured(f"{bad}, not a (host, port) pair.")
        host, port = pair
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int):
            raise ImproperlyConfigured(
                f"{bad} of ({type(host).__name__}, {type(pair[1]).__name__}), not (a host name, a port number)."
            )
        if not 0 < port < 65536:
            raise ImproperlyConfigured(f"{where}: entry {index}'s port {port} is not a TCP port.")
        addresses.append((host, port))
    return tuple(addresses)


def sentinel_options(kwargs: Any, where: str) -> dict[str, Any]:
    """The sentinels' credentials and TLS from a SENTINEL_KWARGS dict (redis-py's names), as
    RedisTarget's sentinel_* fields."""
    if not isinstance(kwargs, dict):
        raise ImproperlyConfigured(f"{where} must be a dict (username, password, ssl, ssl_ca_certs).")
    tls = bool(kwargs.get("ssl"))
    if tls and str(kwargs.get("ssl_cert_reqs", "required")).lower() in ("none", "optional", "0", "1"):
        raise ImproperlyConfigured(
            f"{where}: knox_redis always verifies the sentinels' certificates (ssl_cert_reqs must be "
            "'required'); trust a private CA with ssl_ca_certs."
        )
    if kwargs.get("ssl_certfile") or kwargs.get("ssl_keyfile"):
        raise ImproperlyConfigured(f"{where}: client certificates (ssl_certfile, ssl_keyfile) aren't supported yet.")
    for name in ("username", "password", "ssl_ca_certs"):
        if kwargs.get(name) is not None and not isinstance(kwargs[name], str):
            raise ImproperlyConfigured(f"{where}[{name!r}] must be a string.")
    return {
        "sentinel_username": kwargs.get("username") or None,
        "sentinel_password": kwargs.get("password") or None,
        "sentinel_tls": tls,
        "sentinel_tls_ca_certs": kwargs.get("ssl_ca_certs") if tls else None,
    }


def _number(values: dict[str, Any], name: str, *, low: float, high: float) -> None:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ImproperlyConfigured(
            f"REST_KNOX_REDIS[{name!r}] must be a number between {low} and {high}, got {value!r}."
        )


def redis_target() -> RedisTarget:
    """The primary Redis of REDIS_URL, or of the LOCATION of the cache named by CACHE_ALIAS;
    with Sentinel (SENTINELS here, or in the cache's OPTIONS), the primary of the service;
    with REDIS_CLUSTER_NODES, the cluster those seed nodes belong to."""
    if knox_redis_settings.REDIS_CLUSTER_NODES:
        return _cluster_target(knox_redis_settings.REDIS_CLUSTER_NODES)
    if knox_redis_settings.SENTINELS:
        return _explicit_sentinel_target()
    if knox_redis_settings.REDIS_URL:
        return parse_redis_url(knox_redis_settings.REDIS_URL, options={})
    alias = knox_redis_settings.CACHE_ALIAS
    caches = getattr(settings, "CACHES", {})
    if alias not in caches:
        raise ImproperlyConfigured(
            f"REST_KNOX_REDIS['CACHE_ALIAS'] is {alias!r}, but CACHES has no such cache "
            "(set CACHE_ALIAS to a Redis cache, or REDIS_URL)."
        )
    cache = caches[alias]
    backend = cache.get("BACKEND", "")
    if backend not in REDIS_BACKENDS:
        raise ImproperlyConfigured(
            f"CACHES[{alias!r}] uses {backend!r}; knox_redis needs one of {', '.join(REDIS_BACKENDS)} "
            "(or REST_KNOX_REDIS['REDIS_URL'])."
        )
    location = cache.get("LOCATION")
    if isinstance(location, str):
        # django-redis accepts "primary,replica,..."; Django's RedisCache uses ";" or ",".
        location = location.replace(";", ",").split(",")
    if not location or not isinstance(location, (list, tuple)) or not isinstance(location[0], str):
        raise ImproperlyConfigured(f"CACHES[{alias!r}]['LOCATION'] must name a Redis URL.")
    options = cache.get("OPTIONS") or {}
    if backend == "django_redis.cache.RedisCache" and options.get("SENTINELS"):
        return _sentinel_cache_target(alias, location[0].strip(), options)
    # The first server is the primary for both backends; the rest are read replicas that may
    # lag behind a revocation, so they are never used.
    return parse_redis_url(location[0].strip(), options=options)


def _cluster_target(urls: list[str] | tuple[str, ...]) -> RedisTarget:
    """REDIS_CLUSTER_NODES: every URL parsed as REDIS_URL is; they must agree on credentials and
    TLS (one set is used for every node the cluster names), and on database 0."""
    where = "REST_KNOX_REDIS['REDIS_CLUSTER_NODES']"
    targets = [parse_redis_url(url, options={}) for url in urls]
    first = targets[0]
    for url, target in zip(urls, targets, strict=True):
        if target.unix_path or not target.host:
            raise ImproperlyConfigured(f"{where}: {redacted(url)!r} must name a node by host and port.")
        if target.db != 0:
            raise ImproperlyConfigured(f"{where}: {redacted(url)!r} names database {target.db}; a cluster has 0 only.")
        if (target.username, target.password, target.tls, target.tls_ca_certs) != (
            first.username,
            first.password,
            first.tls,
            first.tls_ca_certs,
        ):
            raise ImproperlyConfigured(
                f"{where}: {redacted(url)!r} differs from the first node's credentials or TLS; every node is "
                "reached with the same ones."
            )
    return replace(first, cluster_nodes=tuple((t.host or "", t.port) for t in targets))


def _sentinel_cache_target(alias: str, url: str, options: dict[str, Any]) -> RedisTarget:
    """django-redis' Sentinel cache: OPTIONS["SENTINELS"], and a LOCATION of
    redis://[:password@]service_name/db whose host is the service's name."""
    where = f"CACHES[{alias!r}]['OPTIONS']"
    sentinels = sentinel_addresses(options["SENTINELS"], f"{where}['SENTINELS']")
    target = parse_redis_url(url, options=options)
    if target.unix_path or not target.host:
        raise ImproperlyConfigured(
            f"CACHES[{alias!r}]['LOCATION'] is {redacted(url)!r}: with SENTINELS it must be "
            "redis://service_name/db, naming the service the sentinels monitor."
        )
    # redis-py's SentinelConnectionPool reaches TLS data nodes (SentinelManagedSSLConnection)
    # from CONNECTION_POOL_KWARGS' `ssl`, with a redis:// LOCATION (a rediss:// one makes it
    # connect to the service's name itself): take TLS and its CA from there too.
    pool_kwargs = options.get("CONNECTION_POOL_KWARGS") or {}
    if isinstance(pool_kwargs, dict) and _truthy(pool_kwargs.get("ssl")):
        target = replace(target, tls=True, tls_ca_certs=pool_kwargs.get("ssl_ca_certs") or target.tls_ca_certs)
    return replace(
        target,
        host=None,
        sentinels=sentinels,
        sentinel_service_name=target.host,
        **sentinel_options(options.get("SENTINEL_KWARGS") or {}, f"{where}['SENTINEL_KWARGS']"),
    )


def _truthy(value: Any) -> bool:
    """A flag as redis-py reads one from kwargs or a URL query (True, 1, "true", "yes", ...)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def _explicit_sentinel_target() -> RedisTarget:
    """REST_KNOX_REDIS' SENTINELS and SENTINEL_SERVICE_NAME; REDIS_URL, if set, for the
    database, credentials and TLS only."""
    service = knox_redis_settings.SENTINEL_SERVICE_NAME
    url = knox_redis_settings.REDIS_URL
    target = RedisTarget()
    if url:
        target = parse_redis_url(url, options={})
        try:
            port = urlsplit(url).port
        except ValueError:
            port = None
        if target.unix_path or (target.host not in (None, service)) or port is not None:
            raise ImproperlyConfigured(
                f"REST_KNOX_REDIS['REDIS_URL'] is {redacted(url)!r}, but with SENTINELS the sentinels say where "
                f"the primary is: REDIS_URL gives only the database, credentials and TLS, as in "
                f"redis://:password@{service}/0 (no port, and no host but the service's name)."
            )
    return replace(
        target,
        host=None,
        sentinels=knox_redis_settings.SENTINELS,
        sentinel_service_name=service,
        **sentinel_options(knox_redis_settings.SENTINEL_KWARGS or {}, "REST_KNOX_REDIS['SENTINEL_KWARGS']"),
    )


def redacted(url: str) -> str:
    """The URL with its password (in the userinfo or a `password=` query) replaced by ***:
    what messages and logs may show."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        in_query = any(k.lower() == "password" for k, _ in pairs)
        if parts.password is None and not in_query:
            return url
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{host}"
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "<a Redis URL that does not parse>"


def parse_redis_url(url: str, *, options: dict[str, Any]) -> RedisTarget:
    """Parse like redis-py (which both cache backends use), including ?db= and unix:// paths."""
    from redis.connection import parse_url

    try:
        kwargs = parse_url(url)
    except ValueError as exc:
        raise ImproperlyConfigured(f"Invalid Redis URL {redacted(url)!r}: {exc}") from exc
    scheme = urlsplit(url).scheme
    password = options.get("PASSWORD") or options.get("password") or kwargs.get("password")
    db = kwargs.get("db", options.get("db", 0))
    # TLS options as redis-py takes them: in the URL query, in OPTIONS (Django's RedisCache),
    # or in OPTIONS["CONNECTION_POOL_KWARGS"] (django-redis).
    tls_options = {**(options.get("CONNECTION_POOL_KWARGS") or {}), **options, **kwargs}
    if str(tls_options.get("ssl_cert_reqs", "required")).lower() in ("none", "optional", "0", "1"):
        raise ImproperlyConfigured(
            f"{redacted(url)!r}: knox_redis always verifies the Redis server's certificate "
            "(ssl_cert_reqs must be 'required'); trust a private CA with ssl_ca_certs."
        )
    if tls_options.get("ssl_certfile") or tls_options.get("ssl_keyfile"):
        raise ImproperlyConfigured(
            f"{redacted(url)!r}: TLS client certificates (ssl_certfile, ssl_keyfile) are not supported by "
            "knox_redis yet; it would connect without them."
        )
    try:
        db = int(db or 0)
    except (TypeError, ValueError):
        db = -1
    if not 0 <= db < 2**31:
        raise ImproperlyConfigured(f"{redacted(url)!r}: knox_redis can't use database number {db!r}.")
    target = RedisTarget(
        host=kwargs.get("host"),
        port=int(kwargs.get("port") or 6379),
        unix_path=kwargs.get("path"),
        db=db,
        username=unquote(kwargs["username"]) if kwargs.get("username") else options.get("username"),
        password=password,
        tls=scheme == "rediss",
        tls_ca_certs=tls_options.get("ssl_ca_certs") if scheme == "rediss" else None,
    )
    return target


knox_redis_settings = KnoxRedisSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    # USE_TZ, TIME_ZONE and knox's own too: the client keeps what it built from replies
    # (LOCAL_CACHE_SIZE's entries, the replies it decoded before), datetimes of the settings
    # they were read under and records checked against knox's AUTO_REFRESH_MAX_TTL.
    if setting in (
        "REST_KNOX_REDIS",
        "REST_KNOX",
        "CACHES",
        "SECRET_KEY",
        "SECRET_KEY_FALLBACKS",
        "USE_TZ",
        "TIME_ZONE",
    ):
        knox_redis_settings.reload()
        from knox_redis import cache

        cache.reset_client()


setting_changed.connect(_reload)
