"""Lambda execution environments for the local bridge: one process each, kept warm.

In the cloud every concurrent invocation of the worker runs in an execution environment of its
own (its own process, memory and CPU), and an idle one is reused by the next invocation of the
function, whichever mapping it comes from. The bridge does the same: each invocation runs in an
idle environment process, or a new one; one invocation at a time per environment; an
environment idle for `IDLE_S` ends; one spare is kept started so a first invocation does not
wait for the imports.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bridge")
IDLE_S = 300.0
LAMBDA_FILES = 1024
SPARES = 1
IDLE_POLL_S = 0.2  # how often an idle environment looks whether it was asked to stop
_ctx = multiprocessing.get_context("spawn")


class InvocationFailed(Exception):
    """The handler raised (its text), or its environment died."""


def _serve(conn: multiprocessing.connection.Connection, function: str, module: str) -> None:
    """The environment process: load the function once, then run one invocation at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bridge decides when to stop
    # Lambda's quota for an execution environment: 1,024 file descriptors.
    resource.setrlimit(resource.RLIMIT_NOFILE, (LAMBDA_FILES, LAMBDA_FILES))
    from ai_rate_limiter.config import Settings
    from ai_rate_limiter.services.processing import SHUTTING_DOWN

    from local.bridge import LambdaContext
    from local.functions import load

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s {function} %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):  # their debug lines carry headers
        logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: SHUTTING_DOWN.set())
    handler = load(function, module).handler
    conn.send(("ready", os.getpid()))
    while True:
        try:
            while not conn.poll(IDLE_POLL_S):  # an idle environment stops on SIGTERM too
                if SHUTTING_DOWN.is_set():
                    return
            event, deadline, request_id = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = handler(event, LambdaContext(deadline, function, request_id))
            reply: tuple[str, Any] = ("ok", result)
        except Exception as exc:
            reply = ("error", repr(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        if SHUTTING_DOWN.is_set():
            return


class Environment:
    def __init__(self, function: str, module: str) -> None:
        self.conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_serve, args=(child, function, module), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.used = time.monotonic()
        self._stopping = threading.Lock()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            raise InvocationFailed("the execution environment did not start")
        try:
            self.conn.recv()
        except EOFError:
            raise InvocationFailed("the execution environment died while starting") from None
        self.ready = True

    def invoke(
        self, event: dict[str, Any], deadline: float, request_id: str, pump: Callable[[], None]
    ) -> Any:
        """Run the handler; `pump` is called about every 0.2 s while it runs."""
        self.wait_ready()
        self.conn.send((event, deadline, request_id))
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise InvocationFailed(f"the execution environment died (exit {self.proc.exitcode})")
            pump()
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise InvocationFailed("the execution environment died") from None
        self.used = time.monotonic()
        if status != "ok":
            raise InvocationFailed(value)
        return value

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM: the invocation hands back what it has not sent and waits for its calls.
        Once, whoever asks first: the bridge closing and an invocation handing its environment
        back can stop it at the same moment, and a pipe closed twice at once may close another
        file that took its descriptor."""
        with self._stopping:
            if self.conn.closed:
                return
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self.conn.close()


class Environments:
    """The warm pool: `take` an idle environment (or a new one), `give_back` when done."""

    def __init__(self, function: str = "worker", module: str = "worker", spares: int = SPARES) -> None:
        self.function, self.module, self.spares = function, module, spares
        self.idle: list[Environment] = []
        self.busy: set[Environment] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.top_up()

    def top_up(self) -> None:
        with self.lock:
            while not self.closed and len(self.idle) < self.spares:
                self.idle.append(Environment(self.function, self.module))

    def take(self) -> Environment:
        with self.lock:
            if self.closed:
                raise InvocationFailed("the bridge is stopping")
            while self.idle and not self.idle[-1].alive:
                self.idle.pop()
            env = self.idle.pop() if self.idle else Environment(self.function, self.module)
            self.busy.add(env)
        self.top_up()
        return env

    def give_back(self, env: Environment) -> None:
        with self.lock:
            self.busy.discard(env)
            if env.alive and not self.closed:
                self.idle.append(env)
                return
        env.stop(1.0)

    def reap(self) -> None:
        """End environments idle for IDLE_S, keeping the spares."""
        now = time.monotonic()
        with self.lock:
            keep = sorted(self.idle, key=lambda e: e.used, reverse=True)
            old = [e for e in keep[self.spares :] if now - e.used > IDLE_S]
            self.idle = [e for e in self.idle if e not in old]
        for env in old:
            env.stop(1.0)

    def close(self, timeout_s: float = 8.0) -> None:
        with self.lock:
            self.closed = True
            envs, self.idle = [*self.idle, *self.busy], []
        for env in envs:
            if env.proc.is_alive():
                env.proc.terminate()
        end = time.monotonic() + timeout_s
        for env in envs:
            env.stop(max(end - time.monotonic(), 0.1))
