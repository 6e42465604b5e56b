"""A backend's own errors become StoreError, in one decorator.

Every store method of a driver-backed store (PostgreSQL, MongoDB) is wrapped
by ``translating(errors, name)``: the driver's and the OS's errors of the
call become ``StoreError("<name>: ...")`` (the cause kept as ``__cause__``),
and a method of a :class:`.base.Store` counts the failure first
(``Store._failed``: ``sessionq_store_errors_total``). Errors of what was asked
(Fenced, UserExists, BudgetExceeded) pass through untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from .base import Store, StoreError

__all__ = ["translating"]

P = ParamSpec("P")
R = TypeVar("R")


def translating(
    errors: tuple[type[BaseException], ...], name: str
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """The decorator for one backend: ``errors`` are its driver's failures."""

    def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except errors as e:
                if args and isinstance(args[0], Store):
                    args[0]._failed()
                raise StoreError(f"{name}: {e}") from e

        return wrapper

    return translated
