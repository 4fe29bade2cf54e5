"""Each tenant's limits on the API: every route 10 a second with a burst of 20, and routes
that create or change something 100 a minute (the defaults, after the seed's APISIX ones)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.domain.limits import inbound_limits
from chalice.test import Client

from tests.conftest import FakeProvider

from .conftest import Api, app_on, assert_problem, count_rows, provider

DEFAULTS = Settings()


@pytest.fixture()
def limited(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """The API with the default limits on the admin key's tenant."""
    container.settings = replace(
        container.settings,
        inbound_per_s=DEFAULTS.inbound_per_s,
        inbound_burst=DEFAULTS.inbound_burst,
        inbound_writes=DEFAULTS.inbound_writes,
        inbound_writes_window_s=DEFAULTS.inbound_writes_window_s,
    )
    with Client(app_on(container, monkeypatch)) as client:
        yield Api(client, container.settings.admin_api_key)


def test_a_burst_past_the_limit_is_429_with_retry_after_and_changes_nothing(
    limited: Api, container: Container
) -> None:
    answers = [limited.call("get", "/queues").status_code for _ in range(DEFAULTS.inbound_burst + 5)]
    assert answers[: DEFAULTS.inbound_burst] == [200] * DEFAULTS.inbound_burst
    assert 429 in answers[DEFAULTS.inbound_burst :]
    before = count_rows(container)
    r = limited.call("post", "/queue/create", {"queue_id": "q", "providers": []})
    assert_problem(r, 429, "try again")
    assert 1 <= int(r.headers["retry-after"]) <= 1
    assert count_rows(container) == before
    # /health is not limited: a load balancer may poll it as often as it likes.
    assert limited.call("get", "/health", key="").status_code == 200


def test_writes_have_their_own_smaller_limit_and_polling_stays_usable(
    limited: Api, container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    container.settings = replace(container.settings, inbound_per_s=1000, inbound_burst=1000, inbound_writes=3)
    made = [limited.call("post", "/provider/create", provider(fake.url)).status_code for _ in range(4)]
    assert made == [201, 201, 201, 429]
    assert limited.call("get", "/providers").status_code == 200  # reading goes on
    retry = int(limited.call("delete", "/queue/none").headers["retry-after"])
    assert 1 <= retry <= 20  # the next write: one of 3 a minute


def test_limits_are_per_tenant(limited: Api, container: Container) -> None:
    made = limited.call("post", "/admin/tenants", {}).json
    other = Api(limited.client, made["api_key"])
    while limited.call("get", "/queues").status_code != 429:
        pass
    assert other.call("get", "/queues").status_code == 200


def test_the_limits_are_gcra_with_the_burst_as_tolerance() -> None:
    every, writes = inbound_limits("t", "PATCH", 10, 20, 100, 60)
    assert (every.key, every.increment_us, every.tolerance_us) == ("airl:in:t:all", 100_000, 1_900_000)
    assert (writes.key, writes.increment_us, writes.tolerance_us) == ("airl:in:t:write", 600_000, 59_400_000)
    assert [lim.key for lim in inbound_limits("t", "GET", 10, 20, 100, 60)] == ["airl:in:t:all"]
    assert inbound_limits("t", "POST", 0, 20, 0, 60) == []
