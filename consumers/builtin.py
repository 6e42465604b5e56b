"""The built-in operations of PROTOCOL.md."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from consumers.context import Context
from consumers.registry import BadArgs, OpError, Registry
from protocol import decode_json, encode_json
from server import metrics
from server.store.budgets import BudgetExceeded

MAX_COUNT = 10_000
MAX_HASH_ROUNDS = 10_000_000
MAX_KEY = 256
KV_MAX_VALUE_BYTES = 65_536  # SESSIONQ_KV_MAX_VALUE_BYTES's default (limits["kv_max_value_bytes"])
KV_LIST_LIMIT = 100  # kv.list's page when no limit is given
KV_LIST_MAX = 1_000  # the largest page kv.list returns


def _number(args: dict[str, Any], name: str, default: float | None = None) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadArgs(f"{name} must be a number")
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        raise BadArgs(f"{name} is out of range") from None


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
    most = int(limits.get("kv_max_value_bytes", KV_MAX_VALUE_BYTES))
    try:
        size = len(encode_json(args["value"]))
    except (TypeError, ValueError):  # e.g. an integer wider than 64 bits
        raise BadArgs("value cannot be stored as JSON") from None
    if size > most:
        raise BadArgs(f"value is {size} bytes as JSON; at most {most} are allowed")


def _validate_list(args: dict[str, Any], limits: Mapping[str, Any]) -> None:
    if "prefix" in args:
        _str(args, "prefix", MAX_KEY)
    if "limit" in args:
        limit = _int(args, "limit")
        if not 1 <= limit <= KV_LIST_MAX:
            raise BadArgs(f"limit must be between 1 and {KV_LIST_MAX}")
    if args.get("next") is not None:
        _str(args, "next", MAX_KEY)


# --- hash: PBKDF2-HMAC-SHA256, 32-byte key, salt "sessionq" ----------------------
#
# A pool worker cannot be interrupted, and hashlib's pbkdf2_hmac cannot be
# resumed: run as one call, a 10,000,000-round hash that timed out or was
# cancelled would hold its worker for seconds more. Long hashes therefore run
# the HMAC chain of PBKDF2 itself (RFC 8018: U1 = HMAC(P, S || INT(1)),
# Ui = HMAC(P, Ui-1), key = U1 ^ U2 ^ ... ^ Uc), STEP_ROUNDS rounds per pool
# call (Context.run_cpu_steps): a cancel or timeout stops the work within one
# step (about 20 ms), and other users' calls run between steps. The price is
# speed: a round in Python costs about 3x a round of OpenSSL's loop. Measured
# on a 100,000-round hash through a one-worker spawn pool on the project's
# 2-core machine: 0.03 s as one pbkdf2_hmac call, 0.10 s as five steps
# (1,000,000 rounds: 0.7 s and 2.5 s). Hashes of at most DIRECT_ROUNDS rounds
# take no longer in C than one step does, so they stay one pbkdf2_hmac call:
# no slower, and stopped no later. (The other way, a pool whose worker is
# killed and replaced on cancel, keeps C speed, but needs a pool of its own in
# place of the server's ProcessPoolExecutor and a freshly spawned process,
# a second or so of CPU, after every cancel.)

_SALT = b"sessionq"
DIRECT_ROUNDS = 40_000  # about 20 ms in one pbkdf2_hmac call
STEP_ROUNDS = 20_000  # about 20 ms of the chain per pool call

PBKDF2State = tuple[bytes, bytes, int, int]  # (key, last U, XOR of the Us, rounds left)


def pbkdf2_hex(data: str, rounds: int) -> str:
    """One pbkdf2_hmac call. Module level so the process pool can pickle it."""
    return hashlib.pbkdf2_hmac("sha256", data.encode(), _SALT, rounds, 32).hex()


def pbkdf2_start(data: str, rounds: int) -> PBKDF2State:
    """The chain's first round; the state that :func:`pbkdf2_step` continues."""
    key = data.encode()
    if len(key) > hashlib.sha256().block_size:
        # HMAC hashes a key longer than a block first: the same HMAC, and the
        # state that crosses to the pool on every step stays 32 bytes.
        key = hashlib.sha256(key).digest()
    u = hmac.digest(key, _SALT + b"\x00\x00\x00\x01", "sha256")
    return key, u, int.from_bytes(u, "big"), rounds - 1


def pbkdf2_step(state: PBKDF2State) -> tuple[bool, PBKDF2State]:
    """Up to STEP_ROUNDS more rounds of the chain; done when none are left.

    HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)): the two padded-key
    blocks are hashed once per step and copied per round, which halves the
    cost of a round against calling hmac.digest.
    """
    key, u, acc, left = state
    block = key.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block)).copy
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block)).copy
    from_bytes = int.from_bytes
    n = min(left, STEP_ROUNDS)
    for _ in range(n):
        h = inner()
        h.update(u)
        o = outer()
        o.update(h.digest())
        u = o.digest()
        acc ^= from_bytes(u, "big")
    left -= n
    return left == 0, (key, u, acc, left)


def pbkdf2_hex_of(state: PBKDF2State) -> str:
    return state[2].to_bytes(32, "big").hex()


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
        data, rounds = args["data"], args["rounds"]
        if rounds <= DIRECT_ROUNDS:
            return {"hex": await ctx.run_cpu(pbkdf2_hex, data, rounds)}
        state = await ctx.run_cpu_steps(pbkdf2_step, pbkdf2_start(data, rounds))
        return {"hex": pbkdf2_hex_of(state)}

    @registry.op("kv.put", validate=_validate_put)
    async def kv_put(args: dict[str, Any], ctx: Context) -> Any:
        most = ctx.limits.get("kv_max_bytes_per_user")
        value = encode_json(args["value"]).decode()
        try:
            await ctx.store.kv_put(ctx.user, args["key"], value, max_bytes=most)
        except BudgetExceeded as exc:
            metrics.budget_hit(exc.budget.value)
            raise OpError(
                "quota_exceeded",
                f"the user's key-value data would exceed {exc.limit} bytes; delete keys first",
            ) from None
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
        """A page of at most ``limit`` entries; ``next`` is the last key of a
        full page (pass it back to continue after it), null on the last page."""
        limit = int(args.get("limit", KV_LIST_LIMIT))
        after = args.get("next")
        # One entry more than the page tells whether another page follows.
        items = await ctx.store.kv_list(ctx.user, args.get("prefix", ""), limit + 1, after)
        page = items[:limit]
        return {
            "items": [{"key": k, "value": decode_json(v)} for k, v in page],
            "next": page[-1][0] if len(items) > limit else None,
        }
