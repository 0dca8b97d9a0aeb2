"""Redis Sentinel, against real sentinels (tests/servers.py's SentinelSetup: a primary, a
replica and three sentinels on loopback): configured as a django-redis Sentinel cache or
explicitly, through a failover (SENTINEL FAILOVER) and a killed primary, and never using a
replica, whatever a sentinel says."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis as redis_py
from django.core.cache import caches
from django.test import Client

from knox_redis import cache
from knox_redis.checks import check_redis_server
from tests import traffic
from tests.conftest import auth_header
from tests.helpers import a_write_behind_the_process_stops_the_next_local_hit
from tests.servers import SentinelSetup, SentinelUnavailable, free_port
from tests.test_checks import readme_acl
from tests.traffic import login, logout_until_taken, whoami

pytestmark = pytest.mark.slow

SERVICE = SentinelSetup.service


def start_setup() -> SentinelSetup:
    try:
        return SentinelSetup().start()
    except SentinelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def shared() -> Iterator[SentinelSetup]:
    """One deployment for the tests that don't fail it over."""
    setup = start_setup()
    yield setup
    setup.stop()


@pytest.fixture
def fresh() -> Iterator[SentinelSetup]:
    """A deployment of the test's own, to fail over or break."""
    setup = start_setup()
    yield setup
    setup.stop()


def primary_conn(setup: SentinelSetup) -> redis_py.Redis:
    return redis_py.Redis(port=setup.primary_port())


def sentinel_cache(setup: SentinelSetup, **options) -> dict:
    """A django-redis Sentinel cache, as django-redis' documentation configures one."""
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{SERVICE}/0",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
            "SENTINELS": setup.sentinel_addresses,
            **options,
        },
    }


def use_cache_alias(settings, setup: SentinelSetup, **options) -> None:
    primary_conn(setup).flushall()
    settings.CACHES = {**settings.CACHES, "sentinel": sentinel_cache(setup, **options)}
    settings.REST_KNOX_REDIS = {"CACHE_ALIAS": "sentinel", "CIRCUIT_BREAKER_COOLDOWN": 0.5}


def use_explicit(settings, setup: SentinelSetup, **extra) -> None:
    primary_conn(setup).flushall()
    settings.REST_KNOX_REDIS = {
        "SENTINELS": setup.sentinel_addresses,
        "SENTINEL_SERVICE_NAME": SERVICE,
        "CIRCUIT_BREAKER_COOLDOWN": 0.5,
        **extra,
    }


def evalsha_calls(port: int) -> int:
    """How many scripts a node ran for its clients: a replica knox_redis never used ran none."""
    stats = redis_py.Redis(port=port).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def login_auth_logout(client: Client) -> str:
    token = login(client)
    assert [whoami(client, token) for _ in range(3)] == [200, 200, 200]
    assert cache.get_client().stats()["hits"] >= 2  # served by Redis: the primary answered
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert whoami(client, token) == 401
    return token


def test_a_django_redis_sentinel_cache_works_as_it_is(settings, user, shared):
    use_cache_alias(settings, shared)
    caches["sentinel"].set("django-redis", "answers")  # the Django cache itself, through its sentinels
    assert primary_conn(shared).exists(":1:django-redis")  # (its reads may go to the replica)
    login_auth_logout(Client())
    assert cache.get_client().primary_address == f"127.0.0.1:{shared.primary_port()}"
    assert [evalsha_calls(replica.port) for replica in shared.replicas] == [0]


def test_user_cache_on_sentinel(settings, user, shared, make_token):
    """USER_CACHE on the primary the sentinels name: a hit makes no query, and a user's save
    revokes the cached row before it returns."""
    from tests.helpers import accepted, queries_of

    use_explicit(settings, shared, USER_CACHE=True)
    token = make_token()
    assert accepted(token)
    assert accepted(token)  # the row cached now
    ok, sql = queries_of(lambda: accepted(token))
    assert ok
    assert sql == []
    user.is_active = False
    user.save()
    assert not accepted(token)


