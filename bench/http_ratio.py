"""Over HTTP: gunicorn (2 sync workers) and wrk, a random one of 1,000 users' tokens per
request. For each authentication mode, requests/s on an authenticated endpoint divided by
requests/s on an unauthenticated one served by the same workers in the same run (the same
view and middleware, no authentication): the share of the server's capacity that
authentication leaves. The ceiling (an authentication class that builds its objects from a
dict) shows what the HTTP stack alone costs, and the noise. Modes take turns in interleaved
rounds; each ratio is the median over them, with its spread.

    .venv/bin/python bench/http_ratio.py [--rounds 5] [--seconds 5] [--db auto]

Needs `wrk` (Debian's package) and gunicorn (the test extra); `make bench` installs both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from calls import USERS, django_and_redis  # noqa: E402
from http_app import MODES  # noqa: E402

from tests.servers import free_port  # noqa: E402

WRK_SCRIPT = """
local tokens = {}
for line in io.lines(os.getenv("KNOX_BENCH_TOKENS")) do tokens[#tokens + 1] = line end
math.randomseed(os.time() + tonumber(string.sub(tostring({}), -6), 16))
request = function()
  return wrk.format(nil, nil, {["Authorization"] = "Token " .. tokens[math.random(#tokens)]})
end
"""


def serve(mode: str, database: dict[str, Any], redis_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "KNOX_BENCH_MODE": mode,
        "KNOX_BENCH_DATABASE": json.dumps(database),
        "KNOX_BENCH_REDIS_URL": redis_url,
        "DJANGO_SETTINGS_MODULE": "http_app",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
    }
    gunicorn = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
    process = subprocess.Popen([*gunicorn, "http_app:application"], env=env, cwd=HERE)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/anon/", timeout=1).read()
            return process, port
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"gunicorn for {mode!r} did not start") from None
            time.sleep(0.1)


def wrk(url: str, seconds: float, script: Path, tokens: Path) -> float:
    """Requests per second (wrk: 2 threads, 8 connections); fails on any non-2xx answer."""
    out = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{max(1, round(seconds))}s", "-s", str(script), url],
        env={**os.environ, "KNOX_BENCH_TOKENS": str(tokens)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{url}: answers other than 2xx\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/http_ratio.py needs wrk (apt-get install wrk)")
    with django_and_redis(args.db) as (engine, server):
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.db import connections
        from knox.models import AuthToken

        database = dict(settings.DATABASES["default"])
        users = [get_user_model().objects.create_user(username=f"u{i}") for i in range(USERS)]
        tokens = [AuthToken.objects.create(user=u)[1] for u in users]
        connections.close_all()
        workdir = Path(tempfile.mkdtemp(prefix="knox-redis-http-"))
        try:
            (workdir / "tokens").write_text("\n".join(tokens) + "\n")
            (workdir / "random_token.lua").write_text(WRK_SCRIPT)
            ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
            rates: dict[str, list[float]] = {mode: [] for mode in MODES}
            for number in range(args.rounds):
                order = list(MODES) if number % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    process, port = serve(mode, database, server.url)
                    try:
                        base = f"http://127.0.0.1:{port}"
                        # Warm, as long as a measured run: each worker's in-process cache keeps a
                        # token only once its user's row is cached too (a fill drops the entries
                        # that depend on its key), so it takes two requests per token and worker.
                        wrk(f"{base}/auth/", args.seconds, workdir / "random_token.lua", workdir / "tokens")
                        authed = wrk(f"{base}/auth/", args.seconds, workdir / "random_token.lua", workdir / "tokens")
                        anon = wrk(f"{base}/anon/", args.seconds, workdir / "random_token.lua", workdir / "tokens")
                    finally:
                        process.terminate()
                        process.wait(10)
                    ratios[mode].append(authed / anon)
                    rates[mode].append(authed)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{engine}, gunicorn 2 sync workers, wrk 2 threads 8 connections {args.seconds:g} s per run, "
        f"{USERS} users' tokens at random, {args.rounds} interleaved rounds\n"
    )
    print("| mode | authenticated req/s (median) | authenticated / unauthenticated (median, min-max) |")
    print("|---|---:|---:|")
    for mode in MODES:
        spread = sorted(ratios[mode])
        print(
            f"| {mode} | {statistics.median(rates[mode]):,.0f} | "
            f"{statistics.median(spread):.2f} ({spread[0]:.2f}-{spread[-1]:.2f}) |"
        )


if __name__ == "__main__":
    main()
