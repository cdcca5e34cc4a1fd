"""Effects that foxpoll's sans-io flows yield, and the drivers that perform them.

A flow is a generator. It yields effects and is resumed with their results:

==============  ============================================================================
``Send``        the :class:`httpx.Response`, or the :class:`httpx.TransportError` raised
``Sleep``       None, once the time has passed
``Notify``      None, once the hook has run (awaited, on asyncio, if it returns an awaitable)
``Start``       None; the sub-flow runs concurrently (on asyncio) or at the next ``WaitAny``
``WaitAny``     a list of ``(key, result or exception)`` of started sub-flows that finished
``Emit``        None, once the driver has handed the value to its consumer
==============  ============================================================================

The flows hold every decision; these drivers are the only code that differs between sync
and async.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Hashable
from typing import Any, TypeVar

import attrs
import httpx

from ._clock import Clock

__all__ = [
    "Emit",
    "Flow",
    "Notify",
    "Send",
    "Sleep",
    "Start",
    "WaitAny",
    "drive",
    "drive_async",
    "drive_stream",
    "drive_stream_async",
]

T = TypeVar("T")


@attrs.frozen
class Send:
    """Send this request; resume with the response or the transport error."""

    request: httpx.Request


@attrs.frozen
class Sleep:
    """Wait this many seconds; resume with None."""

    seconds: float


@attrs.frozen
class Notify:
    """Call a user hook with these arguments."""

    hook: Callable[..., Any]
    args: tuple[Any, ...]


@attrs.frozen
class Start:
    """Begin running a sub-flow, known by ``key``."""

    key: Hashable
    flow: Flow[Any] = attrs.field(repr=False)


@attrs.frozen
class WaitAny:
    """Resume when a started sub-flow finishes, or after ``timeout`` seconds."""

    timeout: float | None


@attrs.frozen
class Emit:
    """Hand ``value`` to the consumer of a streaming flow."""

    value: Any = attrs.field(repr=False)


Effect = Send | Sleep | Notify | Start | WaitAny | Emit
Flow = Generator[Effect, Any, T]
Finished = list[tuple[Hashable, Any]]


class _SyncEffects:
    def __init__(self, http: httpx.Client, clock: Clock) -> None:
        self.http, self.clock = http, clock
        self.started: deque[tuple[Hashable, Flow[Any]]] = deque()

    def perform(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            try:
                return self.http.send(effect.request)
            except httpx.TransportError as exc:
                return exc
        if isinstance(effect, Sleep):
            self.clock.sleep(effect.seconds)
        elif isinstance(effect, Notify):
            result = effect.hook(*effect.args)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"hook {effect.hook!r} is async; use it with AsyncFoxReload")
        elif isinstance(effect, Start):
            self.started.append((effect.key, effect.flow))
        elif isinstance(effect, WaitAny):
            return self._wait_any(effect.timeout)
        return None

    def _wait_any(self, timeout: float | None) -> Finished:
        if not self.started:
            if timeout:
                self.clock.sleep(timeout)
            return []
        key, flow = self.started.popleft()  # one at a time: blocking I/O is sequential
        try:
            return [(key, drive(flow, self.http, self.clock))]
        except Exception as exc:  # the sub-flow's failure is its result
            return [(key, exc)]


def drive_stream(flow: Flow[T], http: httpx.Client, clock: Clock) -> Generator[Any, None, T]:
    """Run ``flow`` with blocking I/O, yielding what it emits and returning its result."""
    effects = _SyncEffects(http, clock)
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Emit):
                yield effect.value
                effect = flow.send(None)
            else:
                effect = flow.send(effects.perform(effect))
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()
        for _, started in effects.started:
            started.close()


def drive(flow: Flow[T], http: httpx.Client, clock: Clock) -> T:
    """Run ``flow`` to completion with blocking I/O and return its result."""
    stream = drive_stream(flow, http, clock)
    try:
        next(stream)
    except StopIteration as stop:
        result: T = stop.value
        return result
    stream.close()
    raise TypeError("this flow emits values; run it with drive_stream")


class _AsyncEffects:
    def __init__(self, http: httpx.AsyncClient, clock: Clock) -> None:
        self.http, self.clock = http, clock
        self.tasks: dict[asyncio.Future[Any], Hashable] = {}

    async def perform(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            try:
                return await self.http.send(effect.request)
            except httpx.TransportError as exc:
                return exc
        if isinstance(effect, Sleep):
            await self.clock.asleep(effect.seconds)
        elif isinstance(effect, Notify):
            result = effect.hook(*effect.args)
            if inspect.isawaitable(result):
                await result
        elif isinstance(effect, Start):
            task = asyncio.ensure_future(drive_async(effect.flow, self.http, self.clock))
            self.tasks[task] = effect.key
        elif isinstance(effect, WaitAny):
            return await self._wait_any(effect.timeout)
        return None

    async def _wait_any(self, timeout: float | None) -> Finished:
        if not self.tasks:
            if timeout:
                await self.clock.asleep(timeout)
            return []
        done, _ = await asyncio.wait(
            self.tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        finished: Finished = []
        for task in done:
            key = self.tasks.pop(task)
            if task.cancelled():
                raise asyncio.CancelledError
            error = task.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and friends are not a sub-flow's result
            finished.append((key, error if error is not None else task.result()))
        return finished

    def cancel_all(self) -> None:
        for task in self.tasks:
            task.cancel()


async def drive_async(flow: Flow[T], http: httpx.AsyncClient, clock: Clock) -> T:
    """Run ``flow`` to completion on the event loop and return its result."""
    effects = _AsyncEffects(http, clock)
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Emit):
                raise TypeError("this flow emits values; run it with drive_stream_async")
            effect = flow.send(await effects.perform(effect))
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        flow.close()
        effects.cancel_all()


async def drive_stream_async(
    flow: Flow[Any], http: httpx.AsyncClient, clock: Clock
) -> AsyncIterator[Any]:
    """Run ``flow`` on the event loop, yielding what it emits."""
    effects = _AsyncEffects(http, clock)
    try:
        effect = next(flow)
        while True:
            if isinstance(effect, Emit):
                yield effect.value
                effect = flow.send(None)
            else:
                effect = flow.send(await effects.perform(effect))
    except StopIteration:
        return
    finally:
        flow.close()
        effects.cancel_all()

