"""Re-encrypt every stored secret (provider API keys, webhook secrets) under the first data key.

    python -m ai_rate_limiter.rotate_keys                # re-seal every secret; says how many
    python -m ai_rate_limiter.rotate_keys new-secret     # print a new key for PROVIDER_KEY_SECRETS
    python -m ai_rate_limiter.rotate_keys new-data-key   # print a new KMS data key for KMS_DATA_KEY

To rotate: put the new key first in every process's environment (PROVIDER_KEY_SECRETS=new,old
or KMS_DATA_KEY=new,old) and restart them, then run this; after it, drop the old key.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .adapters.postgres import Database
from .adapters.secrets_box import SCHEME, KeyUnreadable, SecretBox, from_settings, new_data_key, new_secret
from .adapters.webhooks import batch_secret_id, endpoint_secret_id
from .config import Settings
from .errors import AppError, DependencyUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sealed:
    """A column of sealed secrets, each sealed for its row (`secret_id` of the row's id)."""

    table: str
    column: str
    secret_id: Callable[[str], str]
    kind: str


SEALED = (
    Sealed("providers", "api_key", str, "provider key"),
    Sealed("batches", "webhook_secret", batch_secret_id, "webhook secret"),
    Sealed("webhook_endpoints", "secret", endpoint_secret_id, "webhook secret"),
)


def reseal(
    db: Database, box: SecretBox, only_unsealed: bool = False, columns: Sequence[Sealed] = SEALED
) -> tuple[Counter[str], list[str]]:
    """Seal every secret stored in `columns` again under the box's first data key (with
    `only_unsealed`, only those stored before they were encrypted). One transaction; returns
    how many of each kind were sealed, and the rows (`table id`) whose secret no configured
    data key opens (left as they are)."""
    done: Counter[str] = Counter()
    unreadable: list[str] = []
    with db.tx() as cur:
        for sealed in columns:
            cur.execute(
                f"""SELECT id::text, {sealed.column} AS secret FROM {sealed.table}
                    WHERE {sealed.column} IS NOT NULL
                      AND (NOT %(only)s OR left({sealed.column}, %(n)s) <> %(scheme)s)
                    ORDER BY id FOR UPDATE""",
                {"only": only_unsealed, "n": len(SCHEME), "scheme": SCHEME},
            )
            for row in cur.fetchall():
                try:
                    again = box.reseal(sealed.secret_id(row["id"]), row["secret"])
                except KeyUnreadable:
                    unreadable.append(f"{sealed.table} {row['id']}")
                    continue
                cur.execute(
                    f"UPDATE {sealed.table} SET {sealed.column} = %s WHERE id = %s", (again, row["id"])
                )
                done[sealed.kind] += 1
    return done, unreadable


def seal_unsealed(db: Database, box: SecretBox) -> int:
    """The step every process takes as its key box is built: keys stored before keys were
    encrypted are sealed (after the first start there are none, and it is one query). With
    Postgres down it is left to the next start: such keys are still read as they are."""
    try:
        # Provider keys only: a scan of every batch at every start would cost more than the
        # few webhook secrets from before sealing are worth (rotate_keys seals those).
        done, _ = reseal(db, box, only_unsealed=True, columns=SEALED[:1])
    except DependencyUnavailable as exc:
        log.warning("secrets stored unencrypted are sealed at the next start: %s", exc.detail)
        return 0
    for kind, n in done.items():
        log.warning("sealed %d %s(s) that were stored unencrypted", n, kind)
    return sum(done.values())


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
    print(
        f"re-sealed {done['provider key']} provider key(s) and {done['webhook secret']} webhook "
        "secret(s) under the first data key"
    )
    if unreadable:
        print(
            f"{len(unreadable)} secret(s) no configured data key opens, left as they were: "
            f"{', '.join(unreadable)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
