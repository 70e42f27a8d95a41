"""Virtual time for unit tests of the stream machinery: an event loop whose clock jumps.

:class:`VirtualClockLoop` is asyncio's selector loop with its own clock: whenever nothing
is ready to run, the clock jumps to the next timer, so a test of a 30 s grace or of a
paced drain takes no wall time and its timing is exact whatever else the machine does.
It suits code that waits only on timers and futures (fakes instead of sockets); it reads
two attributes of asyncio's loop (``_ready``, ``_scheduled``), as asyncio's own test
utilities do. :func:`virtual_time` runs an ``async def`` test on one, in a thread of its
own, so the test's loop is not the one whose clock moves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: A test on virtual time that has not finished after this much wall time has hung.
WALL_TIMEOUT_S = 60.0


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and jumps to the next timer when idle."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        ready: Any = getattr(self, "_ready")  # asyncio's run queue
        scheduled: Any = getattr(self, "_scheduled")  # its timer heap
        if not ready and scheduled:
            self._virtual_now = max(self._virtual_now, scheduled[0].when())
        super()._run_once()  # type: ignore[misc]  # asyncio's loop step, not in typeshed


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a :class:`VirtualClockLoop` in a thread of its own."""
    def target() -> T:
        loop = VirtualClockLoop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(target).result(timeout=WALL_TIMEOUT_S)


def virtual_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on virtual time (see the module docstring)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        run_virtual(test(*args, **kwargs))
    return run
