"""Per-user budgets: which ones the store enforces, the refusal, and what a
user uses (store/base.py says where each is checked)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Budget(StrEnum):
    """The per-user budgets the store enforces (metric label values too)."""

    SESSIONS = "sessions"  # open or draining sessions (SESSIONQ_MAX_SESSIONS_PER_USER)
    CONNECTIONS = "connections"  # of those, the ones a connection carries
    PENDING = "pending"  # unfinished requests over all sessions
    KV_BYTES = "kv_bytes"  # bytes of keys and values in the key-value data


class BudgetExceeded(Exception):
    """A per-user budget refused the write; nothing of it was stored.

    Not a StoreError: the store works, the user is at a limit."""

    def __init__(self, budget: Budget | str, limit: int) -> None:
        super().__init__(str(budget), limit)  # args: what pickling rebuilds it from
        self.budget = Budget(budget)
        self.limit = limit

    def __str__(self) -> str:
        return f"the user's {self.budget} budget ({self.limit}) is used up"


@dataclass(frozen=True, slots=True)
class UserUsage:
    """What one user uses of each budget (``Store.usage``)."""

    sessions: int  # sessions some process owns with a live lease
    connections: int  # of those, the ones a connection carries
    pending: int  # unfinished requests over all the user's sessions
    kv_bytes: int  # UTF-8 bytes of the user's keys plus their values


def kv_size(key: str, value: str) -> int:
    """What one key-value entry counts against ``kv_bytes``."""
    return len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
