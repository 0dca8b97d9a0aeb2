"""Under `gunicorn -w 2` with PROMETHEUS_MULTIPROC_DIR: a scrape answered by either worker reports
the hits of both, and a worker that exits takes its gauges with it, never its counters."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection
from knox.models import AuthToken

from tests.servers import free_port

pytest.importorskip("gunicorn")

ROOT = Path(__file__).resolve().parent.parent
HITS = re.compile(r'^knox_redis_lookups_total\{outcome="hit"\} (\S+)$', re.M)


class Gunicorn:
    def __init__(self, directory: Path, redis_url: str) -> None:
        self.port = free_port()
        database = {k: connection.settings_dict[k] for k in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")}
        database["OPTIONS"] = connection.settings_dict.get("OPTIONS", {})
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings_gunicorn",
            "KNOX_REDIS_TEST_DATABASE": json.dumps(database),
            "KNOX_REDIS_TEST_REDIS_URL": redis_url,
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
        }
        command = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{self.port}"]
        command += ["--pythonpath", str(ROOT), "--graceful-timeout", "5", "--log-level", "warning", "tests.wsgi"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)

    def get(self, path: str, token: str | None = None) -> tuple[int, int, str]:
        """(status, the pid of the worker that answered, body), on a connection of its own."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Connection": "close", **({"Authorization": f"Token {token}"} if token else {})}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, int(response.getheader("X-Worker-Pid") or 0), response.read().decode()
        finally:
            conn.close()

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.get("/metrics")[0] == 200:
                    return
            except OSError:
                pass
            assert self.process.poll() is None, "gunicorn exited"
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)

    def scrape(self) -> tuple[int, float]:
        status, pid, body = self.get("/metrics")
        assert status == 200
        hits = HITS.search(body)
        assert hits is not None, body
        return pid, float(hits.group(1))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.mark.slow
def test_any_worker_reports_the_hits_of_all_workers(make_token, redis_server, tmp_path):
    tokens = [make_token(write_through=True) for _ in range(4)]  # cached: every request is a hit
    assert AuthToken.objects.count() == 4
    server = Gunicorn(tmp_path, redis_server.url)
    try:
        server.wait_until_serving()
        # Concurrent requests on fresh connections: while one worker is busy, the other accepts.
        served: list[int] = []
        with ThreadPoolExecutor(8) as pool:
            while len(served) < 400 and (len(served) < 60 or len(set(served)) < 2):
                batch = pool.map(lambda i: server.get("/api/whoami/", tokens[i % 4]), range(20))
                for status, pid, body in batch:
                    assert status == 200, body
                    served.append(pid)
        workers = set(served)
        assert len(workers) == 2, "both workers served requests"
        hits = len(served)

        # A worker's own hits are live in its answer, the other's as it last published them
        # (every PUBLISH_INTERVAL, 1 s): within a second or two, every scrape says the same,
        # whichever worker answers it.
        deadline = time.monotonic() + 10
        with ThreadPoolExecutor(4) as pool:
            while True:
                scrapes = list(pool.map(lambda _: server.scrape(), range(24)))
                if {value for _, value in scrapes} == {float(hits)} or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert {value for _, value in scrapes} == {float(hits)}, scrapes
        assert {pid for pid, _ in scrapes} == workers, "both workers answered scrapes"
        time.sleep(1.5)  # and it stays so: nothing is counted twice as files are rewritten
        with ThreadPoolExecutor(4) as pool:
            assert {value for _, value in pool.map(lambda _: server.scrape(), range(24))} == {float(hits)}

        # A worker that exits: its counters stay in the sum, its file says it is gone.
        gone = served[0]
        os.kill(gone, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _exited(gone):
            assert time.monotonic() < deadline, "the worker did not exit"
            time.sleep(0.05)
        (file,) = tmp_path.glob(f"knox_redis_{gone}_*.json")
        record = json.loads(file.read_text())
        assert record["live"] is False
        assert record["metrics"]["lookups_hit"] > 0
        server.wait_until_serving()  # gunicorn has started a new worker
        with ThreadPoolExecutor(4) as pool:
            assert {value for _, value in pool.map(lambda _: server.scrape(), range(12))} == {float(hits)}
    finally:
        server.stop()


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
