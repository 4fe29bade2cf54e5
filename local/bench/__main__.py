"""`make bench`: the limiter against `limits`, then utilization, throughput and ingest through
the running stack. Prints a table and writes bench-results.json at the repository root.

    python -m local.bench [--quick] [--only=flow]
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from local.bench import limiter, stack

ROOT = Path(__file__).resolve().parents[2]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def table(title: str, rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    head = [title, *columns]
    body = [[name, *(fmt(r.get(c, "")) for c in columns)] for name, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[Any]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in body)])


FLOW_COLUMNS = [
    "n",
    "limit",
    "window_s",
    "utilization",
    "provider_429s",
    "provider_max_in_window",
    "provider_max_in_flight",
    "delay_p50_ms",
    "delay_p99_ms",
    "delay_max_ms",
    "messages_per_s",
    "speedup",
]


def flow_rows(flow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {name: row for name, row in flow.items() if name not in ("workers", "quick_start")}
    rows.update({f"workers_{w}": row for w, row in flow["workers"].items()})
    return {
        name: {**row, **{f"delay_{q}_ms": row["arrival_delay_ms"][q] for q in ("p50", "p99", "max")}}
        for name, row in rows.items()
    }


def report(results: dict[str, Any]) -> str:
    lim = results["limiter"]
    parts = [
        table(
            "limiter",
            lim,
            [
                "p50_us",
                "p99_us",
                "checks_per_s_1proc",
                "checks_per_s_8procs",
                "limit",
                "max_in_window",
                "utilization",
                "redis_calls_per_admit",
            ],
        ),
        table(
            "utilization",
            results["utilization"],
            [
                "n",
                "wall_s",
                "ideal_s",
                "utilization",
                "provider_429s",
                "provider_max_in_window",
                "provider_limit",
                "window_s",
            ],
        ),
        table(
            "flow",
            flow_rows(results["flow"]),
            FLOW_COLUMNS,
        ),
        table(
            "throughput",
            {"end to end": results["throughput"]},
            ["n", "messages_per_s", "ceiling_per_s", "ratio"],
        ),
        table("ingest", {"batch": results["ingest"]}, ["batch_size", "accept_s", "api_peak_rss_mb"]),
    ]
    return "\n\n".join(parts)


def main() -> int:
    # SIGTERM ends the run as Ctrl-C does, so the stack it started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = "--quick" in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), "")
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": quick,
        },
    }
    if only == "flow":  # one section, printed and not written
        results.update(stack.run(quick=quick, only="flow"))
        print(table("flow", flow_rows(results["flow"]), FLOW_COLUMNS))
        return 0
    results["limiter"] = limiter.run(quick=quick)
    results.update(stack.run(quick=quick))
    (ROOT / "bench-results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nwritten to {ROOT / 'bench-results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
