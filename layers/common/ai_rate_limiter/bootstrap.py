"""The composition root: builds each adapter from Settings on first use; warm invocations reuse it."""

from __future__ import annotations

import threading
from functools import cached_property

from .adapters.egress import http_client, sdk_http_client
from .adapters.postgres import Database, Store
from .adapters.providers import ProviderGateway
from .adapters.rabbitmq import Broker
from .adapters.redis_limiter import RedisLimiter
from .adapters.webhooks import WebhookSender
from .config import Settings
from .domain.names import BrokerNames, broker_names


class Container:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url, maxconn=self.settings.db_pool_size)

    @cached_property
    def store(self) -> Store:
        return Store(self.db)

    @cached_property
    def broker(self) -> Broker:
        return Broker(self.settings.rabbitmq_url)

    @cached_property
    def limiter(self) -> RedisLimiter:
        return RedisLimiter(self.settings.redis_url)

    @cached_property
    def providers(self) -> ProviderGateway:
        http = sdk_http_client(self.settings.provider_timeout_s, self.settings.worker_concurrency)
        return ProviderGateway(http, self.settings.provider_timeout_s)

    @cached_property
    def webhooks(self) -> WebhookSender:
        return WebhookSender(http_client(self.settings.webhook_timeout_s, 10))

    def names(self, tenant_id: str, queue_id: str) -> BrokerNames:
        return broker_names(self.settings.broker_prefix, tenant_id, queue_id)

    def close(self) -> None:
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
