"""Broker names for a queue: the one place they are derived."""

from __future__ import annotations

from dataclasses import dataclass

DELAY_BUCKETS_S = (1, 5, 30, 120, 600, 1800)


@dataclass(frozen=True)
class BrokerNames:
    main: str
    dead_letter: str
    delay: str

    def shard(self, i: int) -> str:
        """Shard 0 is the main queue; worker i > 0 of the queue consumes `main.w<i>`."""
        return self.main if i == 0 else f"{self.main}.w{i}"

    def shards(self, n: int) -> list[str]:
        return [self.shard(i) for i in range(n)]

    def delays(self) -> list[tuple[int, str]]:
        """(seconds, name) of the delay queues: each holds its messages for as long as its name
        says and then gives them back to the main queue. One delay per queue keeps them in order
        of expiry, so none waits behind a longer one (as in one queue of per-message delays,
        where a message expires only once it reaches the head). They are quorum queues, as
        the main queue is: replicated, and a deferred message outlives a broker node."""
        return [(s, f"{self.main}.later.{s}s") for s in DELAY_BUCKETS_S]

    @property
    def dead(self) -> str:
        """The queue's dead-letter queue: a copy of each message that used up its tries, put
        there once its row says why (`dead_letter` is the broker's own: what it gives up on,
        which the sweeper settles)."""
        return f"{self.main}.dead"

    def legacy_delays(self) -> list[str]:
        """The delay queues of earlier versions (classic queues): the per-message one and the
        fixed ones. What they still hold goes back to the main queue; nothing new goes in."""
        return [self.delay, *(f"{self.delay}.{s}s" for s in DELAY_BUCKETS_S)]

    def delay_for(self, seconds: float) -> str:
        """The delay queue for a wait of `seconds`: the shortest that is as long (the longest
        for more: the message comes back sooner and waits again)."""
        return next((name for s, name in self.delays() if s >= seconds), self.delays()[-1][1])


def at_most(seconds: float) -> int:
    """The longest delay queue's wait that is not longer than `seconds` (the shortest if all
    are): for a message that may come back early and wait again, as one held elsewhere may."""
    return max((s for s in DELAY_BUCKETS_S if s <= seconds), default=DELAY_BUCKETS_S[0])


def broker_names(prefix: str, tenant_id: str, queue_id: str) -> BrokerNames:
    main = f"{prefix}.{tenant_id}.{queue_id}"
    return BrokerNames(main=main, dead_letter=f"{main}.dlq", delay=f"{main}.delay")


def parse_shard(prefix: str, name: str) -> tuple[str, str, int] | None:
    """(tenant_id, queue_id, shard) of a queue's main queue or shard; None for any other name.
    A queue id has no dots, so the last dot before it ends the tenant."""
    if not name.startswith(prefix + "."):
        return None
    rest, shard = name[len(prefix) + 1 :], 0
    head, _, tail = rest.rpartition(".")
    if tail[:1] == "w" and tail[1:].isdigit() and int(tail[1:]) > 0:
        rest, shard = head, int(tail[1:])
    tenant, _, queue_id = rest.rpartition(".")
    if not tenant or not queue_id or tail in ("dlq", "delay"):
        return None
    return tenant, queue_id, shard
