"""Shards a queue no longer uses: what is left in them goes to its main queue.

When `workers` goes down, the shards beyond it lose their event source mappings, so nothing
would start an invocation for what still waits there; invocations of the other workers read
them only while they run. The sweeper moves those messages to the queue's main shard.
"""

from __future__ import annotations

from ..bootstrap import Container

MOVE_AT_ONCE = 1000  # messages moved from one shard in one sweep


def fold_retired(c: Container) -> int:
    moved = 0
    for q in c.store.queue_workers():
        if q["shards"] <= q["workers"]:
            continue
        names = c.names(q["tenant_id"], q["queue_id"])
        for shard in names.shards(q["shards"])[q["workers"] :]:
            moved += c.broker.move(shard, names.main, MOVE_AT_ONCE)
    return moved
