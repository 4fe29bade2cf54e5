"""The Postgres pool: a deadline on every statement, keepalives, and pooled connections that
outlived their server replaced before they are used."""

from __future__ import annotations

import time

import pytest
from ai_rate_limiter.adapters import postgres
from ai_rate_limiter.adapters.postgres import Database
from ai_rate_limiter.config import Settings
from ai_rate_limiter.errors import DependencyUnavailable


def test_a_statement_that_runs_too_long_is_cut_off(settings: Settings) -> None:
    db = Database(settings.database_url, maxconn=2, statement_timeout_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="statement timeout"), db.tx() as cur:
            cur.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 2
        with db.tx() as cur:  # the pool goes on
            cur.execute("SELECT 1 AS one")
            assert cur.fetchone()["one"] == 1
    finally:
        db.close()


def test_connections_have_keepalives_and_the_default_statement_timeout(settings: Settings) -> None:
    db = Database(settings.database_url, maxconn=1)
    try:
        with db.tx() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()["statement_timeout"] == f"{round(postgres.STATEMENT_TIMEOUT_S)}s"
            params = cur.connection.get_dsn_parameters()
        assert params["keepalives"] == "1" and int(params["keepalives_idle"]) > 0
    finally:
        db.close()


def test_a_pooled_connection_whose_backend_went_away_is_replaced_before_use(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after a Postgres restart: the first transaction afterwards does not fail on a dead
    connection from the pool."""
    monkeypatch.setattr(postgres, "PRE_PING_AFTER_S", 0.0)
    db, other = Database(settings.database_url, maxconn=1), Database(settings.database_url, maxconn=1)
    try:
        with db.tx() as cur:
            cur.execute("SELECT pg_backend_pid() AS pid")
            pid = cur.fetchone()["pid"]
        with other.tx() as cur:
            cur.execute("SELECT pg_terminate_backend(%s) AS done", (pid,))
            assert cur.fetchone()["done"]
        time.sleep(0.1)
        with db.tx() as cur:
            cur.execute("SELECT pg_backend_pid() AS pid")
            assert cur.fetchone()["pid"] != pid
    finally:
        db.close()
        other.close()
