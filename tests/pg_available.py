"""Exit 0 if a PostgreSQL server is reachable (DATABASE_URL, else 127.0.0.1:5432); else say why."""

import os
import sys

url = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
try:
    import psycopg

    psycopg.connect(url, connect_timeout=3).close()
except Exception as exc:  # any failure means: run SQLite only, and say so
    print(f"PostgreSQL not available at {url}: {exc}")
    sys.exit(1)
print(f"PostgreSQL available at {url}")
