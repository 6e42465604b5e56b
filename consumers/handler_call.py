"""How the consumer calls a handler: in the consumer's task, started eagerly, under
a deadline. A handler that returns without waiting (``echo``, ``kv.get``)
costs no task and no timer; one that waits goes on in the same task.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Coroutine, Generator
from typing import Any

from consumers.context import Context
from consumers.registry import Operation


async def call_handler(
    op: Operation,
    args: dict[str, Any],
    ctx: Context,
    deadline: float,
    loop: asyncio.AbstractEventLoop,
) -> Any:
    """Run the handler in this task and return its value. An async handler
    is started eagerly: if it returns without waiting, that is all (no
    task, no timer); if it waits, it goes on under its deadline."""
    if not op.is_async:
        call = functools.partial(op.func, args, ctx)
        return await _with_deadline(loop.run_in_executor(None, call), deadline)
    coro = op.func(args, ctx)
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        return done.value
    return await _with_deadline(_resume(coro, waiting_on), deadline)


class Expired(Exception):
    """The handler ran past its time limit (distinct from a TimeoutError the
    handler itself raised)."""


async def _with_deadline(awaitable: Any, deadline: float) -> Any:
    try:
        async with asyncio.timeout_at(deadline) as cm:
            return await awaitable
    except TimeoutError:
        if cm.expired():
            raise Expired() from None
        raise


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Go on running a coroutine that was started by hand and is waiting on
    ``waiting_on``: what ``await coro`` would have done from the start."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation or a deadline: into the handler
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                return done.value


def describe(exc: BaseException) -> str:
    """A handler's exception as its ``handler_error`` message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
