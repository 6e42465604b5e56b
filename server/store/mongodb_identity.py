"""The MongoDB store's revocation methods (``base.py``, "identity"): a mixin of
:class:`.mongodb.MongoStore`.

Without multi-document transactions each step is one atomic document update:
``user_tokens`` holds ``{_id: lower-case name, version, disabled}`` and
outlives the user (the tombstone that keeps a re-registered name from
inheriting tokens); ``revoked_tokens`` holds ``{_id: jti, expires_at}``, and
each new revocation deletes the entries whose token has expired.
:meth:`delete_user` raises the version first, so every old token is refused
before any data goes, then removes the user's requests, sessions, key-value
data and finally the user: a failure halfway leaves a user that an operator
deletes again, never a token that works. :meth:`token_state` reads the
user, its version and the jti in up to three finds (one per collection; no
``$lookup``, so it runs on any MongoDB and on the test suite's emulator).
"""

from __future__ import annotations

from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .base import TokenState
from .translate import translating

Doc = dict[str, Any]


_translated = translating((PyMongoError,), "mongodb")  # as mongodb.py's


class MongoIdentity:
    """MongoStore's revocation methods (each wrapped by ``translated`` there)."""

    def _database(self) -> AsyncDatabase[Doc]:
        raise NotImplementedError

    @property
    def _tokens(self) -> AsyncCollection[Doc]:
        return self._database()["user_tokens"]

    @property
    def _revoked(self) -> AsyncCollection[Doc]:
        return self._database()["revoked_tokens"]

    async def _exists(self, key: str) -> bool:
        return await self._database()["users"].find_one({"username_lower": key}) is not None

    @_translated
    async def token_state(self, username: str, jti: str | None = None) -> TokenState | None:
        key = username.lower()
        user = await self._database()["users"].find_one({"username_lower": key})
        if user is None:
            return None
        tokens = await self._tokens.find_one({"_id": key}) or {}
        revoked = jti is not None and await self._revoked.find_one({"_id": jti}) is not None
        return TokenState(
            user["username"], int(tokens.get("version", 0)), bool(tokens.get("disabled")), revoked
        )

    async def _bump(self, key: str, disabled: bool | None = None) -> int:
        update: Doc = {"$inc": {"version": 1}}
        if disabled is not None:
            update["$set"] = {"disabled": disabled}
        doc = await self._tokens.find_one_and_update(
            {"_id": key}, update, upsert=True, return_document=ReturnDocument.AFTER
        )
        return int(doc["version"]) if doc is not None else 0

    @_translated
    async def revoke_user(self, username: str) -> int | None:
        key = username.lower()
        if not await self._exists(key):
            return None
        return await self._bump(key)

    @_translated
    async def set_disabled(self, username: str, disabled: bool) -> int | None:
        key = username.lower()
        if not await self._exists(key):
            return None
        if disabled:
            return await self._bump(key, True)
        doc = await self._tokens.find_one_and_update(
            {"_id": key},
            {"$set": {"disabled": False}, "$setOnInsert": {"version": 0}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int(doc["version"]) if doc is not None else 0

    @_translated
    async def set_password(self, username: str, password_hash: bytes) -> int | None:
        key = username.lower()
        changed = await self._database()["users"].update_one(
            {"username_lower": key}, {"$set": {"password_hash": password_hash}}
        )
        if changed.matched_count == 0:
            return None
        return await self._bump(key)

    @_translated
    async def delete_user(self, username: str) -> int | None:
        key = username.lower()
        db = self._database()
        user = await db["users"].find_one({"username_lower": key})
        if user is None:
            return None
        version = await self._bump(key, False)
        name = user["username"]
        session_ids = await db["sessions"].distinct("_id", {"username": name})
        if session_ids:
            await db["requests"].delete_many({"session_id": {"$in": session_ids}})
            await db["sessions"].delete_many({"_id": {"$in": session_ids}})
        await db["kv"].delete_many({"username": name})
        await db["budgets"].delete_one({"_id": name})  # the counters of what was deleted
        await db["users"].delete_one({"username_lower": key})
        return version

    @_translated
    async def revoke_token(self, jti: str, expires_at: float, now: float) -> None:
        await self._revoked.delete_many({"expires_at": {"$lt": now}})
        await self._revoked.update_one(
            {"_id": jti}, {"$set": {"expires_at": expires_at}}, upsert=True
        )
