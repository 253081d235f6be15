"""Steady traffic through a balancer while a test changes its backends: one client thread
opening short connections to EchoBackends one after another, counting who served each and
every connection that failed (refused, reset, wrong echo)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from tests.support.echo_backend import echo_through


class Traffic:
    """Connections to ``host:port`` until :meth:`stop`; ``served`` lists the backend names."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.served: list[str] = []
        self.failures: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            payload = b"steady %d\n" % n
            n += 1
            try:
                name, echoed = echo_through(self.host, self.port, payload, timeout=10)
                problem = "" if echoed == payload else f"echo {echoed!r} != {payload!r}"
            except OSError as err:
                name, problem = "", f"{type(err).__name__}: {err}"
            with self._cond:
                if problem or not name:
                    self.failures.append(problem or "no backend name")
                else:
                    self.served.append(name)
                self._cond.notify_all()

    def wait_streak(self, names: set[str], count: int = 20, timeout: float = 30.0) -> None:
        """Wait until the last ``count`` connections were all served by ``names``."""

        def done() -> bool:
            tail = self.served[-count:]
            return len(tail) == count and set(tail) <= names

        self._wait(done, timeout, f"{count} connections in a row served by {sorted(names)}")

    def wait_served(self, name: str, timeout: float = 30.0) -> None:
        """Wait until ``name`` has served at least one connection."""
        self._wait(lambda: name in self.served, timeout, f"a connection served by {name}")

    def wait_more(self, mark: int, count: int = 5, timeout: float = 30.0) -> list[str]:
        """Wait until ``count`` more connections were served after ``mark``; who served them."""
        self._wait(lambda: len(self.served) >= mark + count, timeout, f"{count} more served")
        return self.since(mark)

    def mark(self) -> int:
        with self._cond:
            return len(self.served)

    def since(self, mark: int) -> list[str]:
        with self._cond:
            return self.served[mark:]

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"not reached within {timeout}s: {what}; last served "
                    f"{self.served[-10:]}, failures {self.failures[-5:]}"
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@contextlib.contextmanager
def steady_traffic(host: str, port: int) -> Iterator[Traffic]:
    traffic = Traffic(host, port).start()
    try:
        yield traffic
    finally:
        traffic.stop()
