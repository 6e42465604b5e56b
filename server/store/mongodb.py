"""MongoDB backend, on PyMongo's async API (``AsyncMongoClient``).

For the scale-out setup (DESIGN.md): every replica shares one MongoDB. It must
not need a replica set, so it uses no multi-document transactions; each
guarantee rests on single-document atomicity and unique indexes instead:

* users: a unique index on ``username_lower`` makes names unique without
  regard to case; requests: unique (session_id, seq) and (session_id,
  client_id); kv: unique (username, key).
* ``claim_session``, ``release_session`` and the epoch bump are one
  ``find_one_and_update`` on the session document each.
* ``finish_request`` updates the request with a ``state != done`` filter, so the
  first final frame wins even between two owners: "exactly one final frame per
  seq" never depends on fencing.
* Fenced writes check the session's epoch and then write the requests: two
  documents, two round trips. An owner that stalls between them for longer
  than its lease while another takes the session over could write after the
  takeover. So ``start_request`` and ``add_requests`` check the epoch again
  after writing and raise Fenced if it moved (``add_requests`` first deletes
  what it inserted): the stale owner never acts on the write. What can remain
  is one start counted too many on a request the new owner re-runs anyway; a
  stale ``finish_request`` in that window stores the request's one genuine
  final, which is harmless by the state filter above.

Per-user budgets (store/base.py), without transactions:

* ``pending`` and ``kv_bytes`` are counters in one ``budgets`` document per
  user, taken by a conditional ``find_one_and_update`` (``{"pending": {"$lte":
  max - n}}`` with ``$inc``) before the requests are inserted, and given back
  if the insert then fails; finishing, cancelling and removing requests give
  them back too. A store made before budgets gets the counters derived once
  from its documents, by the first process that opens it.
* Live sessions cannot be counted and inserted in one document update, so
  ``create_session`` inserts first and then counts the user's live sessions
  that come before it (by creation time, then id), itself included; if that
  is over the limit it deletes itself and refuses. Of two creations that
  race, the later one sees the earlier and yields, so the count never goes
  over the limit (both may yield when they race a third: a refusal too many,
  never one too few).

PyMongo errors become StoreError (DuplicateKeyError on users: UserExists).
``serverSelectionTimeoutMS`` defaults to 3 s so ``ping`` and ``open`` fail fast
when the server is gone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from .base import (
    Fenced,
    NewRequest,
    RequestRecord,
    RequestState,
    SessionCounts,
    SessionRecord,
    Store,
    StoreError,
    User,
    UserExists,
)
from .budgets import Budget, BudgetExceeded, UserUsage, kv_size
from .mongodb_identity import MongoIdentity
from .translate import translating

Doc = dict[str, Any]

DEFAULT_DATABASE = "sessionq"
SERVER_SELECTION_TIMEOUT_MS = 3000
DONE = RequestState.DONE.value
NOT_DONE = {"$ne": DONE}
PURGE_CHUNK = 1000  # sessions checked per round trip by purge
USERS_CACHED = 100_000  # session id -> username, kept for the budget counters
DERIVED = "budgets derived"  # the meta document that says the counters exist


#: PyMongo's errors become StoreError (a method's: counted as failures).
translated = translating((PyMongoError,), "mongodb")


class MongoStore(MongoIdentity, Store):
    """The store in one MongoDB database (see the module docstring)."""

    def __init__(self, url: str, *, database: str | None = None) -> None:
        self.url = url
        self.database = database  # None: the URL's, else DEFAULT_DATABASE
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._user_of: dict[str, str] = {}  # session id -> username (never changes)

    # -- lifecycle -----------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        options: dict[str, Any] = {}
        if "serverselectiontimeoutms" not in self.url.lower():
            options["serverSelectionTimeoutMS"] = SERVER_SELECTION_TIMEOUT_MS
        try:  # a malformed URL raises ValueError or PyMongoError here, before any I/O
            client: AsyncMongoClient[Doc] = AsyncMongoClient(self.url, **options)
        except (PyMongoError, ValueError) as e:
            raise StoreError(f"mongodb: bad store URL: {e}") from e
        try:
            db = (
                client.get_database(self.database)
                if self.database
                else client.get_default_database(DEFAULT_DATABASE)
            )
            await _create_indexes(db)
            await _derive_budgets(db)
        except PyMongoError as e:
            await client.close()
            raise StoreError(f"mongodb: cannot open the store: {e}") from e
        self._client, self._db = client, db

    async def close(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            await client.close()

    @translated
    async def ping(self) -> None:
        await self._database().command("ping")

    def _database(self) -> AsyncDatabase[Doc]:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    @property
    def _users(self) -> AsyncCollection[Doc]:
        return self._database()["users"]

    @property
    def _sessions(self) -> AsyncCollection[Doc]:
        return self._database()["sessions"]

    @property
    def _requests(self) -> AsyncCollection[Doc]:
        return self._database()["requests"]

    @property
    def _kv(self) -> AsyncCollection[Doc]:
        return self._database()["kv"]

    @property
    def _budgets(self) -> AsyncCollection[Doc]:
        return self._database()["budgets"]

    def _remember(self, session_id: str, username: str) -> None:
        if len(self._user_of) >= USERS_CACHED:
            self._user_of.clear()
        self._user_of[session_id] = username

    async def _username(self, session_id: str) -> str | None:
        username = self._user_of.get(session_id)
        if username is None:
            doc = await self._sessions.find_one({"_id": session_id}, {"username": True})
            if doc is None:
                return None
            username = str(doc["username"])
            self._remember(session_id, username)
        return username

    async def _take(self, username: str, field: str, n: int, limit: int | None) -> bool:
        """Add ``n`` to the user's ``field`` counter if it stays within
        ``limit`` (None: always); one conditional update."""
        if limit is not None and n > limit:
            return False
        if limit is None or n <= 0:
            await self._budgets.update_one({"_id": username}, {"$inc": {field: n}}, upsert=True)
            return True
        for first in (True, False):  # one command, unless the user has no document yet
            doc = await self._budgets.find_one_and_update(
                {"_id": username, field: {"$lte": limit - n}},
                {"$inc": {field: n}},
                projection={"_id": True},
            )
            if doc is not None:
                return True
            if first:  # no document, or the budget used up: make sure of the first
                with contextlib.suppress(DuplicateKeyError):  # made by a racing call
                    await self._budgets.update_one(
                        {"_id": username},
                        {"$setOnInsert": {"pending": 0, "kv_bytes": 0}},
                        upsert=True,
                    )
        return False

    async def _give_back(self, session_id: str, n: int) -> None:
        if n:
            username = await self._username(session_id)
            if username is not None:
                await self._budgets.update_one({"_id": username}, {"$inc": {"pending": -n}})

    def _live(self, username: str, now: float) -> Doc:
        return {"username": username, "owner": {"$ne": None}, "lease_until": {"$gte": now}}

    # -- users ---------------------------------------------------------------
    @translated
    async def create_user(self, username: str, password_hash: bytes) -> User:
        user = User(username, password_hash, time.time())
        try:
            await self._users.insert_one(
                {
                    "username": username,
                    "username_lower": username.lower(),
                    "password_hash": password_hash,
                    "created_at": user.created_at,
                }
            )
        except DuplicateKeyError as e:
            raise UserExists(username) from e
        return user

    @translated
    async def get_user(self, username: str) -> User | None:
        doc = await self._users.find_one({"username_lower": username.lower()})
        if doc is None:
            return None
        return User(doc["username"], bytes(doc["password_hash"]), doc["created_at"])

    # -- sessions and ownership ----------------------------------------------
    @translated
    async def create_session(
        self,
        session_id: str,
        username: str,
        owner: str,
        lease_until: float,
        *,
        max_sessions: int | None = None,
        max_connections: int | None = None,
        now: float | None = None,
    ) -> SessionRecord:
        record = SessionRecord(session_id, username, time.time(), 0, owner, 1, lease_until)
        at = record.created_at if now is None else now
        if max_sessions is not None or max_connections is not None:
            # Settled in the order of creation: a refusal needs no insert.
            usage = await self.usage(username, at)
            if max_sessions is not None and usage.sessions >= max_sessions:
                raise BudgetExceeded(Budget.SESSIONS, max_sessions)
            if max_connections is not None and usage.connections >= max_connections:
                raise BudgetExceeded(Budget.CONNECTIONS, max_connections)
        try:
            await self._sessions.insert_one(
                {
                    "_id": session_id,
                    "username": username,
                    "created_at": record.created_at,
                    "last_seq": 0,
                    "owner": owner,
                    "epoch": 1,
                    "lease_until": lease_until,
                    "carried": True,
                }
            )
        except DuplicateKeyError as e:
            raise StoreError(f"session {session_id} exists") from e
        self._remember(session_id, username)
        if max_sessions is not None or max_connections is not None:
            # Count those created before this one (and this one): over a limit,
            # this one yields to them.
            before = {
                **self._live(username, at),
                "$or": [
                    {"created_at": {"$lt": record.created_at}},
                    {"created_at": record.created_at, "_id": {"$lte": session_id}},
                ],
            }
            refused: BudgetExceeded | None = None
            if max_sessions is not None and (
                await self._sessions.count_documents(before) > max_sessions
            ):
                refused = BudgetExceeded(Budget.SESSIONS, max_sessions)
            elif max_connections is not None and (
                await self._sessions.count_documents({**before, "carried": True}) > max_connections
            ):
                refused = BudgetExceeded(Budget.CONNECTIONS, max_connections)
            if refused is not None:
                await self._sessions.delete_one({"_id": session_id})
                raise refused
        return record

    @translated
    async def set_carried(self, session_id: str, epoch: int, carried: bool) -> bool:
        result = await self._sessions.update_one(
            {"_id": session_id, "epoch": epoch}, {"$set": {"carried": carried}}
        )
        return result.matched_count == 1

    @translated
    async def usage(self, username: str, now: float | None = None) -> UserUsage:
        live = self._live(username, time.time() if now is None else now)
        sessions = await self._sessions.count_documents(live)
        carried = await self._sessions.count_documents({**live, "carried": True})
        doc = await self._budgets.find_one({"_id": username}) or {}
        return UserUsage(sessions, carried, int(doc.get("pending", 0)), int(doc.get("kv_bytes", 0)))

    @translated
    async def get_session(self, session_id: str) -> SessionRecord | None:
        doc = await self._sessions.find_one({"_id": session_id})
        if doc is None:
            return None
        return SessionRecord(
            session_id=doc["_id"],
            username=doc["username"],
            created_at=doc["created_at"],
            last_seq=doc["last_seq"],
            owner=doc["owner"],
            epoch=doc["epoch"],
            lease_until=doc["lease_until"],
        )

    @translated
    async def orphaned_sessions(self, now: float, limit: int = 100) -> list[str]:
        # Sessions with unfinished requests (a handful at any time), then those
        # without a live owner among them.
        candidates = await self._requests.distinct("session_id", {"state": NOT_DONE})
        if not candidates:
            return []
        cursor = self._sessions.find(
            {"_id": {"$in": candidates},
             "$or": [{"owner": None}, {"lease_until": {"$lt": now}}]},
            {"_id": True},
        ).limit(limit)  # fmt: skip
        return [doc["_id"] for doc in await cursor.to_list()]

    @translated
    async def claim_session(
        self, session_id: str, owner: str, lease_until: float, now: float
    ) -> int | None:
        doc = await self._sessions.find_one_and_update(
            {
                "_id": session_id,
                "$or": [{"owner": None}, {"lease_until": {"$lt": now}}, {"owner": owner}],
            },
            {
                "$set": {"owner": owner, "lease_until": lease_until, "carried": False},
                "$inc": {"epoch": 1},
            },
            projection={"epoch": True},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else int(doc["epoch"])

    @translated
    async def release_session(self, session_id: str, epoch: int) -> bool:
        result = await self._sessions.update_one(
            {"_id": session_id, "epoch": epoch},
            {"$set": {"owner": None, "lease_until": 0, "carried": False}},
        )
        return result.matched_count == 1

    @translated
    async def renew_leases(self, owner: str, lease_until: float) -> int:
        result = await self._sessions.update_many(
            {"owner": owner}, {"$set": {"lease_until": lease_until}}
        )
        return result.matched_count

    @translated
    async def renew_session(self, session_id: str, epoch: int, lease_until: float) -> None:
        result = await self._sessions.update_one(
            {"_id": session_id, "epoch": epoch}, {"$set": {"lease_until": lease_until}}
        )
        if result.matched_count != 1:
            await self._check_epoch(session_id, epoch)
            raise Fenced(f"session {session_id}: epoch {epoch} is not current")

    async def _check_epoch(self, session_id: str, epoch: int) -> None:
        doc = await self._sessions.find_one({"_id": session_id}, {"epoch": True})
        current = None if doc is None else doc["epoch"]
        if current != epoch:
            raise Fenced(f"session {session_id}: epoch {epoch} is not current ({current})")

    # -- requests ------------------------------------------------------------
    @translated
    async def add_requests(
        self,
        session_id: str,
        epoch: int,
        requests: Sequence[NewRequest],
        now: float,
        *,
        max_pending: int | None = None,
    ) -> None:
        if not requests:
            return
        top = max(r.seq for r in requests)
        # last_seq goes up first: a crash after the inserts must not leave a
        # request above last_seq, where the next owner would reuse its seq.
        before = await self._sessions.find_one_and_update(
            {"_id": session_id, "epoch": epoch},
            {"$max": {"last_seq": top}},
            projection={"last_seq": True, "username": True},
        )
        if before is None:
            raise Fenced(f"session {session_id}: epoch {epoch} is not current")
        username = str(before["username"])
        self._remember(session_id, username)
        docs = [
            {
                "_id": ObjectId(),
                "session_id": session_id,
                "seq": r.seq,
                "client_id": r.client_id,
                "op": r.op,
                "args": r.args,
                "state": RequestState.QUEUED.value,
                "attempts": 0,
                "failed": False,
                "final": None,
                "created_at": now,
                "finished_at": None,
            }
            for r in requests
        ]

        async def undo(inserted: bool = True) -> None:
            with contextlib.suppress(PyMongoError):
                if inserted:
                    await self._requests.delete_many({"_id": {"$in": [d["_id"] for d in docs]}})
                    await self._budgets.update_one(
                        {"_id": username}, {"$inc": {"pending": -len(docs)}}
                    )
                if before["last_seq"] < top:
                    await self._sessions.update_one(
                        {"_id": session_id, "last_seq": top},
                        {"$set": {"last_seq": before["last_seq"]}},
                    )

        try:
            taken = await self._take(username, "pending", len(docs), max_pending)
        except PyMongoError:
            await undo(inserted=False)
            raise
        if not taken:
            await undo(inserted=False)
            assert max_pending is not None
            raise BudgetExceeded(Budget.PENDING, max_pending)
        try:
            await self._requests.insert_many(docs, ordered=True)
        except BulkWriteError as e:
            await undo()
            codes = {err.get("code") for err in e.details.get("writeErrors", [])}
            if 11000 in codes:
                raise StoreError(f"session {session_id}: a seq or client id is taken") from e
            raise
        except PyMongoError:
            await undo()
            raise
        try:
            await self._check_epoch(session_id, epoch)
        except Fenced:
            await undo()
            raise

    @translated
    async def remove_requests(self, session_id: str, epoch: int, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        await self._check_epoch(session_id, epoch)
        deleted = await self._requests.delete_many(
            {
                "session_id": session_id,
                "seq": {"$in": list(seqs)},
                "state": RequestState.QUEUED.value,
            }
        )
        await self._give_back(session_id, deleted.deleted_count)
        top = await self._requests.find_one(
            {"session_id": session_id}, {"seq": True}, sort=[("seq", DESCENDING)]
        )
        highest = 0 if top is None else top["seq"]
        await self._sessions.update_one(
            {"_id": session_id}, {"$min": {"last_seq": max(highest, min(seqs) - 1)}}
        )

    async def _start(self, session_id: str, seq: int, epoch: int | None) -> int:
        doc = await self._requests.find_one_and_update(
            {"session_id": session_id, "seq": seq, "state": NOT_DONE},
            {"$set": {"state": RequestState.RUNNING.value}, "$inc": {"attempts": 1}},
            projection={"attempts": True},
            return_document=ReturnDocument.AFTER,
        )
        if epoch is not None:
            await self._check_epoch(session_id, epoch)  # a takeover since the first check
        return 0 if doc is None else int(doc["attempts"])

    @translated
    async def start_request(self, session_id: str, seq: int, epoch: int) -> int:
        await self._check_epoch(session_id, epoch)
        return await self._start(session_id, seq, epoch)

    @translated
    async def finish_request(
        self,
        session_id: str,
        seq: int,
        epoch: int | None,
        final: str,
        failed: bool,
        now: float,
        start_next: int | None = None,
    ) -> tuple[bool, int | None]:
        if epoch is not None:
            await self._check_epoch(session_id, epoch)
        result = await self._requests.update_one(
            {"session_id": session_id, "seq": seq, "state": NOT_DONE},
            {"$set": {"state": DONE, "final": final, "failed": failed, "finished_at": now}},
        )
        stored = result.modified_count == 1
        if stored:
            await self._give_back(session_id, 1)
        started = None if start_next is None else await self._start(session_id, start_next, epoch)
        return stored, started

    @translated
    async def get_request(self, session_id: str, seq: int) -> RequestRecord | None:
        doc = await self._requests.find_one({"session_id": session_id, "seq": seq})
        return None if doc is None else _request(doc)

    @translated
    async def find_request(self, session_id: str, client_id: str) -> RequestRecord | None:
        doc = await self._requests.find_one({"session_id": session_id, "client_id": client_id})
        return None if doc is None else _request(doc)

    @translated
    async def seqs_of(self, session_id: str, client_ids: Sequence[str]) -> dict[str, int]:
        if not client_ids:
            return {}
        cursor = self._requests.find(
            {"session_id": session_id, "client_id": {"$in": list(client_ids)}},
            {"client_id": True, "seq": True},
        )
        return {doc["client_id"]: doc["seq"] for doc in await cursor.to_list()}

    @translated
    async def unfinished(self, session_id: str) -> list[RequestRecord]:
        cursor = self._requests.find({"session_id": session_id, "state": NOT_DONE}).sort("seq")
        return [_request(doc) for doc in await cursor.to_list()]

    @translated
    async def finals_after(
        self, session_id: str, after: int, limit: int | None = None
    ) -> list[tuple[int, str]]:
        cursor = self._requests.find(
            {"session_id": session_id, "state": DONE, "seq": {"$gt": after}},
            {"seq": True, "final": True},
        ).sort("seq")
        if limit is not None:
            cursor = cursor.limit(limit)
        return [(doc["seq"], doc["final"]) for doc in await cursor.to_list()]

    @translated
    async def count_requests(self, session_id: str, after: int, through: int) -> int:
        return await self._requests.count_documents(
            {"session_id": session_id, "seq": {"$gt": after, "$lte": through}}
        )

    @translated
    async def session_counts(self, session_id: str) -> SessionCounts:
        session = await self._sessions.find_one({"_id": session_id}, {"last_seq": True})
        if session is None:
            return SessionCounts(last_seq=0, last_done=0, pending=0)
        cursor = await self._requests.aggregate(
            [
                {"$match": {"session_id": session_id, "state": NOT_DONE}},
                {"$group": {"_id": None, "pending": {"$sum": 1}, "first": {"$min": "$seq"}}},
            ]
        )
        groups = await cursor.to_list()
        last_seq = int(session["last_seq"])
        pending = groups[0]["pending"] if groups else 0
        if not pending:
            return SessionCounts(last_seq=last_seq, last_done=last_seq, pending=0)
        return SessionCounts(last_seq=last_seq, last_done=groups[0]["first"] - 1, pending=pending)

    @translated
    async def failed_requests(self, limit: int = 100) -> list[RequestRecord]:
        cursor = self._requests.find({"failed": True}).sort("finished_at", DESCENDING).limit(limit)
        return [_request(doc) for doc in await cursor.to_list()]

    @translated
    async def purge(self, finished_before: float, sessions_before: float | None = None) -> int:
        result = await self._requests.delete_many(
            {"state": DONE, "finished_at": {"$lt": finished_before}}
        )
        # A session still leased (a live owner, possibly idle for longer than
        # the TTL) is kept even if it has no request left.
        cutoff = finished_before if sessions_before is None else sessions_before
        stale = {"created_at": {"$lt": cutoff}, "lease_until": {"$lt": cutoff}}
        cursor = self._sessions.find(stale, {"_id": True}).batch_size(PURGE_CHUNK)
        chunk: list[str] = []
        async for doc in cursor:
            chunk.append(doc["_id"])
            if len(chunk) == PURGE_CHUNK:
                await self._delete_empty_sessions(chunk, stale)
                chunk = []
        if chunk:
            await self._delete_empty_sessions(chunk, stale)
        return result.deleted_count

    async def _delete_empty_sessions(self, ids: list[str], stale: Mapping[str, Any]) -> None:
        busy = await self._requests.distinct("session_id", {"session_id": {"$in": ids}})
        empty = sorted(set(ids) - set(busy))
        if empty:
            # The stale filter again: a session claimed meanwhile has a live lease.
            await self._sessions.delete_many({"_id": {"$in": empty}, **stale})

    # -- key-value (per user) ------------------------------------------------
    @translated
    async def kv_put(
        self, username: str, key: str, value: str, *, max_bytes: int | None = None
    ) -> None:
        size = kv_size(key, value)
        old = await self._kv.find_one({"username": username, "key": key})
        guess = size - (0 if old is None else _entry_size(old))
        if not await self._take(username, "kv_bytes", guess, max_bytes if guess > 0 else None):
            assert max_bytes is not None
            raise BudgetExceeded(Budget.KV_BYTES, max_bytes)
        for attempt in range(2):
            try:
                replaced = await self._kv.find_one_and_update(
                    {"username": username, "key": key},
                    {"$set": {"value": value, "size": size}},
                    upsert=True,
                    return_document=ReturnDocument.BEFORE,
                )
                break
            except DuplicateKeyError:
                # Two upserts of a new key raced; the loser's retry updates.
                if attempt:
                    await self._take(username, "kv_bytes", -guess, None)
                    raise
            except PyMongoError:
                with contextlib.suppress(PyMongoError):
                    await self._take(username, "kv_bytes", -guess, None)
                raise
        # Another put of the same key may have changed it since it was read.
        actual = size - (0 if replaced is None else _entry_size(replaced))
        if actual != guess:
            await self._take(username, "kv_bytes", actual - guess, None)

    @translated
    async def kv_get(self, username: str, key: str) -> str | None:
        doc = await self._kv.find_one({"username": username, "key": key})
        return None if doc is None else str(doc["value"])

    @translated
    async def kv_delete(self, username: str, key: str) -> bool:
        doc = await self._kv.find_one_and_delete({"username": username, "key": key})
        if doc is None:
            return False
        await self._take(username, "kv_bytes", -_entry_size(doc), None)
        return True

    @translated
    async def kv_list(
        self, username: str, prefix: str, limit: int = 1000, after: str | None = None
    ) -> list[tuple[str, str]]:
        query: Doc = {"username": username}
        keys: Doc = {}
        if prefix:
            # An anchored, case-sensitive regex on a literal prefix is an index
            # range scan. Keys sort by code point (BSON compares UTF-8 bytes).
            keys["$regex"] = "^" + _regex_escape(prefix)
        if after is not None:
            keys["$gt"] = after
        if keys:
            query["key"] = keys
        cursor = self._kv.find(query).sort("key").limit(limit)
        return [(doc["key"], doc["value"]) for doc in await cursor.to_list()]


async def _create_indexes(db: AsyncDatabase[Doc]) -> None:
    await db["users"].create_index("username_lower", unique=True)
    await db["sessions"].create_indexes(
        [IndexModel("owner"), IndexModel([("created_at", ASCENDING), ("lease_until", ASCENDING)])]
    )
    await db["requests"].create_indexes(
        [
            IndexModel([("session_id", ASCENDING), ("seq", ASCENDING)], unique=True),
            IndexModel([("session_id", ASCENDING), ("client_id", ASCENDING)], unique=True),
            # unfinished and finals_after: the session's requests of a state, by seq
            IndexModel([("session_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)]),
            IndexModel([("state", ASCENDING), ("finished_at", ASCENDING)]),  # purge
            IndexModel(
                [("finished_at", DESCENDING)],
                name="failed_finished_at",
                partialFilterExpression={"failed": True},
            ),
        ]
    )
    await db["kv"].create_index([("username", ASCENDING), ("key", ASCENDING)], unique=True)
    await db["sessions"].create_index([("username", ASCENDING), ("lease_until", ASCENDING)])


async def _derive_budgets(db: AsyncDatabase[Doc]) -> None:
    """Counters for a store made before budgets: derived once, by the first
    process to open it (the meta document's unique id decides which)."""
    try:
        await db["meta"].insert_one({"_id": DERIVED})
    except DuplicateKeyError:
        return
    pending: dict[str, int] = {}
    by_session: dict[str, int] = {}
    async for doc in db["requests"].find({"state": NOT_DONE}, {"session_id": True}):
        by_session[doc["session_id"]] = by_session.get(doc["session_id"], 0) + 1
    if by_session:
        cursor = db["sessions"].find({"_id": {"$in": list(by_session)}}, {"username": True})
        async for doc in cursor:
            user = doc["username"]
            pending[user] = pending.get(user, 0) + by_session[doc["_id"]]
    kv_bytes: dict[str, int] = {}
    async for doc in db["kv"].find({}):
        kv_bytes[doc["username"]] = kv_bytes.get(doc["username"], 0) + _entry_size(doc)
    for user in pending.keys() | kv_bytes.keys():
        await db["budgets"].update_one(
            {"_id": user},
            {"$inc": {"pending": pending.get(user, 0), "kv_bytes": kv_bytes.get(user, 0)}},
            upsert=True,
        )


def _entry_size(doc: Mapping[str, Any]) -> int:
    size = doc.get("size")
    return int(size) if size is not None else kv_size(doc["key"], doc["value"])


def _request(doc: Mapping[str, Any]) -> RequestRecord:
    return RequestRecord(
        session_id=doc["session_id"],
        seq=doc["seq"],
        client_id=doc["client_id"],
        op=doc["op"],
        args=doc["args"],
        state=RequestState(doc["state"]),
        attempts=doc["attempts"],
        failed=bool(doc["failed"]),
        final=doc["final"],
        created_at=doc["created_at"],
        finished_at=doc["finished_at"],
    )


def _regex_escape(text: str) -> str:
    """Escape for a PCRE pattern: a backslash before every non-alphanumeric ASCII
    character is always a literal in PCRE (unlike Python's re.escape output,
    which is meant for Python's own engine)."""
    return "".join("\\" + ch if ch.isascii() and not ch.isalnum() else ch for ch in text)
