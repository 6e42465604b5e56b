"""Operations that only the tests load (via SESSIONQ_OPS=tests.ops_for_tests)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from consumers import Context, OpError, op


@op("test.fail")
async def fail(args: dict[str, Any], ctx: Context) -> Any:
    if args.get("own_code"):
        raise OpError("quota_exceeded", "the handler's own error")
    raise RuntimeError("boom")


@op("test.unserializable")
async def unserializable(args: dict[str, Any], ctx: Context) -> Any:
    return {"value": object()}


@op("test.slow", timeout=0.2)
async def slow(args: dict[str, Any], ctx: Context) -> Any:
    await asyncio.sleep(args.get("seconds", 5))
    return "finished"


@op("test.blocking")
def blocking(args: dict[str, Any], ctx: Context) -> Any:
    """A sync handler: runs in a thread and cannot be interrupted."""
    time.sleep(args.get("seconds", 0.2))
    ctx.progress({"from": "thread"})
    return {"attempt": ctx.attempt}


@op("test.attempt")
async def attempt(args: dict[str, Any], ctx: Context) -> Any:
    """Sleeps, then says which run of the request this was."""
    await asyncio.sleep(args.get("seconds", 0))
    return {"attempt": ctx.attempt}


@op("test.die")
async def die(args: dict[str, Any], ctx: Context) -> Any:
    """Kills its own server process: a request that crashes every run."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(60)


@op("test.flaky", retries=3, retry_backoff=0.01)
async def flaky(args: dict[str, Any], ctx: Context) -> Any:
    """Fails on its first ``fail`` tries, then succeeds."""
    if ctx.retry < args.get("fail", 0):
        raise OpError("busy", f"try {ctx.retry} failed", retryable=True)
    return {"tries": ctx.retry + 1}


@op("test.doomed", retries=2, retry_backoff=0.01)
async def doomed(args: dict[str, Any], ctx: Context) -> Any:
    raise ConnectionError(f"downstream refused try {ctx.retry + 1}")


@op("test.progress")
async def progress_sizes(args: dict[str, Any], ctx: Context) -> Any:
    """Sends one progress frame of each size in ``sizes`` (bytes of padding)."""
    for size in args.get("sizes", []):
        ctx.progress({"pad": "x" * size})
    return {"sent": len(args.get("sizes", []))}
