"""Every setting the system reads, from environment variables, in one place.

Defaults work against PostgreSQL, Redis and RabbitMQ on localhost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/ai_rate_limiter"
    redis_url: str = "redis://127.0.0.1:6379/0"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    aws_endpoint_url: str = "http://127.0.0.1:4566"
    api_host: str = "127.0.0.1"
    api_port: int = 8501
    fake_provider_port: int = 8600
    public_base_url: str = ""
    # The admin key: it manages tenants (/admin/...) and acts as the default tenant. In the
    # cloud it comes from a Secrets Manager secret (template.yaml).
    admin_api_key: str = field(default="", repr=False)
    admin_api_key_secret_arn: str = ""  # where it is read from when ADMIN_API_KEY is empty
    # Provider API keys at rest (adapters/secrets_box.py). Locally: Fernet keys, comma-separated,
    # the first encrypts and all decrypt. In the cloud: KMS_DATA_KEY, data keys made by KMS
    # GenerateDataKey under KMS_KEY_ID, as their base64 ciphertexts (comma-separated, the first
    # encrypts), opened with KMS Decrypt once per cold start. Neither: the AWS emulator.
    provider_key_secrets: str = field(default="", repr=False)  # never in a repr or a log line
    kms_key_id: str = ""
    kms_data_key: str = field(default="", repr=False)
    default_tenant: str = "default"
    broker_prefix: str = "airl"
    # Worker and event-source mapping (Lambda's BatchSize / MaximumBatchingWindowInSeconds). An
    # event only starts an invocation: the invocation goes on taking its queue's messages itself
    # while it has time, so one message per event and no batching window start work at once.
    worker_batch_size: int = 1
    worker_batching_window_s: float = 0.0
    worker_timeout_s: float = 900.0  # Lambda's longest invocation
    # Requests one invocation holds in flight at most: a thread and a provider connection each,
    # within a Lambda environment's 1,024 threads and 1,024 file descriptors.
    worker_concurrency: int = 600
    worker_lookahead_s: float = 1.0  # take a message once its queue's next slot is this close
    worker_idle_s: float = 1.0  # an invocation with nothing to do for this long returns
    max_workers: int = 16  # `workers` a queue may ask for
    # Where the API manages the worker's event source mappings (the cloud); empty: locally,
    # the bridge reads `workers` from the database.
    worker_function_name: str = ""
    broker_arn: str = ""
    broker_secret_arn: str = ""
    db_pool_size: int = 16  # Postgres connections per process, kept open
    queue_poll_s: float = 1.0
    max_attempts: int = 5
    provider_timeout_s: float = 60.0
    # Pace as if each window were `limiter_guard_s` plus `limiter_margin` of itself longer, so
    # that the delay between a slot and the request's arrival at the provider never puts one
    # request too many into the provider's window. A request that would leave more than
    # `limiter_late_s` after its slot is not sent: it takes a fresh slot. So the delay is at
    # most `limiter_late_s` when the request leaves; the guard adds what the way to the provider
    # may add to it.
    limiter_guard_s: float = 0.03
    limiter_margin: float = 0.002
    limiter_late_s: float = 0.02
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    sweeper_interval_s: float = 1.0
    max_batch_size: int = 100_000
    idempotency_ttl_s: float = 86_400.0  # how long an Idempotency-Key keeps its first answer
    max_body_bytes: int = 6 * 1024 * 1024  # what a Lambda function accepts
    page_size: int = 1000
    max_page_size: int = 10_000
    # Each tenant's limits on the API (after the seed's APISIX defaults); 0 turns one off.
    inbound_per_s: float = 10.0  # every request, with a burst of
    inbound_burst: int = 20
    inbound_writes: int = 100  # requests that create or change something, per
    inbound_writes_window_s: float = 60.0
    egress_allow: str = ""  # EGRESS_ALLOW: `host:port` entries past the egress guard (adapters/egress.py)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            values[f.name] = kind(raw) if kind in (int, float) else raw
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.public_base_url:
            base = f"http://{settings.api_host}:{settings.api_port}"
            settings = cls(**{**settings.__dict__, "public_base_url": base})
        return settings
