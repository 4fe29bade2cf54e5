"""Re-encrypt every stored provider API key under the first data key.

    python -m ai_rate_limiter.rotate_keys                # re-seal every key; says how many
    python -m ai_rate_limiter.rotate_keys new-secret     # print a new key for PROVIDER_KEY_SECRETS
    python -m ai_rate_limiter.rotate_keys new-data-key   # print a new KMS data key for KMS_DATA_KEY

To rotate: put the new key first in every process's environment (PROVIDER_KEY_SECRETS=new,old
or KMS_DATA_KEY=new,old) and restart them, then run this; after it, drop the old key.
"""

from __future__ import annotations

import logging
import sys

from .adapters.postgres import Database
from .adapters.secrets_box import SCHEME, KeyUnreadable, SecretBox, from_settings, new_data_key, new_secret
from .config import Settings
from .errors import AppError, DependencyUnavailable

log = logging.getLogger(__name__)


def reseal(db: Database, box: SecretBox, only_unsealed: bool = False) -> tuple[int, list[str]]:
    """Seal every stored key again under the box's first data key (with `only_unsealed`, only
    the keys stored before keys were encrypted). One transaction; returns how many were sealed
    and the providers whose keys no configured data key opens (left as they are)."""
    done, unreadable = 0, []
    with db.tx() as cur:
        cur.execute(
            """SELECT id::text, api_key FROM providers
               WHERE NOT %(only)s OR left(api_key, %(n)s) <> %(scheme)s
               ORDER BY id FOR UPDATE""",
            {"only": only_unsealed, "n": len(SCHEME), "scheme": SCHEME},
        )
        for row in cur.fetchall():
            try:
                sealed = box.reseal(row["id"], row["api_key"])
            except KeyUnreadable:
                unreadable.append(row["id"])
                continue
            cur.execute("UPDATE providers SET api_key = %s WHERE id = %s", (sealed, row["id"]))
            done += 1
    return done, unreadable


def seal_unsealed(db: Database, box: SecretBox) -> int:
    """The step every process takes as its key box is built: keys stored before keys were
    encrypted are sealed (after the first start there are none, and it is one query). With
    Postgres down it is left to the next start: such keys are still read as they are."""
    try:
        done, _ = reseal(db, box, only_unsealed=True)
    except DependencyUnavailable as exc:
        log.warning("provider keys stored unencrypted are sealed at the next start: %s", exc.detail)
        return 0
    if done:
        log.warning("sealed %d provider API key(s) that were stored unencrypted", done)
    return done


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env()
    try:
        if args == ["new-secret"]:
            print(new_secret())
            return 0
        if args == ["new-data-key"]:
            print(new_data_key(settings))
            return 0
        if args:
            print(__doc__, file=sys.stderr)
            return 2
        db = Database(settings.database_url, maxconn=1)
        try:
            done, unreadable = reseal(db, from_settings(settings))
        finally:
            db.close()
    except AppError as exc:
        print(exc.detail, file=sys.stderr)
        return 1
    print(f"re-sealed {done} provider key(s) under the first data key")
    if unreadable:
        print(
            f"{len(unreadable)} key(s) no configured data key opens, left as they were: "
            f"providers {', '.join(unreadable)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
