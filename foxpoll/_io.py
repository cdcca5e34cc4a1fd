"""The one effect vocabulary of foxpoll's stores, delivery, queues and event streams.

Their logic is written once, as a generator (a *flow*) that yields effects and is resumed
with each effect's result; a blocking and an asyncio driver perform the effects. Only the
leaves differ between sync and async: what a backend's ``perform`` does with an
:class:`Op`.

=============  ===============================================================================
``Op[T]``      an operation on the backend the flow runs against (a SQL statement, a Redis
               script, a DynamoDB request): the driver's ``perform(op)`` returns ``T``
``Call[T]``    call a function of the caller's (``deliver``, a handler, a store primitive):
               its result, awaited on asyncio when it is awaitable
``Pause``      wait on the flow's clock
=============  ===============================================================================

Every effect is generic in its result, and ``result = yield from effect`` gives mypy that
type, so a flow is checked at every seam. An exception the driver raises while performing
an effect is thrown into the flow at the ``yield``, so a flow handles it where it asked.

(The HTTP client, the poll loop and the request budget are sans-io flows of their own, in
:mod:`foxpoll._effects`: they are protocol logic, tested step by step on a fake clock.)
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar, cast, overload

import attrs

from ._clock import Clock

__all__ = ["Call", "Flow", "Op", "Pause", "arun", "call", "call_blocking", "is_async",
           "pause", "run"]

T = TypeVar("T")


def is_async(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine: an async function, or an object whose
    ``__call__`` is one (what a blocking caller must refuse before it starts)."""
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(type(fn).__call__))


class Op(Generic[T]):
    """An operation on a backend, resumed with its ``T``: ``rows = yield from Query(...)``.

    A backend subclasses it (as a frozen attrs class) for each kind of request it sends,
    and its drivers' ``perform`` turns one into the driver's call.
    """

    __slots__ = ()

    def __iter__(self) -> Generator[Op[T], Any, T]:
        return cast(T, (yield self))


@attrs.frozen
class Call(Op[T]):
    """Call ``fn(*args)``; resume with its result, awaited when it is awaitable (on
    asyncio; the blocking driver refuses an awaitable, naming the async twin to use)."""

    fn: Callable[..., T | Awaitable[T]]
    args: tuple[Any, ...] = ()


@attrs.frozen
class Pause(Op[None]):
    """Wait ``seconds`` on the flow's clock."""

    seconds: float


Flow = Generator[Op[Any], Any, T]


@overload
def call(fn: Callable[..., Awaitable[T]], *args: Any) -> Flow[T]: ...


@overload
def call(fn: Callable[..., T], *args: Any) -> Flow[T]: ...


def call(fn: Callable[..., Any], *args: Any) -> Flow[Any]:
    """``result = yield from call(fn, *args)``: a :class:`Call`, typed by ``fn`` (an
    async ``fn`` gives what it returns once awaited)."""
    return (yield from Call(fn, args))


def pause(seconds: float) -> Flow[None]:
    """``yield from pause(seconds)``: a :class:`Pause`."""
    yield from Pause(seconds)


def call_blocking(fn: Callable[..., Any], args: tuple[Any, ...], remedy: str) -> Any:
    """``fn(*args)`` from blocking code, which cannot await: an awaitable result is
    refused with a :class:`TypeError` saying ``remedy`` (a coroutine is closed first, so
    that it is not reported as never awaited)."""
    result = fn(*args)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{fn!r} is async; {remedy}")
    return result


def run(flow: Flow[T], perform: Callable[[Op[Any]], Any] | None = None, *,
        clock: Clock | None = None, async_twin: str = "the async API") -> T:
    """Run ``flow`` with blocking I/O and return its result.

    ``perform(op)`` performs the backend's :class:`Op` s; :class:`Call` and :class:`Pause`
    are performed here (``Pause`` needs ``clock``). An exception raised while performing
    an effect is thrown into the flow.
    """
    try:
        effect = next(flow)
        while True:
            try:
                if isinstance(effect, Call):
                    result = call_blocking(effect.fn, effect.args, f"use {async_twin}")
                elif isinstance(effect, Pause):
                    if clock is None:
                        raise TypeError("this flow pauses: run it with a clock")
                    clock.sleep(effect.seconds)
                    result = None
                elif perform is None:
                    raise TypeError(f"no driver performs {type(effect).__name__}")
                else:
                    result = perform(effect)
            except Exception as exc:
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        return cast(T, stop.value)
    finally:
        flow.close()


async def arun(flow: Flow[T], perform: Callable[[Op[Any]], Awaitable[Any]] | None = None, *,
               clock: Clock | None = None) -> T:
    """:func:`run` on asyncio: ``perform(op)`` is awaited, and so is a :class:`Call`'s
    result when it is awaitable."""
    try:
        effect = next(flow)
        while True:
            try:
                if isinstance(effect, Call):
                    result = effect.fn(*effect.args)
                    if inspect.isawaitable(result):
                        result = await result
                elif isinstance(effect, Pause):
                    if clock is None:
                        raise TypeError("this flow pauses: run it with a clock")
                    await clock.asleep(effect.seconds)
                    result = None
                elif perform is None:
                    raise TypeError(f"no driver performs {type(effect).__name__}")
                else:
                    result = await perform(effect)
            except Exception as exc:
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        return cast(T, stop.value)
    finally:
        flow.close()
