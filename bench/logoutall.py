"""logoutall for a user with 1, 10 and 1,000 tokens: time per call and Redis round trips, side
by side in interleaved rounds, for
- plain knox: knox's LogoutAllView with knox_redis' signal receivers disconnected (no Redis);
- knox's LogoutAllView with knox_redis installed (its receivers revoke row by row);
- knox_redis' LogoutAllView (one revocation for every token of the user);
every token cached first for the last two. The round trips are the EVALSHA calls Redis
counted (each revocation is one script). PostgreSQL when reachable (as bench.py), its own
redis-server.

    .venv/bin/python bench/logoutall.py [--rounds 5] [--db auto]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from calls import django_and_redis  # noqa: E402

SIZES = (1, 10, 1000)


def evalsha_calls(redis: Any) -> int:
    return int(redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


@contextmanager
def without_knox_redis_receivers() -> Iterator[None]:
    """Plain knox: the token model's pre_delete receiver (the one a delete fires) disconnected."""
    from django.db.models.signals import pre_delete
    from knox.models import AuthToken

    from knox_redis import signals

    uid = f"knox_redis.{AuthToken._meta.label}.delete"
    pre_delete.disconnect(sender=AuthToken, dispatch_uid=uid)
    try:
        yield
    finally:
        pre_delete.connect(signals.revoke_before_delete, sender=AuthToken, dispatch_uid=uid)


def one(view: Any, user: Any, tokens: int, cache_them: bool, redis: Any) -> tuple[float, int]:
    """Seconds for one logoutall of `user` with `tokens` tokens, and the EVALSHAs it sent."""
    from calls import Scenario, _request
    from knox.models import AuthToken
    from rest_framework.test import APIRequestFactory, force_authenticate

    from knox_redis.auth import TokenAuthentication

    made = [AuthToken.objects.create(user=user)[1] for _ in range(tokens)]  # write-through
    if cache_them:
        auth = TokenAuthentication()
        for token in made:
            auth.authenticate(_request(Scenario("x", auth, made), token))
    request = APIRequestFactory().post("/logoutall/")
    force_authenticate(request, user=user, token=AuthToken.objects.filter(user=user).first())
    before = evalsha_calls(redis)
    gc.collect()  # not this call's garbage: the 1,000-token rows before it leave plenty
    started = time.perf_counter()
    response = view(request)
    elapsed = time.perf_counter() - started
    assert response.status_code == 204, response.status_code
    assert not AuthToken.objects.filter(user=user).exists()
    return elapsed, evalsha_calls(redis) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db", choices=("auto", "sqlite", "postgres"), default="auto")
    args = parser.parse_args()
    with django_and_redis(args.db) as (engine, server):
        import redis as redis_py

        run(args, engine, redis_py.Redis(port=server.port))


def run(args: argparse.Namespace, engine: str, redis: Any) -> None:
    from django.contrib.auth import get_user_model
    from knox.views import LogoutAllView as KnoxLogoutAll

    from knox_redis.views import LogoutAllView

    views = {
        "knox": KnoxLogoutAll.as_view(),
        "knox's view, knox_redis installed": KnoxLogoutAll.as_view(),
        "knox_redis": LogoutAllView.as_view(),
    }
    user = get_user_model().objects.create_user(username="many")
    results: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for number in range(args.rounds):
        for size in SIZES:
            order = list(views) if number % 2 == 0 else list(views)[::-1]
            for name in order:
                plain = name == "knox"
                with without_knox_redis_receivers() if plain else nullcontext():
                    measured = one(views[name], user, size, cache_them=not plain, redis=redis)
                results.setdefault((name, size), []).append(measured)
    print(f"{engine}, {args.rounds} interleaved rounds; the median time and round trips\n")
    print("| tokens | " + " | ".join(f"{name}: ms (round trips)" for name in views) + " | knox_redis, x knox's time |")
    print("|---:|" + "---:|" * (len(views) + 1))
    for size in SIZES:
        cells = []
        for name in views:
            ms = statistics.median(t for t, _ in results[(name, size)]) * 1e3
            trips = statistics.median(n for _, n in results[(name, size)])
            cells.append(f"{ms:.1f} ({trips:.0f})")
        knox = statistics.median(t for t, _ in results[("knox", size)])
        ours = statistics.median(t for t, _ in results[("knox_redis", size)])
        print(f"| {size:,} | " + " | ".join(cells) + f" | {ours / knox:.2f} |")


if __name__ == "__main__":
    main()
