"""The composition root: builds each adapter from Settings on first use; warm invocations reuse it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

from .adapters.egress import http_client, sdk_http_client
from .adapters.mappings import EventSourceMappings
from .adapters.monitor import Monitor
from .adapters.postgres import Database, Store
from .adapters.providers import ProviderGateway
from .adapters.rabbitmq import Broker, QueueReader, vhost_of
from .adapters.redis_limiter import RedisLimiter
from .adapters.secrets_box import SecretBox, from_settings, use
from .adapters.webhooks import WebhookSender
from .config import Settings
from .domain.names import BrokerNames, broker_names
from .errors import DependencyUnavailable
from .ports import SystemClock
from .rotate_keys import seal_unsealed


class Container:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: ThreadPoolExecutor | None = None
        self._threads_lock = threading.Lock()

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url, maxconn=self.settings.db_pool_size)

    @cached_property
    def keys(self) -> SecretBox:
        """What seals and opens provider API keys, built from Settings once per process (in
        the cloud: KMS Decrypt once per cold start). Built with the store, which reads and
        writes keys through it; on the way, keys stored before encryption are sealed."""
        box = use(from_settings(self.settings))
        seal_unsealed(self.db, box)
        return box

    @cached_property
    def store(self) -> Store:
        self.keys  # noqa: B018  (no store without the box its keys are sealed with)
        return Store(self.db)

    @cached_property
    def admin_key(self) -> str:
        """ADMIN_API_KEY; or else, in the cloud, the Secrets Manager secret that
        ADMIN_API_KEY_SECRET_ARN names, read once per cold start. Empty: no admin key."""
        s = self.settings
        if s.admin_api_key or not s.admin_api_key_secret_arn:
            return s.admin_api_key
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = boto3.client("secretsmanager").get_secret_value(SecretId=s.admin_api_key_secret_arn)
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable(
                f"secrets manager: the admin key could not be read ({type(exc).__name__})"
            ) from None
        return str(answer["SecretString"]).strip()

    @cached_property
    def broker(self) -> Broker:
        return Broker(self.settings.rabbitmq_url)

    @cached_property
    def limiter(self) -> RedisLimiter:
        return RedisLimiter(self.settings.redis_url)

    @cached_property
    def monitor(self) -> Monitor:
        return Monitor(self.limiter.client)

    @cached_property
    def mappings(self) -> EventSourceMappings | None:
        """The worker's event source mappings, where the API runs in the cloud."""
        s = self.settings
        if not (s.worker_function_name and s.broker_arn):
            return None
        import boto3

        return EventSourceMappings(
            boto3.client("lambda"),
            s.worker_function_name,
            s.broker_arn,
            s.broker_secret_arn,
            vhost=vhost_of(s.rabbitmq_url),
            batch_size=s.worker_batch_size,
            batching_window_s=s.worker_batching_window_s,
        )

    def reader(self, queues: list[str]) -> QueueReader:
        """A reader of these broker queues for one invocation (closed when it ends)."""
        return QueueReader(self.settings.rabbitmq_url, queues)

    @cached_property
    def providers(self) -> ProviderGateway:
        timeout, allow = self.settings.provider_timeout_s, self.settings.egress_allow
        return ProviderGateway(
            lambda n: sdk_http_client(timeout, n, allow),
            timeout,
            max_connections=self.settings.worker_concurrency,
        )

    @cached_property
    def clock(self) -> SystemClock:
        return SystemClock()

    @cached_property
    def webhooks(self) -> WebhookSender:
        return WebhookSender(http_client(self.settings.webhook_timeout_s, 10, self.settings.egress_allow))

    def threads(self) -> ThreadPoolExecutor:
        """The threads that process messages, up to WORKER_CONCURRENCY, kept from one invocation
        to the next with the connections they hold. One set for the process: an execution
        environment runs one invocation at a time and has 1,024 threads in all (Lambda's quota)."""
        with self._threads_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.worker_concurrency, thread_name_prefix="msg")
            return self._pool

    def names(self, tenant_id: str, queue_id: str) -> BrokerNames:
        return broker_names(self.settings.broker_prefix, tenant_id, queue_id)

    def close(self) -> None:
        with self._threads_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for name in ("db", "broker"):
            if name in self.__dict__:
                self.__dict__[name].close()


_container: Container | None = None
_lock = threading.Lock()


def container() -> Container:
    """The process-wide container, built from the environment on first call."""
    global _container
    with _lock:
        if _container is None:
            _container = Container(Settings.from_env())
        return _container