def test_explicit_settings_skip_a_dead_sentinel(settings, user, shared):
    use_explicit(settings, shared)
    settings.REST_KNOX_REDIS = {
        **settings.REST_KNOX_REDIS,
        "SENTINELS": [("127.0.0.1", free_port()), *shared.sentinel_addresses],
    }
    login_auth_logout(Client())
    assert cache.get_client().primary_address == f"127.0.0.1:{shared.primary_port()}"


def test_database_and_credentials_from_redis_url(settings, user, shared):
    """Explicit settings: REDIS_URL gives the data node's database and user (the README's
    least-privilege line); the sentinels their own (a sentinel of its own for this test, whose
    user may only ask where the primary is)."""
    primary = primary_conn(shared)
    primary.execute_command("ACL", "SETUSER", "knoxdata", "on", ">datapw", *readme_acl())
    guarded = shared.add_sentinel(shared.primary_port(), service="guarded")
    guard = redis_py.Redis(port=guarded)
    guard.execute_command("ACL", "SETUSER", "watcher", "on", ">sentpw", "-@all", "+sentinel|get-master-addr-by-name")
    guard.execute_command("ACL", "SETUSER", "default", "off")
    try:
        use_explicit(
            settings,
            shared,
            SENTINELS=[("127.0.0.1", guarded)],
            SENTINEL_SERVICE_NAME="guarded",
            SENTINEL_KWARGS={"username": "watcher", "password": "sentpw"},
            REDIS_URL="redis://knoxdata:datapw@guarded/5",
        )
        login_auth_logout(Client())
        assert redis_py.Redis(port=shared.primary_port(), db=5).dbsize() > 0
        settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SENTINEL_KWARGS": {"password": "wrong"}}
        with pytest.raises(cache.CacheUnavailable, match="guarded"):
            cache.get_client().ping()
    finally:
        primary.execute_command("ACL", "DELUSER", "knoxdata")


def test_a_replica_named_by_a_sentinel_is_never_used(settings, user, shared):
    """A sentinel that names a replica (misconfigured here; mid-failover in real life): ROLE
    says so, and knox_redis uses no connection to it. Lookups fall back to the database,
    revocations are refused (503)."""
    (replica,) = shared.replicas
    rogue = shared.add_sentinel(replica.port, service="rogue")
    use_explicit(settings, shared, SENTINELS=[("127.0.0.1", rogue)], SENTINEL_SERVICE_NAME="rogue")
    before = evalsha_calls(replica.port)
    client = Client()
    token = login(client)
    assert whoami(client, token) == 200  # from the database
    with pytest.raises(cache.CacheUnavailable, match=r"reports role \"slave\": not used"):
        cache.redis_command("PING")  # not through the breaker, which the lookup opened
    assert client.post("/api/logout/", **auth_header(token)).status_code == 503
    assert whoami(client, token) == 200  # the logout was refused: the token is still valid
    assert evalsha_calls(replica.port) == before == 0


def test_check_deploy_asks_the_primary_the_sentinels_name(settings, shared):
    use_explicit(settings, shared)
    assert check_redis_server() == []  # every command allowed, no persistence
    settings.REST_KNOX_REDIS = {**settings.REST_KNOX_REDIS, "SENTINELS": [("127.0.0.1", free_port())]}
    (warning,) = check_redis_server()
    assert warning.id == "knox_redis.W002"
    assert "the primary of Sentinel service 'mymaster'" in warning.msg
    assert "no sentinel named the primary" in warning.msg


def test_check_deploy_names_a_refused_role(settings, shared):
    """ROLE is sent on each new connection: refused, nothing else can be asked."""
    primary = primary_conn(shared)
    rules = [rule for rule in readme_acl() if rule != "+role"]
    primary.execute_command("ACL", "SETUSER", "norole", "on", ">pw", *rules)
    try:
        use_explicit(settings, shared, REDIS_URL=f"redis://norole:pw@{SERVICE}/0")
        (error,) = check_redis_server()
        assert error.id == "knox_redis.E004"
        assert "refuses ROLE to user 'norole'" in error.msg
        assert "ACL SETUSER norole +role" in error.hint
    finally:
        primary.execute_command("ACL", "DELUSER", "norole")


