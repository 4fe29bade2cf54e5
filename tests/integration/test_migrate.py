from __future__ import annotations

import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from ai_rate_limiter.config import Settings
from ai_rate_limiter.migrate import ensure_database, migrate, migrations_dir


def test_migrate_creates_the_database_and_is_safe_twice_and_at_once(settings: Settings) -> None:
    name = f"airl_migrate_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    admin = psycopg2.connect(urlunsplit(urlsplit(url)._replace(path="/postgres")))
    admin.autocommit = True
    try:
        assert ensure_database(url) is True
        assert ensure_database(url) is False
        results: list[list[str]] = []
        threads = [threading.Thread(target=lambda: results.append(migrate(url))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        applied = sorted(name for r in results for name in r)
        files = sorted(p.name for p in migrations_dir().glob("*.sql"))
        assert applied == files and files[0] == "0001_initial.sql"
        assert migrate(url) == []
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM schema_migrations")
            assert cur.fetchone() == (len(files),)
            cur.execute("SELECT count(*) FROM messages")
            assert cur.fetchone() == (0,)
        conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
