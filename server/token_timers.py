"""A live connection's token timers (PROTOCOL.md, "Tokens"): ``token_expiring``
``notice`` seconds before the token's ``exp``, then its expiry.

The notice is at most half the token's lifetime (``min(SESSIONQ_TOKEN_NOTICE,
SESSIONQ_TOKEN_TTL / 2)``): with a TTL at or below the notice, every fresh
token would be "expiring" at once and a client that refreshes on the notice
would refresh in a loop. A token already within its notice window gets the
notice at once. Starting the timers again (a refresh) cancels the old ones, so
each token gets its own single notice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenTimers:
    def __init__(
        self,
        notice: float,
        ttl: float,
        on_expiring: Callable[[int], None],
        on_expired: Callable[[], None],
    ) -> None:
        self.notice = min(notice, ttl / 2)
        self._on_expiring = on_expiring
        self._on_expired = on_expired
        self._handles: list[asyncio.TimerHandle] = []

    def start(self, expires_at: int) -> None:
        """Run on a token that expires at ``expires_at`` (unix seconds)."""
        self.cancel()
        loop = asyncio.get_running_loop()
        left = expires_at - time.time()
        self._handles.append(loop.call_later(max(0.0, left), self._on_expired))
        if self.notice > 0:
            at = max(0.0, left - self.notice)
            self._handles.append(loop.call_later(at, self._on_expiring, expires_at))

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