def test_failover_then_auth_continues_and_a_logout_rejects_the_token(settings, user, fresh):
    use_cache_alias(settings, fresh)
    client = Client()
    token = login(client)
    assert whoami(client, token) == 200
    old = fresh.primary_port()
    new = fresh.failover()
    assert new != old
    statuses = []
    deadline = time.monotonic() + 5
    # The old primary still answers (as a primary) until this process asks the sentinels again.
    while cache.get_client().primary_address != f"127.0.0.1:{new}":
        statuses.append(whoami(client, token))
        assert time.monotonic() < deadline, statuses
        time.sleep(0.02)
    assert set(statuses) <= {200}
    hits = cache.get_client().stats()["hits"]
    assert whoami(client, token) == 200
    assert cache.get_client().stats()["hits"] == hits + 1  # from the new primary
    assert logout_until_taken(client, token) == 204
    assert whoami(client, token) == 401
    assert not any(f.startswith(b"r:") for f in redis_py.Redis(port=new).hkeys(f"knox:token:{token[:15]}"))


def test_logouts_sent_to_the_old_primary_reach_the_new_one(settings, user, fresh):
    """SENTINEL FAILOVER promotes the replica while the old primary still takes writes, and
    the sentinels name the new one only a moment later: logouts sent meanwhile went to the old
    primary, which the failover empties, while the new one holds the tokens' records, copied
    before the promotion. This process re-sends them there before using it."""
    use_cache_alias(settings, fresh)
    client = Client()
    tokens = [login(client) for _ in range(30)]
    assert {whoami(client, token) for token in tokens} == {200}  # cached, and copied to the replica
    old = fresh.primary_port()
    fresh.ask(fresh.sentinel_ports[0], "SENTINEL", "FAILOVER", SERVICE)
    where = Counter()
    for token in tokens:  # over about 1.5 s: before, during and after the switch
        assert logout_until_taken(client, token) == 204
        where[cache.get_client().primary_address] += 1
        time.sleep(0.05)
    new = fresh.wait_for_new_primary(old)
    while cache.get_client().primary_address != f"127.0.0.1:{new}":
        whoami(client, tokens[0])
        time.sleep(0.05)
    assert where[f"127.0.0.1:{old}"] > 0, where  # some did go to the old primary
    assert [whoami(client, token) for token in tokens] == [401] * len(tokens)
    records = redis_py.Redis(port=new)
    assert not [t for t in tokens if any(f.startswith(b"r:") for f in records.hkeys(f"knox:token:{t[:15]}"))]


def run_traffic_through(settings, setup: SentinelSetup, event) -> None:
    use_cache_alias(settings, setup)
    new = traffic.run_traffic_through(event, what="new primary named")
    assert cache.get_client().primary_address == f"127.0.0.1:{new}"


def test_traffic_through_a_failover(settings, fresh, transactional_db):
    run_traffic_through(settings, fresh, fresh.failover)


def test_traffic_through_a_killed_primary(settings, fresh, transactional_db):
    """SIGKILL: nothing answers until the sentinels agree it is down (down-after 1 s) and
    promote the replica; meanwhile lookups fall back to the database and logouts are refused."""

    def kill() -> int:
        old = fresh.primary_port()
        fresh.node(old).process.kill()
        return fresh.wait_for_new_primary(old, timeout=20)

    run_traffic_through(settings, fresh, kill)


def test_the_primary_is_rechecked_without_any_error(settings, user, fresh):
    """An old primary cut off by a failover can go on answering as a primary (no READONLY, no
    error): the sentinels are asked again every second. Here the sentinels are told to monitor
    the replica, made a primary of its own, while the old primary still answers."""
    use_explicit(settings, fresh)
    client = Client()
    token = login(client)
    assert whoami(client, token) == 200
    old = fresh.primary_port()
    (replica,) = fresh.replicas
    make_primary(fresh, replica.port)
    moved_at = time.monotonic()
    while cache.get_client().primary_address != f"127.0.0.1:{replica.port}":
        assert whoami(client, token) == 200
        assert time.monotonic() - moved_at < 3, "the sentinels were not asked again"
        time.sleep(0.05)
    assert redis_py.Redis(port=old).info("replication")["role"] == "master"  # it never said otherwise
    assert whoami(client, token) == 200
    assert logout_until_taken(client, token) == 204
    assert whoami(client, token) == 401


