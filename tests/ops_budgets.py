"""An operation the budget tests load beside tests.ops_for_tests: a request
that stays unfinished until the test lets it go (an event, not a timer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from consumers import Context, op


@op("test.gate")
async def gate(args: dict[str, Any], ctx: Context) -> Any:
    """Run until the file ``args["path"]`` exists (the test creates it)."""
    path = Path(args["path"])
    # Another process creates the file: nothing announces it.
    while not path.exists():  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.01)
    return "opened"
