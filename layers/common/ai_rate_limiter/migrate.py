"""Apply `infra/migrations/NNNN_*.sql` in order, recording each; safe to run twice or at once.

python -m ai_rate_limiter.migrate            # creates the database if missing
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from .config import Settings

log = logging.getLogger(__name__)
LOCK_ID = 0x61697231  # "air1": serialises concurrent migrators
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "infra" / "migrations"


def migrations_dir() -> Path:
    return Path(os.environ.get("MIGRATIONS_DIR") or DEFAULT_DIR)


def ensure_database(url: str) -> bool:
    """Create the database named in `url` if it does not exist; True if it was created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = psycopg2.connect(admin_url, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                return False
            return True
    finally:
        conn.close()


def migrate(url: str, folder: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied by this call."""
    folder = folder or migrations_dir()
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    applied: list[str] = []
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                           name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
                )
                cur.execute("SELECT name FROM schema_migrations")
                done = {r[0] for r in cur.fetchall()}
            for path in files:
                if path.name in done:
                    continue
                with conn, conn.cursor() as cur:
                    cur.execute(path.read_text())
                    cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
        finally:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    finally:
        conn.close()
    return applied


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.from_env()
    if ensure_database(settings.database_url):
        print(f"created database {urlsplit(settings.database_url).path.lstrip('/')}")
    applied = migrate(settings.database_url)
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
