"""The worker function's Amazon MQ event source mappings, one per broker queue shard (boto3).

For RabbitMQ, Lambda runs at most one execution environment per event source mapping, and a
mapping consumes one queue. So a queue with N workers has N broker queues, its shards: shard 0
is the queue's main broker queue `<main>`, shard i > 0 is `<main>.w<i>`, and each has one mapping
of the worker function. `sync` makes the mappings match the shards wanted; `remove` deletes them.
A queue's shards are `<main>` and `<main>.w<digits>`: no other name is ever touched.
"""

from __future__ import annotations

import builtins
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from ..errors import AppError, DependencyUnavailable

MAX_BATCH_SIZE = 10_000  # Lambda's BatchSize range for Amazon MQ: 1..10,000
MAX_BATCHING_WINDOW_S = 300  # MaximumBatchingWindowInSeconds: whole seconds, 0..300
GONE = "Deleting"  # a mapping on its way out no longer maps its queue
DISABLED = frozenset({"Disabled", "Disabling"})
# Lambda's answers that may succeed later: throttling, its own failures, and a mapping that is
# busy with another change (ResourceInUse / ResourceConflict: "operation in progress").
RETRYABLE = frozenset(
    {
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "ServiceException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "ResourceInUseException",
        "ResourceConflictException",
    }
)

Esm = dict[str, Any]  # one EventSourceMappingConfiguration, as botocore returns it


