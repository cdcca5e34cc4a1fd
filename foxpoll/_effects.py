"""The client's sans-io effects, and the drivers that perform them.

The HTTP retry loop, the poll loop and the request budget's use are flows (generators)
that yield these effects. Each is an :class:`foxpoll._io.Op` typed by what it resumes
with, so ``response = yield from Send(...)`` gives mypy the type:

==============  ============================================================================
``Send``        the :class:`httpx.Response`, or the :class:`httpx.TransportError` raised
``Sleep``       None, once the time has passed
``Notify``      None, once the hook has run (awaited, on asyncio, if it returns an awaitable)
``Start``       None; the sub-flow runs concurrently (on asyncio) or at the next ``WaitAny``
``WaitAny``     a list of ``(key, result or exception)`` of started sub-flows that finished
``Emit``        None, once the driver has handed the value to its consumer
``Permit``      0.0 once a permit of the budget is taken, else the seconds to wait; or the
                :class:`~foxpoll.errors.StoreError` the budget raised
``Feedback``    None, once the budget has been told how a request was answered; or the
                :class:`~foxpoll.errors.StoreError` the budget raised
``Parse``       what reading a large body returned, or the validation error it raised
==============  ============================================================================

The flows hold every decision; these drivers are the only code that differs between sync
and async. They are not :func:`foxpoll._io.run`: they queue requests at the client's gate,
run sub-flows concurrently and stream what a flow emits. An exception raised while
performing an effect ends the run (a transport error is ``Send``'s result, not raised,
and a budget's error the result of ``Permit`` and ``Feedback``: the flow decides).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol, TypeVar

import attrs
import httpx

from ._clock import Clock
from ._gate import AsyncGate, Gate
from ._io import Flow, Op, call_blocking
from ._senders import AsyncSender, Sender
from .errors import APIResponseValidationError, StoreError

__all__ = [
    "Budget",
    "Emit",
    "Feedback",
    "Flow",
    "Notify",
    "Parse",
    "Permit",
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


class Budget(Protocol):
    """What the drivers need of a request budget (:class:`foxpoll.ratelimit.BaseRateLimit`):
    a permit per request, in a lane (lower goes first), and how each was answered; each
    call within ``timeout`` seconds when one is given."""

    def acquire(self, priority: Any, /, *, timeout: float | None = None) -> float: ...

    async def aacquire(self, priority: Any, /, *, timeout: float | None = None) -> float: ...

    def succeeded(self) -> None: ...

    def throttled(self, retry_after: float | None, /, *,
                  timeout: float | None = None) -> None: ...

    async def athrottled(self, retry_after: float | None, /, *,
                         timeout: float | None = None) -> None: ...


@attrs.frozen
class Send(Op[httpx.Response | httpx.TransportError]):
    """Send this request; resume with the response or the transport error. ``priority``
    orders it among the requests queued for the client's in-flight slots (lower first);
    ``timeout`` bounds the whole exchange and ``max_bytes`` its decoded body."""

    request: httpx.Request
    priority: int
    timeout: float
    max_bytes: int


@attrs.frozen
class Sleep(Op[None]):
    """Wait this many seconds; resume with None."""

    seconds: float


@attrs.frozen
class Notify(Op[None]):
    """Call a user hook with these arguments; resume with None once it has run."""

    hook: Callable[..., Any]
    args: tuple[Any, ...]


@attrs.frozen
class Start(Op[None]):
    """Begin running a sub-flow, known by ``key``."""

    key: str
    flow: Flow[Any] = attrs.field(repr=False)


#: What ``WaitAny`` resumes with: each finished sub-flow's key, and its result or the
#: exception that ended it.
Finished = list[tuple[str, object]]


@attrs.frozen
class WaitAny(Op[Finished]):
    """Resume when a started sub-flow finishes, or after ``timeout`` seconds."""

    timeout: float | None


@attrs.frozen
class Emit(Op[None]):
    """Hand ``value`` to the consumer of a streaming flow."""

    value: Any = attrs.field(repr=False)


@attrs.frozen
class Permit(Op["float | StoreError"]):
    """Take a permit from ``limit`` in lane ``priority``, within ``timeout`` seconds (what
    is left of the call's deadline; None: the budget's own bound); resume with the
    seconds to wait (0.0: taken), or the error the budget raised."""

    limit: Budget = attrs.field(repr=False)
    priority: int
    timeout: float | None = None


@attrs.frozen
class Feedback(Op["StoreError | None"]):
    """Tell ``limit`` how a request was answered: a 429 (with its ``Retry-After``), or
    not; within ``timeout`` seconds, as for :class:`Permit`. Resume with None, or the
    error the budget raised."""

    limit: Budget = attrs.field(repr=False)
    throttled: bool
    retry_after: float | None = None
    timeout: float | None = None


@attrs.frozen
class Parse(Op[T | APIResponseValidationError]):
    """Read a response body too large to read inline: resume with ``read(response)``, or
    the :class:`~foxpoll.errors.APIResponseValidationError` it raised. The async drivers
    read it in a worker thread, so that the event loop keeps running meanwhile, one at a
    time per client (its gate's ``reads``): reads at once would share the GIL with the
    loop, and starve it."""

    read: Callable[[httpx.Response], T]
    response: httpx.Response = attrs.field(repr=False)

    def __call__(self) -> T | APIResponseValidationError:
        """Read the body here, on this thread."""
        try:
            return self.read(self.response)
        except APIResponseValidationError as exc:
            return exc


class _SyncEffects:
    def __init__(self, http: Sender, clock: Clock, gate: Gate | None) -> None:
        self.http, self.clock, self.gate = http, clock, gate
        self.started: deque[tuple[str, Flow[Any]]] = deque()

    def _send(self, send: Send) -> httpx.Response | httpx.TransportError:
        try:
            return self.http.send(send.request, send.timeout, send.max_bytes)
        except httpx.TransportError as exc:
            return exc

    def perform(self, effect: Op[Any]) -> Any:
        if isinstance(effect, Send):
            if self.gate is None:
                return self._send(effect)
            self.gate.acquire(effect.priority)
            try:
                return self._send(effect)
            finally:
                self.gate.release()
        if isinstance(effect, Permit):
            try:
                return effect.limit.acquire(effect.priority, timeout=effect.timeout)
            except StoreError as exc:
                return exc
        if isinstance(effect, Feedback):
            try:
                if effect.throttled:
                    effect.limit.throttled(effect.retry_after, timeout=effect.timeout)
                else:
                    effect.limit.succeeded()
            except StoreError as exc:
                return exc
            return None
        if isinstance(effect, Parse):
            return effect()
        if isinstance(effect, Sleep):
            self.clock.sleep(effect.seconds)
        elif isinstance(effect, Notify):
            call_blocking(effect.hook, effect.args, "use it with AsyncFoxReload")
        elif isinstance(effect, Start):
            self.started.append((effect.key, effect.flow))
        elif isinstance(effect, WaitAny):
            return self._wait_any(effect.timeout)
        else:
            raise TypeError(f"the client's driver does not perform {type(effect).__name__}")
        return None

    def _wait_any(self, timeout: float | None) -> Finished:
        if not self.started:
            if timeout:
                self.clock.sleep(timeout)
            return []
        key, flow = self.started.popleft()  # one at a time: blocking I/O is sequential
        try:
            return [(key, drive(flow, self.http, self.clock, gate=self.gate))]
        except Exception as exc:  # the sub-flow's failure is its result
            return [(key, exc)]


def drive_stream(flow: Flow[T], http: Sender, clock: Clock, *, gate: Gate | None = None
                 ) -> Generator[Any, None, T]:
    """Run ``flow`` with blocking I/O, yielding what it emits and returning its result.
    With a ``gate``, each request first takes one of its in-flight slots."""
    effects = _SyncEffects(http, clock, gate)
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


def drive(flow: Flow[T], http: Sender, clock: Clock, *, gate: Gate | None = None) -> T:
    """Run ``flow`` to completion with blocking I/O and return its result."""
    stream = drive_stream(flow, http, clock, gate=gate)
    try:
        next(stream)
    except StopIteration as stop:
        result: T = stop.value
        return result
    stream.close()
    raise TypeError("this flow emits values; run it with drive_stream")


class _AsyncEffects:
    def __init__(self, http: AsyncSender, clock: Clock, gate: AsyncGate | None) -> None:
        self.http, self.clock, self.gate = http, clock, gate
        self.tasks: dict[asyncio.Future[Any], str] = {}
        # Finished tasks arrive through a done-callback: O(1) per completion, where
        # asyncio.wait() would re-register a callback on every pending task each time.
        self.done: deque[asyncio.Future[Any]] = deque()
        self.wakeup: asyncio.Future[None] | None = None

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.done.append(task)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def _send(self, send: Send) -> httpx.Response | httpx.TransportError:
        try:
            return await self.http.send(send.request, send.timeout, send.max_bytes)
        except httpx.TransportError as exc:
            return exc

    async def perform(self, effect: Op[Any]) -> Any:
        if isinstance(effect, Send):
            if self.gate is None:
                return await self._send(effect)
            await self.gate.acquire(effect.priority)
            try:
                return await self._send(effect)
            finally:
                self.gate.release()
        if isinstance(effect, Permit):
            try:
                return await effect.limit.aacquire(effect.priority, timeout=effect.timeout)
            except StoreError as exc:
                return exc
        if isinstance(effect, Feedback):
            try:
                if effect.throttled:
                    await effect.limit.athrottled(effect.retry_after, timeout=effect.timeout)
                else:
                    effect.limit.succeeded()
            except StoreError as exc:
                return exc
            return None
        if isinstance(effect, Parse):
            return await self._parse(effect)
        if isinstance(effect, Sleep):
            await self.clock.asleep(effect.seconds)
        elif isinstance(effect, Notify):
            result = effect.hook(*effect.args)
            if inspect.isawaitable(result):
                await result
        elif isinstance(effect, Start):
            task = asyncio.ensure_future(
                drive_async(effect.flow, self.http, self.clock, gate=self.gate))
            self.tasks[task] = effect.key
            task.add_done_callback(self._finished)
        elif isinstance(effect, WaitAny):
            return await self._wait_any(effect.timeout)
        else:
            raise TypeError(f"the client's driver does not perform {type(effect).__name__}")
        return None

    async def _parse(self, parse: Parse[Any]) -> Any:
        reads = None if self.gate is None else self.gate.reads
        if reads is None:
            return await asyncio.to_thread(parse)
        await reads.acquire(0)
        try:
            return await asyncio.to_thread(parse)
        finally:
            reads.release()

    async def _wait_any(self, timeout: float | None) -> Finished:
        if not self.tasks:
            if timeout:
                await self.clock.asleep(timeout)
            return []
        if not self.done:
            loop = asyncio.get_running_loop()
            self.wakeup = loop.create_future()
            timer = None
            if timeout is not None:
                timer = loop.call_later(timeout, _resolve, self.wakeup)
            try:
                await self.wakeup
            finally:
                self.wakeup = None
                if timer is not None:
                    timer.cancel()
        finished: Finished = []
        while self.done:
            task = self.done.popleft()
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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def drive_async(flow: Flow[T], http: AsyncSender, clock: Clock, *,
                      gate: AsyncGate | None = None) -> T:
    """Run ``flow`` to completion on the event loop and return its result."""
    effects = _AsyncEffects(http, clock, gate)
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
    flow: Flow[Any], http: AsyncSender, clock: Clock, *, gate: AsyncGate | None = None
) -> AsyncIterator[Any]:
    """Run ``flow`` on the event loop, yielding what it emits."""
    effects = _AsyncEffects(http, clock, gate)
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
