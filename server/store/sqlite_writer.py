"""The SQLite store's writer: the group commit, and the writer process that
runs it (both ends of its pipe).

Group commit (:mod:`.group_commit`): every write is queued to one writer
task, which runs everything queued in one transaction on the writer process,
commits once and then answers each caller.

Why a process: a group commit is a few hundred SQLite steps, and the sqlite3
module takes the GIL back after each one. On a thread of the server's own
process every step therefore waited for the event loop to let go of the GIL:
at 100 sessions x 16 requests in flight, a commit took ~30 ms of wall time for
~7 ms of CPU, and the commits bounded the server's throughput. In a process of
its own the writer has a GIL of its own; a commit takes about the CPU it needs
(docs/performance.md has the figures).

The protocol is private to the two ends: on the child's stdin and stdout, a
4-byte big-endian length and a pickle, strictly one request then one reply.

* At start the child opens the file and answers ``("ready", None)`` or
  ``("failed", StoreError)``.
* The parent sends a batch: a list of ``(function, args)``, each function a
  module-level write in :mod:`server.store.sqlite_writes` (pickled by
  reference). The child runs the batch in one transaction with its
  ``run_batch`` and answers
  ``("ok", [(True, result) or (False, exception), ...])``, or
  ``("failed", StoreError)`` when the transaction as a whole failed.
* EOF on its stdin ends the child once its batch is done: that is how a clean
  close ends it. It also gets SIGKILL when the server dies (Linux's parent-death
  signal), since a descendant holding a copy of the pipe would keep EOF away.
  It runs in a session of its own and ignores SIGINT and SIGTERM: a Ctrl-C or a
  service stop reaches the server, which still has results to store while it
  shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from loguru import logger

from .base import StoreError
from .group_commit import GroupCommit
from .sqlite_writes import Write, store_error

HEADER = struct.Struct("!I")
# The directory that holds the ``server`` package. The child appends it to its
# path (after the standard library and site-packages; ``-P`` keeps the working
# directory out), so it finds this package whether or not it is installed.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
BOOTSTRAP = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from server.store.sqlite_writer import main; raise SystemExit(main(sys.argv[1:]))"
)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
T = TypeVar("T")


class WriterProcess:
    """The parent's end: starts the child, runs batches on it, restarts it."""

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-c", BOOTSTRAP, PACKAGE_ROOT,
                str(self.path), str(self.busy_timeout), str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:  # no fork, no descriptors left, ...
            raise StoreError(f"cannot start the store's writer process: {e}") from e
        try:
            async with asyncio.timeout(START_TIMEOUT):
                status, value = await self._exchange(None)
        except TimeoutError:
            await self._discard()
            raise StoreError("the store's writer process did not start") from None
        if status != "ready":
            await self.stop()
            raise value

    async def run(self, batch: Sequence[Write]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in one transaction; raise StoreError if it failed whole.

        A child that died (or was never started) is started first; a child that
        dies during the batch fails the batch, and the next batch gets a new one.
        Whether a batch that was in flight then committed is unknown, as with
        any write whose answer is lost.
        """
        if self._proc is None or self._proc.returncode is not None:
            await self._discard()
            await self.start()
        status, value = await self._exchange(list(batch))
        if status == "ok":
            return list(value)
        raise value

    async def stop(self) -> None:
        """Close the child's stdin and wait for it to finish and exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _exchange(self, message: Any) -> tuple[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        if message is not None:
            try:  # before touching the pipe: a write that cannot be sent fails alone
                payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
                header = HEADER.pack(len(payload))
            except Exception as e:
                raise StoreError(f"cannot send a batch to the store's writer: {e!r}") from e
        try:
            if message is not None:
                proc.stdin.write(header + payload)
            size = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))[0]
            reply: tuple[str, Any] = pickle.loads(await proc.stdout.readexactly(size))
        except Exception as e:  # the pipe broke, or what came back is not a reply
            code = await self._discard()
            logger.warning("the SQLite writer process ended (exit code {}): {!r}", code, e)
            raise StoreError(f"the store's writer process ended (exit code {code}): {e!r}") from e
        except asyncio.CancelledError:
            # The reply can no longer be matched to its batch: start afresh.
            await self._discard()
            raise
        return reply

    async def _discard(self) -> int | None:
        """Kill the child (if it still runs) and forget it; return its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return await proc.wait()


class SqliteGroupCommit(GroupCommit[Write]):
    """The SQLite store's writer task: each batch runs as one transaction on
    the writer process."""

    def __init__(
        self, process: WriterProcess, on_failed: Callable[[int], object], *, name: str
    ) -> None:
        super().__init__(on_failed, name=name)
        self.process = process

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Queue ``fn(connection, *args)`` for the next batch; return its result
        once committed. ``fn`` runs in the writer process: a module-level
        function of :mod:`.sqlite_writes`, its args picklable."""
        return await self._queue((fn, args))  # type: ignore[no-any-return]

    async def _run(self, ops: Sequence[Write]) -> Sequence[tuple[bool, Any]]:
        return await self.process.run(ops)

    def _failure(self, exc: Exception) -> Exception:
        return store_error(exc)

    def _settle(self, future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
        ok, value = outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# -- the child's end ----------------------------------------------------------
def _send(out: IO[bytes], reply: tuple[str, Any]) -> None:
    try:
        data = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # a result that cannot cross: a bug in a write
        data = pickle.dumps(("failed", StoreError(f"cannot send a write's result: {e!r}")))
    out.write(HEADER.pack(len(data)) + data)
    out.flush()


def _receive(inp: IO[bytes]) -> Any | None:
    header = inp.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    size = HEADER.unpack(header)[0]
    data = inp.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import sqlite3

    from ..lifetime import die_with_parent
    from .sqlite_schema import configure
    from .sqlite_writes import run_batch

    path, busy_timeout, parent = argv[0], float(argv[1]), int(argv[2])
    if not die_with_parent(signal.SIGKILL, parent) and os.getppid() != parent:
        return 0  # the server died while this process started
    # The protocol owns stdout; anything else that prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = os.fdopen(os.dup(0), "rb")
    try:
        c = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
        configure(c)
    except sqlite3.Error as e:
        _send(out, ("failed", StoreError(f"the writer cannot open {path}: {e}")))
        return 1
    _send(out, ("ready", None))
    while (batch := _receive(inp)) is not None:
        # (A result that cannot be pickled is reported as a failure of the
        # whole batch although it committed: only a bug in a write does that.)
        try:
            _send(out, ("ok", run_batch(c, batch)))
        except Exception as e:  # the transaction as a whole failed
            _send(out, ("failed", store_error(e)))
    c.close()
    return 0
