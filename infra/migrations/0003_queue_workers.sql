-- Dynamic workers: a queue is served by `workers` concurrent invocations, one per broker queue
-- shard (an Amazon MQ event source mapping consumes one queue and runs one invocation at a
-- time). `shards` is the most shards the queue has ever had: shards beyond `workers` are no
-- longer published to, but are still read until they are empty.
ALTER TABLE queues ADD COLUMN workers integer NOT NULL DEFAULT 1 CHECK (workers > 0);
ALTER TABLE queues ADD COLUMN shards integer NOT NULL DEFAULT 1 CHECK (shards >= workers);
