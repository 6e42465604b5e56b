"""The built-in operations of PROTOCOL.md."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any

from consumers.context import Context
from consumers.registry import BadArgs, Registry
from protocol import decode_json, encode_json

MAX_COUNT = 10_000
MAX_HASH_ROUNDS = 10_000_000
MAX_KEY = 256


def _number(args: dict[str, Any], name: str, default: float | None = None) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadArgs(f"{name} must be a number")
    return float(value)


def _int(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadArgs(f"{name} must be an integer")
    return value


def _str(args: dict[str, Any], name: str, max_len: int | None = None) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise BadArgs(f"{name} must be a string")
    if max_len is not None and len(value) > max_len:
        raise BadArgs(f"{name} must be at most {max_len} characters")
    return value


def _validate_sleep(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    seconds = _number(args, "seconds")
    if not 0 <= seconds <= limits["max_sleep"]:
        raise BadArgs(f"seconds must be between 0 and {limits['max_sleep']:g}")


def _validate_count(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    n = _int(args, "to")
    if not 0 <= n <= MAX_COUNT:
        raise BadArgs(f"to must be between 0 and {MAX_COUNT}")
    interval = _number(args, "interval", 0)
    if not 0 <= interval <= limits["max_sleep"]:
        raise BadArgs(f"interval must be between 0 and {limits['max_sleep']:g}")


def _validate_hash(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    _str(args, "data")
    rounds = _int(args, "rounds")
    if not 1 <= rounds <= MAX_HASH_ROUNDS:
        raise BadArgs(f"rounds must be between 1 and {MAX_HASH_ROUNDS}")


def _validate_key(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    if not _str(args, "key", MAX_KEY):
        raise BadArgs("key must not be empty")


def _validate_put(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    _validate_key(args, limits)
    if "value" not in args:
        raise BadArgs("value is required")


def _validate_list(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    if "prefix" in args:
        _str(args, "prefix", MAX_KEY)


def pbkdf2_hex(data: str, rounds: int) -> str:
    """Module level so the process pool can pickle it."""
    return hashlib.pbkdf2_hmac("sha256", data.encode(), b"sessionq", rounds, 32).hex()


def register_builtins(registry: Registry) -> None:
    @registry.op("echo")
    async def echo(args: dict[str, Any], ctx: Context) -> Any:
        return args

    @registry.op("sleep", validate=_validate_sleep)
    async def sleep(args: dict[str, Any], ctx: Context) -> Any:
        seconds = args["seconds"]
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @registry.op("count", validate=_validate_count)
    async def count(args: dict[str, Any], ctx: Context) -> Any:
        n = args["to"]
        interval = args.get("interval", 0)
        for i in range(1, n + 1):
            if interval:
                await asyncio.sleep(interval)
            elif i % 64 == 0:
                await asyncio.sleep(0)  # let other sessions run during long counts
            ctx.progress({"i": i})
        return {"count": n}

    @registry.op("hash", validate=_validate_hash)
    async def hash_(args: dict[str, Any], ctx: Context) -> Any:
        return {"hex": await ctx.run_cpu(pbkdf2_hex, args["data"], args["rounds"])}

    @registry.op("kv.put", validate=_validate_put)
    async def kv_put(args: dict[str, Any], ctx: Context) -> Any:
        await ctx.store.kv_put(ctx.user, args["key"], encode_json(args["value"]).decode())
        return {"key": args["key"], "ok": True}

    @registry.op("kv.get", validate=_validate_key)
    async def kv_get(args: dict[str, Any], ctx: Context) -> Any:
        raw = await ctx.store.kv_get(ctx.user, args["key"])
        return {"key": args["key"], "found": raw is not None,
                "value": None if raw is None else decode_json(raw)}  # fmt: skip

    @registry.op("kv.delete", validate=_validate_key)
    async def kv_delete(args: dict[str, Any], ctx: Context) -> Any:
        return {"key": args["key"], "deleted": await ctx.store.kv_delete(ctx.user, args["key"])}

    @registry.op("kv.list", validate=_validate_list)
    async def kv_list(args: dict[str, Any], ctx: Context) -> Any:
        items = await ctx.store.kv_list(ctx.user, args.get("prefix", ""))
        return {"items": [{"key": k, "value": decode_json(v)} for k, v in items]}
