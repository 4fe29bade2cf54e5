"""Answers stored at the same moment share one transaction (`GroupCommit`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from ai_rate_limiter.adapters.postgres import GroupCommit
from ai_rate_limiter.errors import DependencyUnavailable


class Writes:
    def __init__(self, fail_on: object = None, down: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.fail_on, self.down = fail_on, down
        self.gate = threading.Event()
        self.first = threading.Event()

    def __call__(self, rows: Sequence[int]) -> list[bool]:
        self.groups.append(list(rows))
        if len(self.groups) == 1:  # hold the first transaction until every other write waits
            self.first.set()
            self.gate.wait(5)
        if self.down:
            raise DependencyUnavailable("postgres: down")
        if self.fail_on in rows:
            raise ValueError("a row Postgres refuses")
        return [row % 2 == 0 for row in rows]


def write_together(writes: Writes, rows: list[int], most: int = 200) -> list[object]:
    """Write `rows[0]` and, while it is being written, all the others: each one's outcome."""
    group = GroupCommit(writes, most=most)
    with ThreadPoolExecutor(len(rows)) as pool:
        first = pool.submit(group.write, rows[0])
        writes.first.wait(5)
        rest = [pool.submit(group.write, row) for row in rows[1:]]
        while len(group._waiting) < len(rows) - 1:  # every other write is waiting
            threading.Event().wait(0.001)
        writes.gate.set()
        outcomes: list[object] = []
        for f in [first, *rest]:
            try:
                outcomes.append(f.result(5))
            except Exception as exc:
                outcomes.append(exc)
    return outcomes


def test_writes_that_arrive_while_one_is_written_share_the_next_transaction() -> None:
    writes = Writes()
    assert write_together(writes, list(range(10))) == [i % 2 == 0 for i in range(10)]
    assert [sorted(g) for g in writes.groups] == [[0], list(range(1, 10))]


def test_one_row_refused_fails_only_itself() -> None:
    writes = Writes(fail_on=4)
    outcomes = write_together(writes, list(range(8)))
    assert isinstance(outcomes[4], ValueError)
    assert [o for i, o in enumerate(outcomes) if i != 4] == [i % 2 == 0 for i in range(8) if i != 4]
    assert sorted(writes.groups[1]) == list(range(1, 8))  # tried together, then one at a time
    assert sorted(g[0] for g in writes.groups[2:]) == list(range(1, 8))


def test_postgres_down_fails_the_whole_group_at_once() -> None:
    writes = Writes(down=True)
    outcomes = write_together(writes, list(range(6)))
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes)
    assert len(writes.groups) == 2  # not retried row by row


def test_a_group_is_at_most_its_size() -> None:
    writes = Writes()
    assert write_together(writes, list(range(8)), most=3) == [i % 2 == 0 for i in range(8)]
    assert [len(g) for g in writes.groups] == [1, 3, 3, 1]


@pytest.mark.parametrize("n", [1, 50])
def test_every_write_gets_its_own_outcome(n: int) -> None:
    group = GroupCommit(lambda rows: [row * 10 for row in rows])
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(group.write, range(n))) == [i * 10 for i in range(n)]


def test_whoever_writes_next_writes_its_own_row_first() -> None:
    """The writer that takes the next group may be any of those waiting, its row anywhere in
    the queue: its group starts with its own row, so it never returns before that row is
    written (a caller told nothing would take its paid answer as lost)."""
    for _ in range(50):  # which waiting writer goes next is up to the scheduler
        writes = Writes()
        assert write_together(writes, list(range(6)), most=2) == [i % 2 == 0 for i in range(6)]
        assert sorted(row for g in writes.groups for row in g) == list(range(6))
        assert all(len(g) <= 2 for g in writes.groups)


def test_a_deadlocked_group_is_written_again_row_by_row() -> None:
    """A deadlock (or serialization failure) writes no row of the group: rather than fail every
    answer in it (each would be asked of its provider again), each row is written alone."""
    import psycopg2.errors

    class Deadlocks(Writes):
        def __call__(self, rows: Sequence[int]) -> list[bool]:
            if len(rows) > 1:
                self.groups.append(list(rows))
                try:
                    raise psycopg2.errors.DeadlockDetected("deadlock detected")
                except psycopg2.errors.DeadlockDetected as exc:
                    raise DependencyUnavailable("postgres: deadlock detected") from exc
            return super().__call__(rows)

    writes = Deadlocks()
    assert write_together(writes, list(range(5))) == [i % 2 == 0 for i in range(5)]
    assert sorted(writes.groups[1]) == [1, 2, 3, 4] and all(len(g) == 1 for g in writes.groups[2:])
