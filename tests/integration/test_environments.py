"""The bridge's execution environments (local/environments.py)."""

from __future__ import annotations

import threading

from local.environments import Environment


def test_an_environment_stopped_from_two_threads_at_once_is_stopped_once() -> None:
    """The bridge closing and an invocation handing its environment back may stop it together;
    its pipe is closed once (twice at once fails with EBADF, or closes a file that took over
    the descriptor)."""
    for _ in range(3):
        env = Environment("worker", "worker")
        env.wait_ready()
        start = threading.Barrier(3)
        errors: list[BaseException] = []

        def stop(
            env: Environment = env, start: threading.Barrier = start, errors: list[BaseException] = errors
        ) -> None:
            start.wait()
            try:
                env.stop(2.0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stop) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert env.conn.closed and not env.alive
