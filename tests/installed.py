"""Which knox_redis the tests run against.

`make test` on a developer's machine tests the source tree: `maturin develop` builds the
extension into python/knox_redis/ and puts python/ on sys.path with a .pth file. CI tests the
wheel it built instead, installed into a fresh virtualenv, and says so with
KNOX_REDIS_EXPECT_INSTALLED=<that virtualenv>: then every pytest session (ours and knox's
suite) refuses to start unless knox_redis and its native module are imported from that
virtualenv's site-packages, the source tree's python/ is not on sys.path, and the module is
the abi3 build the wheel ships.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ENV = "KNOX_REDIS_EXPECT_INSTALLED"
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "python"


def problems(expected_venv: str | os.PathLike[str]) -> list[str]:
    """What contradicts "knox_redis is the one installed in expected_venv" (empty if nothing)."""
    import knox_redis
    from knox_redis import _knox_redis

    venv = Path(expected_venv).resolve()
    site_packages = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    found: list[str] = []
    if Path(sys.prefix).resolve() != venv:
        found.append(f"the interpreter runs from {sys.prefix}, not from {venv}")
    for module in (knox_redis, _knox_redis):
        path = Path(module.__file__ or "").resolve()
        if not any(path.is_relative_to(s) for s in site_packages if s.is_relative_to(venv)):
            found.append(f"{module.__name__} is imported from {path}, not from {venv}'s site-packages")
        if path.is_relative_to(SOURCE):
            found.append(f"{module.__name__} is imported from the source tree ({path})")
    if not Path(_knox_redis.__file__ or "").name.endswith(".abi3.so"):
        found.append(f"{_knox_redis.__file__} is not the abi3 build the wheel ships")
    on_path = [p for p in sys.path if p and Path(p).resolve() == SOURCE]
    if on_path:
        found.append(f"the source tree's {SOURCE} is on sys.path (a .pth file left by `maturin develop`?)")
    return found


def check() -> str:
    """A line for the report header; raises RuntimeError if KNOX_REDIS_EXPECT_INSTALLED is set and
    the knox_redis imported is not the one installed there."""
    from knox_redis import _knox_redis

    expected = os.environ.get(ENV)
    if expected:
        found = problems(expected)
        if found:
            raise RuntimeError(f"{ENV}={expected}, but: " + "; ".join(found))
        return f"knox_redis: the installed wheel, {_knox_redis.__file__}"
    return f"knox_redis: {_knox_redis.__file__}"
