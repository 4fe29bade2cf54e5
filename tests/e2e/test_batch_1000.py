"""1,000 prompts over one queue with two providers of different types and limits.

The fake provider holds each key to the same hard limit the provider is configured with;
afterwards its stats must show no request over a limit and no 429.
"""

from __future__ import annotations

import csv
import io

from tests.conftest import random_key

from .conftest import Stack, wait_until

N = 1000
LIMITS = {"openai": (250, 5.0), "anthropic": (150, 5.0)}


def test_a_1000_prompt_batch_over_two_providers(stack: Stack) -> None:
    keys = {kind: random_key() for kind in LIMITS}
    stack.configure_fake(keys={keys[k]: {"limit": lim, "window": win} for k, (lim, win) in LIMITS.items()})
    providers = [
        {
            "provider_name": f"fake-{kind}",
            "provider_type": kind,
            "api_key": keys[kind],
            "limit": lim,
            "time_window": win,
            "config": {"endpoint": stack.fake, "max_tokens": 64},
        }
        for kind, (lim, win) in LIMITS.items()
    ]
    assert (
        stack.call("POST", "/queue/create", json={"queue_id": "big", "providers": providers}).status_code
        == 201
    )
    prompts = [f"Prompt {i:04d}: say something about the number {i}" for i in range(N)]
    r = stack.call(
        "POST",
        "/message/create",
        json={
            "queue_id": "big",
            "messages": [{"prompt": p, "custom_id": f"row-{i}"} for i, p in enumerate(prompts)],
        },
    )
    assert r.status_code == 202 and r.json()["total"] == N
    bid = r.json()["batch_id"]

    seen: list[float] = []

    def finished() -> bool:
        p = stack.call("GET", f"/batch/{bid}").json()
        seen.append(p["percent"])
        return p["status"] == "completed"

    wait_until(finished, timeout=180, every=1.0)
    assert seen == sorted(seen) and seen[-1] == 100.0

    rows, cursor = [], None
    while True:
        page = stack.call(
            "GET", f"/batch/{bid}/results", params={"limit": 300, **({"cursor": cursor} if cursor else {})}
        ).json()
        rows += page["results"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [x["prompt"] for x in rows] == prompts
    assert [x["custom_id"] for x in rows] == [f"row-{i}" for i in range(N)]
    assert all(x["status"] == "completed" for x in rows)
    assert [x["response"] for x in rows] == [f"Echo: {p}" for p in prompts]
    used = {x["provider"] for x in rows}
    assert used == {"fake-openai", "fake-anthropic"}

    table: list[dict[str, str]] = []
    cursor = None
    while True:
        page = stack.call(
            "GET",
            f"/batch/{bid}/results",
            params={"format": "csv", "limit": 400, **({"cursor": cursor} if cursor else {})},
        )
        table += list(csv.DictReader(io.StringIO(page.text)))
        cursor = page.headers.get("x-next-cursor")
        if not cursor:
            break
    assert [row["prompt"] for row in table] == prompts
    assert [int(row["index"]) for row in table] == list(range(N))

    stats = stack.fake_stats()
    print(
        {
            k: {f: stats["keys"][keys[k]][f] for f in ("requests", "max_in_window", "min_span_s")}
            for k in LIMITS
        }
    )
    for kind, (limit, _) in LIMITS.items():
        s = stats["keys"][keys[kind]]
        assert s["rate_limited"] == 0, (kind, s)
        assert s["over_limit"] == 0 and s["max_in_window"] <= limit, (kind, s)
    assert sum(stats["keys"][keys[k]]["requests"] for k in LIMITS) == N  # nothing sent twice
