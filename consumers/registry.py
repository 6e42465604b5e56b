"""The operation registry and the ``@op`` decorator.

An operation is an async function ``async def f(args, ctx) -> JSON`` or a sync
one ``def f(args, ctx) -> JSON`` (run in a thread, so it cannot block the event
loop). CPU-heavy work should go to ``await ctx.run_cpu(fn, ...)``, which uses a
process pool. ``validate(args, limits)`` runs before a request is accepted and
raises :class:`BadArgs`, so a request with bad args never gets a seq.

Applications add operations in their own module::

    from consumers import op, OpError

    @op("greet", timeout=5)
    async def greet(args, ctx):
        return {"hello": ctx.user}

and name the module in ``SESSIONQ_OPS=myapp.ops``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class OpError(Exception):
    """Raised by a handler to end its request with its own error code."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class BadArgs(OpError):
    """The args do not fit the operation; the submit is refused (bad_request)."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_request", message)


Handler = Callable[[dict[str, Any], Any], Any]
Validator = Callable[[dict[str, Any], Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    func: Handler
    is_async: bool
    timeout: float | None  # None: the server's default (SESSIONQ_OP_TIMEOUT)
    validate: Validator | None
    cancellable: bool  # async handlers can be interrupted by cancel
    retries: int = 0  # extra tries after a failure (exception, timeout, retryable OpError)
    retry_backoff: float = 0.1  # seconds before the first retry; doubles each time


class Registry:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def op(
        self,
        name: str,
        *,
        timeout: float | None = None,
        validate: Validator | None = None,
        retries: int = 0,
        retry_backoff: float = 0.1,
    ) -> Callable[[Handler], Handler]:
        """Register ``func`` as operation ``name``.

        ``timeout``: seconds before the request ends with ``timeout`` (default:
        SESSIONQ_OP_TIMEOUT). ``retries``: how many more times to run it after
        an exception, a timeout or ``OpError(..., retryable=True)``, waiting
        ``retry_backoff`` seconds, doubled each time; the last failure is the
        request's error and stays in the log as failed (``sessionq
        dead-letters``). Retried handlers must be idempotent.
        """
        if retries < 0 or retry_backoff < 0:
            raise ValueError("retries and retry_backoff must not be negative")

        def register(func: Handler) -> Handler:
            if name in self._ops:
                raise ValueError(f"operation {name!r} is already registered")
            is_async = inspect.iscoroutinefunction(func)
            self._ops[name] = Operation(
                name, func, is_async, timeout, validate, is_async, retries, retry_backoff
            )
            return func

        return register

    def get(self, name: str) -> Operation | None:
        return self._ops.get(name)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def load(self, modules: Iterable[str]) -> None:
        """Import application modules; their ``@op`` decorators register here."""
        for path in modules:
            try:
                importlib.import_module(path)
            except ImportError as exc:
                raise ValueError(f"SESSIONQ_OPS: cannot import {path!r}: {exc}") from exc


registry = Registry()
op = registry.op
