"""The previous release of knox_redis, built beside this one so that the rolling-deploy tests
can run its code against the same Redis and database (`python -m tests.previous_release`
builds it; `make test` does).

The previous release is the commit PREVIOUS_RELEASE of this repository: its source is taken
with `git archive` into build/previous-release/src and built into its own virtualenv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# 0.1.0 as it stood before the compact signed records (JSON records, user index as a SET).
PREVIOUS_RELEASE = "0734376"
ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "build" / "previous-release"
SOURCE = HOME / "src"
VENV = HOME / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = HOME / f"built-{PREVIOUS_RELEASE}"


def available() -> str | None:
    """None if the previous release is built, else why not."""
    if STAMP.exists() and PYTHON.exists():
        return None
    return f"the previous release ({PREVIOUS_RELEASE}) is not built: run `python -m tests.previous_release`"


def build() -> None:
    if available() is None:
        return
    probe = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=ROOT, check=False)
    if probe.returncode != 0:
        sys.exit(f"commit {PREVIOUS_RELEASE} is not in this clone's history (a shallow clone?)")
    shutil.rmtree(HOME, ignore_errors=True)
    SOURCE.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", PREVIOUS_RELEASE], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(SOURCE)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(PYTHON), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "maturin>=1.9.4,<2"], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(VENV), "CARGO_TARGET_DIR": str(HOME / "target")}
    subprocess.run(
        [str(VENV / "bin" / "maturin"), "develop", "-q", "--extras", "test"], cwd=SOURCE, env=env, check=True
    )
    STAMP.touch()
    print(f"previous release {PREVIOUS_RELEASE} built in {VENV}")


if __name__ == "__main__":
    build()
