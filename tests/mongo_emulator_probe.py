"""Where the MongoDB store's time goes on the wire emulator, counted, not timed.

Run by tests/test_mongodb_server.py with the emulator's own Python
(.venv-mongo, which has mongoeco and pymongo) and the repository on
PYTHONPATH. It serves the emulator in this process, exactly as
scripts/mongo-emulator does, and drives the project's MongoStore against it
the way one server does for SESSIONS sessions of BATCH requests each: every
session's batch is added, then its requests are started and finished. For
each store call it counts two things:

* ``commands``: the commands the store sent (PyMongo's command monitoring),
  which is what the store controls;
* ``scanned``: the stored documents the emulator compared the written one
  with to enforce unique indexes (calls of mongoeco's MemoryEngine
  ``_unique_index_conflict``: mongoeco 4.11 checks a unique index on more than
  one field by scanning the whole collection, under the collection's lock).

It prints one JSON object: {"indexes": [...], "add": [...], "finish": [...]},
each list entry {"stored": documents in the collection before the call,
"commands": N, "scanned": N}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from mongoeco.engines import MemoryEngine
from mongoeco.wire.proxy import AsyncMongoEcoProxyServer
from pymongo import monitoring

from server.store.base import NewRequest
from server.store.mongodb import MongoStore

SESSIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 20
FAR = 1e12

scanned = 0
commands = 0


class Commands(monitoring.CommandListener):
    def started(self, event: monitoring.CommandStartedEvent) -> None:
        global commands
        commands += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def count_scans() -> None:
    original = MemoryEngine._unique_index_conflict

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        global scanned
        scanned += 1
        return original(self, *args, **kwargs)

    MemoryEngine._unique_index_conflict = counting  # type: ignore[method-assign]


async def main() -> None:
    count_scans()
    monitoring.register(Commands())
    proxy = AsyncMongoEcoProxyServer(
        host="127.0.0.1", port=0, engine=MemoryEngine(),
        mongodb_dialect="8.0", pymongo_profile="4.19",
    )  # fmt: skip
    address = await proxy.start()
    store = MongoStore(address.uri, database="probe")
    await store.open()
    out: dict[str, Any] = {"add": [], "finish": []}
    try:
        info = await store._requests.index_information()
        out["indexes"] = [
            {"keys": [k for k, _ in spec["key"]], "unique": bool(spec.get("unique"))}
            for spec in info.values()
        ]
        stored = 0

        async def measured(kind: str, call: Any) -> None:
            before = (commands, scanned)
            await call
            out[kind].append(
                {"stored": stored, "commands": commands - before[0], "scanned": scanned - before[1]}
            )

        for k in range(SESSIONS):
            sid = f"s{k}"
            await store.create_session(sid, "alice", "A", lease_until=FAR)
            batch = [NewRequest(i, f"c{i}", "echo", "{}") for i in range(1, BATCH + 1)]
            await measured("add", store.add_requests(sid, 1, batch, time.time()))
            stored += BATCH
        for k in range(SESSIONS):
            sid = f"s{k}"
            await store.start_request(sid, 1, 1)
            await measured(
                "finish",
                store.finish_request(sid, 1, 1, '{"type":"result"}', False, time.time(), 2),
            )
    finally:
        await store.close()
        await proxy.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