@dataclass(frozen=True)
class Changes:
    """What one `sync` or `remove` did, as shard queue names."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


def shard_index(main: str, queue: str) -> int | None:
    """0 for `main`, i for `main.w<i>`, None for any other queue (another queue's, the DLQ...)."""
    if queue == main:
        return 0
    match = re.fullmatch(re.escape(main) + r"\.w([0-9]+)", queue)
    return int(match.group(1)) if match else None


def _error(operation: str, exc: Exception) -> AppError:
    """The one translation of botocore's errors into the project's."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"lambda {operation}: {code}: {error.get('Message', '')}"
        if code in RETRYABLE or status == 429 or status >= 500:
            return DependencyUnavailable(detail, operation=operation, code=code)
        # Permissions, a missing function or broker, a parameter Lambda refuses: a deployment
        # problem that retrying will not fix.
        return AppError(detail, operation=operation, code=code)
    if isinstance(exc, ParamValidationError):
        return AppError(f"lambda {operation}: {exc}", operation=operation)
    return DependencyUnavailable(f"lambda {operation}: {exc}", operation=operation)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise _error(operation, exc) from exc


class EventSourceMappings:
    """The worker function's Amazon MQ event source mappings, one per broker queue shard."""

    def __init__(
        self,
        client: Any,
        function_name: str,
        broker_arn: str,
        secret_arn: str,
        vhost: str = "/",
        batch_size: int = 10,
        batching_window_s: float = 0,
    ) -> None:
        for name, value in (
            ("function_name", function_name),
            ("broker_arn", broker_arn),
            ("secret_arn", secret_arn),
            ("vhost", vhost),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"batch_size must be an integer, not {batch_size!r}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, not {batch_size}")
        window = float(batching_window_s)
        if not 0 <= window <= MAX_BATCHING_WINDOW_S or window != int(window):
            raise ValueError(
                f"batching_window_s must be whole seconds 0..{MAX_BATCHING_WINDOW_S}, "
                f"not {batching_window_s!r}"
            )
        self.client = client
        self.function_name = function_name
        self.broker_arn = broker_arn
        self.secret_arn = secret_arn
        self.vhost = vhost
        self.batch_size = batch_size
        self.batching_window_s = int(window)

    # -- the three operations ---------------------------------------------------------------

    def sync(self, main: str, shards: Sequence[str]) -> Changes:
        """Make exactly `shards` mapped among this queue's shards: delete the mappings of the
        others (and any second mapping of one shard), create the missing ones, update those
        whose BatchSize, batching window or enabled state drifted. Idempotent: a second call
        changes nothing. A failure part-way leaves a state the next call finishes."""
        wanted = self._wanted(main, shards)
        kept: dict[str, Esm] = {}
        extra: builtins.list[tuple[str, Esm]] = []
        for queue, mapping in self._scan(main):
            if queue in wanted and queue not in kept:
                kept[queue] = mapping
            else:
                extra.append((queue, mapping))
        deleted: builtins.list[str] = []
        for queue, mapping in extra:
            self._delete(mapping)
            deleted.append(queue)
        created = [queue for queue in wanted if queue not in kept]
        for queue in created:
            self._create(queue)
        updated = [queue for queue in wanted if queue in kept and self._drifted(kept[queue])]
        for queue in updated:
            self._update(kept[queue])
        return Changes(created=tuple(created), updated=tuple(updated), deleted=tuple(deleted))

    def remove(self, main: str) -> Changes:
        """Delete the mapping of every shard of this queue."""
        return self.sync(main, ())

    def list(self, main: str) -> dict[str, Esm]:
        """This queue's mapped shards: shard queue name -> its mapping (UUID, State, BatchSize,
        MaximumBatchingWindowInSeconds, ...), in shard order. Mappings being deleted are left
        out; of two mappings of one shard, the first Lambda lists."""
        found: dict[str, Esm] = {}
        for queue, mapping in self._scan(main):
            found.setdefault(queue, mapping)
        return found

    # -- reading ----------------------------------------------------------------------------

    def _scan(self, main: str) -> builtins.list[tuple[str, Esm]]:
        """(shard queue, mapping) for every live mapping of this queue's shards, shard order."""
        _check_main(main)
        found: builtins.list[tuple[int, str, Esm]] = []
        with _translated("ListEventSourceMappings"):
            pages = self.client.get_paginator("list_event_source_mappings").paginate(
                FunctionName=self.function_name, EventSourceArn=self.broker_arn
            )
            for page in pages:
                for mapping in page.get("EventSourceMappings", []):
                    queues = mapping.get("Queues") or []
                    if len(queues) != 1 or mapping.get("State") == GONE:
                        continue
                    index = shard_index(main, queues[0])
                    if index is not None:
                        found.append((index, queues[0], mapping))
        found.sort(key=lambda item: item[0])  # stable: Lambda's order within one shard
        return [(queue, mapping) for _, queue, mapping in found]

    def _wanted(self, main: str, shards: Sequence[str]) -> builtins.list[str]:
        _check_main(main)
        if isinstance(shards, str):
            raise ValueError("shards must be a sequence of queue names, not one string")
        wanted: builtins.list[str] = []
        for queue in shards:
            if not isinstance(queue, str) or shard_index(main, queue) is None:
                raise ValueError(f"{queue!r} is not a shard of {main!r} ({main} or {main}.w<i>)")
            if queue not in wanted:
                wanted.append(queue)
        return wanted

    def _drifted(self, mapping: Esm) -> bool:
        return (
            mapping.get("BatchSize") != self.batch_size
            or mapping.get("MaximumBatchingWindowInSeconds") != self.batching_window_s
            or mapping.get("State") in DISABLED
        )

    # -- writing ----------------------------------------------------------------------------

    def _create(self, queue: str) -> None:
        with _translated("CreateEventSourceMapping"):
            self.client.create_event_source_mapping(
                FunctionName=self.function_name,
                EventSourceArn=self.broker_arn,
                Queues=[queue],
                BatchSize=self.batch_size,
                MaximumBatchingWindowInSeconds=self.batching_window_s,
                Enabled=True,
                SourceAccessConfigurations=[
                    {"Type": "BASIC_AUTH", "URI": self.secret_arn},
                    {"Type": "VIRTUAL_HOST", "URI": self.vhost},
                ],
            )

    def _update(self, mapping: Esm) -> None:
        with _translated("UpdateEventSourceMapping"):
            self.client.update_event_source_mapping(
                UUID=mapping["UUID"],
                BatchSize=self.batch_size,
                MaximumBatchingWindowInSeconds=self.batching_window_s,
                Enabled=True,
            )

    def _delete(self, mapping: Esm) -> None:
        """Delete one mapping; one Lambda says is already gone counts as deleted."""
        with _translated("DeleteEventSourceMapping"):
            try:
                self.client.delete_event_source_mapping(UUID=mapping["UUID"])
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise


def _check_main(main: str) -> None:
    if not isinstance(main, str) or not main or len(main) > 1000:
        raise ValueError(f"{main!r} is not a broker queue name (1..1000 characters)")
