"""Adapters: the only modules that talk to Postgres, Redis, RabbitMQ and HTTP."""