def make_primary(setup: SentinelSetup, port: int) -> None:
    """Reconfigure by hand, as an operator would: `port` a primary of its own, and every
    sentinel told to monitor it instead."""
    redis_py.Redis(port=port).execute_command("REPLICAOF", "NO", "ONE")
    for sentinel in setup.sentinel_ports:
        setup.ask(sentinel, "SENTINEL", "REMOVE", SERVICE)
        setup.ask(sentinel, "SENTINEL", "MONITOR", SERVICE, "127.0.0.1", str(port), "2")


def readonly_errors(port: int) -> int:
    errors = redis_py.Redis(port=port).info("errorstats")
    return int(errors.get("errorstat_READONLY", {}).get("count", 0))


def test_readonly_moves_to_the_new_primary_and_retries(settings, user, fresh):
    """The old primary demoted to a replica between two calls (before the periodic re-check):
    the next command answers READONLY; the pool is emptied, the sentinels asked, and the
    command retried on the new primary, with no error for the caller."""
    use_explicit(settings, fresh)
    native = cache.get_client()
    asked = time.monotonic()
    native.command([b"PING"])  # its first call: the sentinels were just asked, not again for a second
    old, (replica,) = fresh.primary_port(), fresh.replicas
    make_primary(fresh, replica.port)
    redis_py.Redis(port=old).execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
    before = readonly_errors(old)
    if time.monotonic() - asked > 0.8:
        pytest.skip("reconfiguring took most of a second: the periodic re-check would come first")
    assert native.command([b"SET", b"knox:written", b"1"]) == "OK"
    assert readonly_errors(old) == before + 1  # it did go to the old primary first
    assert native.primary_address == f"127.0.0.1:{replica.port}"
    assert redis_py.Redis(port=replica.port).get("knox:written") == b"1"
    assert native.stats()["errors"] == 0


def test_the_local_cache_follows_the_primary(settings, user, fresh):
    """LOCAL_CACHE_SIZE: the listener connects to the primary the sentinels name (ROLE-checked)
    and, after a failover, to the new one: Redis' invalidations there reach this process."""
    use_explicit(settings, fresh, LOCAL_CACHE_SIZE=100)
    native = cache.get_client()

    def live_on(port: int) -> None:
        deadline = time.monotonic() + 10
        while not (native.local_cache_live and native.primary_address == f"127.0.0.1:{port}"):
            native.command([b"PING"])
            assert time.monotonic() < deadline, native.local_cache_error
            time.sleep(0.05)

    client = Client()
    live_on(fresh.primary_port())
    new = fresh.failover()
    live_on(new)
    token = login(client)
    # Another process's revocation, as Redis sees it: a write to the token's key on the new
    # primary. The listener's own connection went there: with its thread held, the next
    # request finds the push in that connection itself and asks Redis.
    a_write_behind_the_process_stops_the_next_local_hit(
        token, lambda: redis_py.Redis(port=new).hset(f"knox:token:{token[:15]}", "x", "1")
    )
    assert logout_until_taken(client, token) == 204
    assert whoami(client, token) == 401


def test_with_every_sentinel_down_the_known_primary_still_serves(settings, user, fresh):
    """The sentinels only say where the primary is: with all of them gone, the primary they
    last named goes on serving (its connections are ROLE-checked as ever) until
    `TRUSTED_FOR` (3 s) after their last confirmation, and the calls that ask them again pay
    only their refused connections. Past it, lookups fall back to the database (this process
    may be on the old primary's side of a partition) and logouts still reach the primary."""
    use_explicit(settings, fresh)
    client = Client()
    token = login(client)
    assert whoami(client, token) == 200
    fresh.stop_sentinels()
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 1.5:  # past a re-check, within the bound
        statuses.append(whoami(client, token))
        time.sleep(0.05)
    assert set(statuses) == {200}
    stats = cache.get_client().stats()
    assert stats["errors"] == 0, stats
    assert stats["hits"] >= len(statuses)
    while time.monotonic() - started < 4.5:  # past the bound: the database answers
        assert whoami(client, token) == 200
        time.sleep(0.05)
    stats = cache.get_client().stats()
    assert stats["errors"] > 0, stats
    assert client.post("/api/logout/", **auth_header(token)).status_code == 204
    assert whoami(client, token) == 401
