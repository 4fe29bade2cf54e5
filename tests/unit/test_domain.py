from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from ai_rate_limiter.config import Settings
from ai_rate_limiter.domain.backoff import backoff_s, retry_after_s
from ai_rate_limiter.domain.limits import Headroom, guard_s, request_limit
from ai_rate_limiter.domain.models import ChatRequest, Provider, ProviderType, mask_key
from ai_rate_limiter.domain.names import broker_names, parse_shard
from ai_rate_limiter.domain.progress import batch_progress


def provider(**kw: object) -> Provider:
    base: dict[str, object] = dict(
        id="p1", name="P", type=ProviderType.OPENAI, api_key="sk-abcdef123456", limit=100, time_window=2.0
    )
    return Provider(**{**base, **kw})  # type: ignore[arg-type]


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff_s(n, base=0.5, rand=1.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff_s(30, cap=30.0, rand=1.0) == 30.0
    assert 0 <= backoff_s(3) <= 2.0


def test_equal_jitter_keeps_half_of_each_backoff() -> None:
    assert [backoff_s(n, rand=0.0, floor=0.5) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert [backoff_s(n, rand=1.0, floor=0.5) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(3, rand=0.0) == 0.0  # full jitter by default


def test_retry_after_prefers_milliseconds() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"Retry-After": "3"}) == 3.0
    assert retry_after_s({}) is None
    assert retry_after_s({"retry-after": "soon"}) is None


def test_retry_after_is_kept_within_a_day_and_nan_is_ignored() -> None:
    assert retry_after_s({"retry-after": "inf"}) == 86_400.0
    assert retry_after_s({"retry-after-ms": "1e300"}) == 86_400.0
    assert retry_after_s({"retry-after": "-5"}) == 0.0
    assert retry_after_s({"retry-after": "nan"}) is None
    assert retry_after_s({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0


def test_retry_after_as_an_http_date() -> None:
    assert (
        retry_after_s(
            {"retry-after": "Sat, 28 Nov 2026 10:00:10 GMT"},
            now=datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC).timestamp(),
        )
        == 10.0
    )


def test_request_limit_paces_evenly_with_headroom() -> None:
    assert request_limit(provider(limit=100, time_window=2.0), Headroom(0, 0)).increment_us == 20_000
    limit = request_limit(provider(limit=100, time_window=2.0), Headroom(guard_s=0.1, margin=0.01))
    assert limit.increment_us == 21_200
    assert limit.tolerance_us == 0


def test_the_limit_is_keyed_by_key_and_model_not_by_record() -> None:
    a, b = provider(id="a"), provider(id="b")
    assert request_limit(a, Headroom()).key == request_limit(b, Headroom()).key
    other_model = provider(config={"model": "gpt-4o"})
    assert request_limit(a, Headroom()).key != request_limit(other_model, Headroom()).key
    assert "sk-abcdef123456" not in request_limit(a, Headroom()).key


def test_masked_keys_show_at_most_the_tail() -> None:
    assert mask_key("sk-abcdef123456") == "****3456"
    assert mask_key("short") == "****"


def test_broker_names_come_from_one_place() -> None:
    names = broker_names("airl", "default", "my-queue")
    assert names.main == "airl.default.my-queue"
    assert (names.dead_letter, names.delay) == ("airl.default.my-queue.dlq", "airl.default.my-queue.delay")
    assert broker_names("airl", "t2", "my-queue").main != names.main  # tenants never share a queue


def test_shards_are_named_and_read_back() -> None:
    names = broker_names("airl", "default", "my-queue")
    main = "airl.default.my-queue"
    assert names.shards(3) == [main, f"{main}.w1", f"{main}.w2"]
    assert parse_shard("airl", "airl.default.my-queue.w2") == ("default", "my-queue", 2)
    assert parse_shard("airl", "airl.default.my-queue") == ("default", "my-queue", 0)
    assert parse_shard("airl", "airl.t.x.q_1") == ("t.x", "q_1", 0)  # the last dot ends the tenant
    for other in ("airl.default.my-queue.dlq", "airl.default.my-queue.delay", "other.default.q", "airl.q"):
        assert parse_shard("airl", other) is None


def test_the_guard_grows_with_the_measured_departure_delays() -> None:
    assert guard_s(0.03, 0.02, None) == 0.03  # nothing measured yet: the floor
    assert guard_s(0.03, 0.02, 0.003) == 0.03  # a quiet machine: the floor covers it
    assert guard_s(0.03, 0.02, 0.02) == pytest.approx(0.05)  # a loaded one: late + 1.5 x p99


def test_chat_request_round_trips_through_json() -> None:
    req = ChatRequest(
        messages=[{"role": "user", "content": "hi"}], system="be brief", max_tokens=5, extra={"top_p": 0.5}
    )
    assert ChatRequest.from_json(req.to_json()) == req


def test_progress_counts_percent_and_eta() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    p = batch_progress(
        100, {"completed": 20, "failed": 5, "queued": 75}, t0, t0 + timedelta(seconds=10), finished=False
    )
    assert (p.done, p.percent, p.status) == (25, 25.0, "processing")
    assert p.eta_s == pytest.approx(30.0)
    assert p.counts["cancelled"] == 0
    done = batch_progress(2, {"completed": 2}, t0, t0, finished=True)
    assert (done.status, done.eta_s, done.percent) == ("completed", 0.0, 100.0)
    fresh = batch_progress(3, {"queued": 3}, t0, t0, finished=False)
    assert (fresh.status, fresh.eta_s) == ("queued", None)


def test_settings_come_from_the_environment_with_local_defaults() -> None:
    s = Settings.from_env({"API_PORT": "9000", "LIMITER_GUARD_S": "0.25"})
    assert (s.api_port, s.limiter_guard_s) == (9000, 0.25)
    assert s.public_base_url == "http://127.0.0.1:9000"
    assert Settings.from_env({}).database_url.startswith("postgresql://")


def test_rate_limit_headers_that_say_a_limit_is_used_up() -> None:
    from ai_rate_limiter.domain.feedback import Exhausted, duration_s, exhausted

    assert duration_s("6m0s") == 360.0 and duration_s("20ms") == 0.02 and duration_s("1h2m3.5s") == 3723.5
    assert duration_s("soon") is None
    assert exhausted(
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1.5s",
            "x-ratelimit-remaining-tokens": "900",
            "x-ratelimit-reset-tokens": "2s",
        }
    ) == [Exhausted("requests", 1.5)]
    now = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC).timestamp()
    assert exhausted(
        {
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": "2026-11-28T10:00:04Z",
        },
        now=now,
    ) == [Exhausted("tokens", 4.0)]
    assert exhausted({"x-ratelimit-remaining-requests": "3"}) == []


