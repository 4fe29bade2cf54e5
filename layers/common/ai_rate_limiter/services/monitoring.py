"""Worker monitoring: what each invocation reports, and `GET /workers` built from it."""

from __future__ import annotations

import time

from ..adapters.monitor import BUCKET_S
from ..bootstrap import Container
from ..errors import AppError
from .intake import Intake
from .views import Row

REPORT_EVERY_S = 1.0


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max, in milliseconds."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 2)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1] * 1e3, 2)}


class InvocationReport:
    """One running invocation's heartbeat and counts, sent about once a second."""

    def __init__(self, c: Container, tenant: str, queue_id: str, shard: int, started: float) -> None:
        self.c = c
        self.worker = f"{tenant}:{queue_id}:{shard}"
        self.started = started
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= REPORT_EVERY_S

    def send(self, intake: Intake, final: bool = False) -> None:
        self.last = time.monotonic()
        completed, figures = intake.take_figures()
        beat = None if final else {"started_at": self.started, "in_flight": intake.in_flight}
        providers = {
            pid: {
                "sent": f.sent,
                "rate_limited": f.rate_limited,
                "late": f.late,
                "delays_s": list(f.delays_s),
                "waits_s": list(f.waits_s),
            }
            for pid, f in figures.items()
        }
        self.c.monitor.report(self.worker, beat, completed, providers)


def _span_s() -> float:
    """The time the last-minute counts cover: the current bucket and the six before it."""
    now = time.time()
    return now - (int(now // BUCKET_S) - 60 // BUCKET_S) * BUCKET_S


def _backlog(c: Container, queue: str) -> int | None:
    try:
        return c.broker.ready(queue)
    except AppError:
        return None


def queue_workers(c: Container, tenant: str, queue_id: str, workers: int, shards: int) -> Row:
    names = c.names(tenant, queue_id)
    now = time.time()
    out = []
    for i in range(shards):
        seen = c.monitor.worker(f"{tenant}:{queue_id}:{i}")
        beat = seen["invocation"]
        out.append(
            {
                "worker": i,
                "broker_queue": names.shard(i),
                "active": i < workers,
                "backlog": _backlog(c, names.shard(i)),
                "in_flight": int(beat["in_flight"]) if beat else 0,
                "completed_last_minute": seen["completed_last_minute"],
                "invocation_age_s": round(now - float(beat["started_at"]), 1) if beat else None,
            }
        )
    return {"queue_id": queue_id, "workers": workers, "shards": shards, "worker_state": out}


def provider_figures(c: Container, row: Row) -> Row:
    seen = c.monitor.provider(str(row["id"]))
    span = _span_s()
    sent = seen.get("sent_last_minute")
    return {
        "provider_id": str(row["id"]),
        "provider_name": row["name"],
        "limit_per_s": round(row["request_limit"] / row["time_window"], 4),
        "granted_per_s": None if sent is None else round(sent / span, 4),
        "sent_last_minute": sent,
        "rate_limited_last_minute": seen.get("rate_limited_last_minute"),
        "held_back_last_minute": seen.get("late_last_minute"),
        "slot_to_departure_ms": percentiles(seen.get("delays_s", [])),
        "wait_for_slot_ms": percentiles(seen.get("waits_s", [])),
    }


def workers_view(c: Container, tenant: str, queue_id: str | None = None) -> Row:
    rows = c.store.queue_workers(tenant, queue_id)
    queues = [queue_workers(c, tenant, r["queue_id"], r["workers"], r["shards"]) for r in rows]
    seen: dict[str, Row] = {}
    for r in rows:
        for provider, _ in c.store.queue_providers(tenant, r["queue_id"]):
            seen.setdefault(str(provider["id"]), provider)
    return {"queues": queues, "providers": [provider_figures(c, p) for p in seen.values()]}
