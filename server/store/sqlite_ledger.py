"""Each user's count of unfinished requests, written once per transaction.

The per-user pending budget (docs/operations.md, "Limits") is a counter in
``user_budgets`` that every add and every finish changes. Written with a
statement each, that is two more statements a request, with a lookup of the
session's user in each: about a tenth of the writer process's time at
100 sessions x 1 (docs/performance.md). The writer runs a batch of writes as
one transaction, so the ledger keeps the changes of the current transaction
in memory, per user, and :meth:`PendingLedger.flush` writes them just before
the commit: one statement per user per transaction. A check against the
budget adds the transaction's changes to the stored count, which the add
reads along with its session's epoch. While the transaction is open no other
process writes (``BEGIN IMMEDIATE`` holds SQLite's write lock; another
worker's writer waits), so the stored count is the one at its start.

A write changes the ledger only after its statements succeeded, so a write
that fails (and is rolled back to its savepoint) leaves it as it was; a
transaction that is rolled back as a whole starts again with a fresh ledger
(:meth:`PendingLedger.begin`).
"""

from __future__ import annotations

import sqlite3

from .budgets import Budget, BudgetExceeded

__all__ = ["LEDGER", "PendingLedger"]


class PendingLedger:
    def __init__(self) -> None:
        self._delta: dict[str, int] = {}  # this transaction's changes

    def begin(self) -> None:
        """A transaction starts: nothing read, nothing changed."""
        self._delta.clear()

    def check(self, username: str, count: int, limit: int, *, stored: int) -> None:
        """Raise BudgetExceeded unless ``count`` more unfinished requests keep
        ``username`` within ``limit``; ``stored`` is the user's count as read in
        this transaction (the caller reads it along with the session)."""
        if count > limit:
            raise BudgetExceeded(Budget.PENDING, limit)
        if max(0, stored + self._delta.get(username, 0)) + count > limit:
            raise BudgetExceeded(Budget.PENDING, limit)

    def change(self, username: str, delta: int) -> None:
        """``username`` has ``delta`` more (or fewer) unfinished requests."""
        if delta:
            self._delta[username] = self._delta.get(username, 0) + delta

    def forget(self, username_lower: str) -> None:
        """The user is deleted in this transaction: nothing of theirs to write."""
        for name in [u for u in self._delta if u.lower() == username_lower]:
            del self._delta[name]

    def flush(self, c: sqlite3.Connection) -> None:
        """Write this transaction's changes (call just before the commit)."""
        changes = [(name, delta) for name, delta in self._delta.items() if delta]
        self.begin()
        if changes:
            c.executemany(
                "INSERT INTO user_budgets (username, pending) VALUES (?1, max(0, ?2))"
                " ON CONFLICT (username) DO UPDATE SET pending = max(0, pending + ?2)",
                changes,
            )


#: The writer process's ledger (it runs one transaction at a time).
LEDGER = PendingLedger()
