"""Batch progress: counts by status, percent done and an ETA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .models import TERMINAL, Status


@dataclass(frozen=True)
class Progress:
    total: int
    counts: dict[str, int]
    done: int
    percent: float
    status: str
    eta_s: float | None


def batch_progress(
    total: int,
    counts: Mapping[str, int],
    created_at: datetime,
    now: datetime,
    finished: bool,
    cancelled: bool = False,
) -> Progress:
    full = {s.value: int(counts.get(s.value, 0)) for s in Status}
    done = sum(full[s.value] for s in TERMINAL)
    percent = round(100.0 * done / total, 2) if total else 100.0
    if cancelled:  # what was in flight finishes; nothing else starts
        status, eta = "cancelled", 0.0
    elif finished or (total and done >= total):
        status, eta = "completed", 0.0
    elif done == 0:
        status = "processing" if full[Status.PROCESSING] else "queued"
        eta = None
    else:
        status = "processing"
        elapsed = max((now - created_at).total_seconds(), 0.0)
        eta = round(elapsed / done * (total - done), 1)
    return Progress(total, full, done, percent, status, eta)