def test_token_estimates_count_the_prompt_and_reserve_the_answer() -> None:
    from ai_rate_limiter.domain import tokens

    req = ChatRequest(
        messages=[{"role": "user", "content": "Hello there, how are you today?"}],
        system="Be brief.",
        max_tokens=50,
    )
    openai_p = provider()
    assert 10 <= tokens.input_tokens(openai_p, req) <= 30
    assert tokens.estimate(openai_p, req) == tokens.input_tokens(openai_p, req) + 50
    claude = provider(type=ProviderType.ANTHROPIC)
    assert (
        tokens.input_tokens(claude, req)
        == math.ceil(len("Be brief.") / 3.5) + 5 + math.ceil(len("Hello there, how are you today?") / 3.5) + 5
    )
    no_max = ChatRequest(messages=[{"role": "user", "content": "x"}])
    assert tokens.max_output_tokens(provider(config={"max_tokens": 7}), no_max) == 7
    assert tokens.max_output_tokens(openai_p, no_max) == tokens.DEFAULT_MAX_TOKENS


def test_token_limits_are_charged_and_settled() -> None:
    from ai_rate_limiter.domain.limits import provider_limits, settlement

    p = provider(limit=100, time_window=2.0, token_limit=10_000)
    req_limit, tok_limit = provider_limits(p, Headroom(0, 0), tokens=500)
    assert (req_limit.increment_us, tok_limit.increment_us) == (20_000, 100_000)
    assert settlement(p, Headroom(0, 0), reserved=500, used=200) == {tok_limit.key: -60_000}
    assert settlement(provider(), Headroom(0, 0), 500, 200) == {}


def test_tokens_charged_as_each_provider_counts_them() -> None:
    from ai_rate_limiter.domain import tokens

    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    assert tokens.charged(provider(), req, prompt_tokens=10, completion_tokens=7) == 60
    assert tokens.charged(provider(type=ProviderType.ANTHROPIC), req, 10, 7) == 17
