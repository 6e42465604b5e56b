"""``sessionq client``: a terminal client for the wire protocol.

    sessionq client [connection flags]                      interactive prompt (terminal)
    sessionq client [connection flags] submit OP [ARGS]     one request, print its value
    sessionq client [connection flags] --file F             JSON lines, one per request
    producer | sessionq client [connection flags]           the same, from stdin

Requests go out in input order with at most ``--inflight`` of them unfinished
(never more than the server's ``max_pending``, so the server never answers
``queue_full``). A lost connection is reopened and the session resumed with
``after`` = the last final seq seen; requests that had not been ``accepted``
are sent again with the same ids, which the server de-duplicates, so nothing is
lost and nothing runs twice.

Exit codes: 0 every request ended with ``result``; 1 at least one ended with
``error``; 2 bad usage or bad input (flags, JSON, missing credentials); 3 could
not connect or authenticate; 4 the connection was lost and could not be
resumed (or the session was taken over); 5 ``--timeout`` expired; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from clients._conn import (
    AuthFailed,
    ClientError,
    ConnectFailed,
    Credentials,
    add_connection_flags,
    open_session,
    recv_json,
    resolve_url,
)
from protocol import MAX_ID_LENGTH, CloseCode, ErrorCode

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_LOST = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

# Refusals (no seq) worth sending again after a pause: the request was not
# taken, and a later try can succeed. Everything else without a seq is final.
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.QUEUE_FULL}
# Errors carrying a request id that answer a cancel or status, not the submit.
NOT_SUBMIT_REPLIES = {ErrorCode.NOT_FOUND, ErrorCode.NOT_CANCELLABLE, ErrorCode.EXPIRED}
MAX_TRIES = 20


class UsageError(Exception):
    """Bad flags or input: exit 2."""


class ConnectionLost(Exception):
    """The connection went away and the session could not be resumed: exit 4."""


# --- input --------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    index: int
    id: str
    op: str
    args: dict[str, Any]
    seq: int | None = None
    final: dict[str, Any] | None = None
    raw: bytes = b""
    tries: int = 0


def parse_request(text: str) -> tuple[str, dict[str, Any], str | None]:
    """``op {json}``, ``op`` alone, or ``{"op":..., "args":..., "id":...}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise UsageError("expected a JSON object")
        op, args, rid = obj.get("op"), obj.get("args", {}), obj.get("id")
    else:
        op, _, rest = text.partition(" ")
        rid = None
        try:
            args = orjson.loads(rest) if rest.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"ARGS is not valid JSON: {exc}") from None
    if not isinstance(op, str) or not op:
        raise UsageError('"op" must be a non-empty string')
    if not isinstance(args, dict):
        raise UsageError("args must be a JSON object")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LENGTH):
        raise UsageError(f'"id" must be a string of 1..{MAX_ID_LENGTH} characters')
    return op, args, rid


def read_requests(lines: Iterable[str], source: str) -> list[Request]:
    """Parse JSON lines (blank lines and ``#`` comments skipped); ids default
    to the line number. Raises UsageError naming the line."""
    parsed: list[tuple[int, str, dict[str, Any], str | None]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            parsed.append((lineno, *parse_request(line)))
        except UsageError as exc:
            raise UsageError(f"{source}:{lineno}: {exc}") from None
    explicit = [rid for *_, rid in parsed if rid is not None]
    if len(set(explicit)) != len(explicit):
        raise UsageError(f"{source}: ids must be unique")
    taken = set(explicit)
    requests: list[Request] = []
    for lineno, op, args, rid in parsed:
        if rid is None:
            rid, k = str(lineno), 1
            while rid in taken:
                rid, k = f"{lineno}.{k}", k + 1
            taken.add(rid)
        requests.append(Request(len(requests), rid, op, args))
    return requests


# --- one logical session over reconnects ----------------------------------------

FrameHandler = Callable[[dict[str, Any], bytes, Request | None], None]


class Runner:
    """Submit requests in order with a bounded window; reconnect and resume.

    ``on_frame(frame, raw, request)`` sees every frame once (duplicates that a
    resume or a re-sent submit produce are dropped); ``request`` is the
    request the frame answers, when there is one.
    """

    def __init__(
        self,
        url: str,
        creds: Credentials,
        on_frame: FrameHandler,
        *,
        inflight: int = 16,
        retries: int = 8,
    ) -> None:
        self.url = url
        self.creds = creds
        self.on_frame = on_frame
        self.inflight = max(1, inflight)
        self.window = self.inflight
        self.retries = retries
        self.requests: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.pending: deque[Request] = deque()  # to send on the current connection
        self.in_flight: set[str] = set()  # sent, no final yet
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] = {}
        self.session_id = ""
        self.last_final_seq = 0
        self.finish_when_idle = False
        self.failed = False
        self._closing = False
        self._wake = asyncio.Event()
        self._hold_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public ---------------------------------------------------------------
    async def connect(self) -> dict[str, Any]:
        """The first connection; raises ClientError."""
        self.ws, self.welcome, _ = await open_session(self.url, self.creds)
        self._welcomed(self.welcome)
        self.session_id = str(self.welcome["session"])
        return self.welcome

    def add(self, op: str, args: dict[str, Any], rid: str | None = None) -> Request:
        rid = rid if rid is not None else self._next_id()
        if rid in self.by_id:
            raise UsageError(f"id {rid!r} was already used in this session")
        request = Request(len(self.requests), rid, op, args)
        self._add(request)
        return request

    def extend(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._add(request)

    def done(self) -> bool:
        return all(r.final is not None for r in self.requests)

    def unfinished(self) -> int:
        return sum(1 for r in self.requests if r.final is None)

    async def send(self, frame: dict[str, Any]) -> None:
        """Send a control frame (status, cancel); dropped while reconnecting."""
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(orjson.dumps(frame).decode())

    async def finish(self) -> None:
        """Stop once every request has its final frame."""
        self.finish_when_idle = True
        self._wake.set()
        if self.done():
            await self.close()

    async def close(self) -> None:
        self._closing = True
        if self.ws is not None:
            await self.ws.close()

    async def serve(self) -> None:
        """Pump frames until :meth:`close`, or (after :meth:`finish`) until every
        request is final; reconnect and resume when the connection drops.
        Raises ConnectionLost."""
        while True:
            ws = self.ws
            assert ws is not None
            sender = asyncio.create_task(self._send_loop(ws))
            try:
                await self._recv_loop(ws)
                return
            except ConnectionClosed as exc:
                if self._closing:
                    return
                close_code = exc.rcvd.code if exc.rcvd else None
            finally:
                # Stop the sender before requeueing: it must not take requests
                # off the queue for a dead connection.
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            await self._reconnect(close_code)
            if self.ws is None:  # closed while reconnecting
                return

    # -- internals --------------------------------------------------------------
    def _add(self, request: Request) -> None:
        request.index = len(self.requests)
        self.requests.append(request)
        self.by_id[request.id] = request
        self.pending.append(request)
        self._wake.set()

    def _next_id(self) -> str:
        n = len(self.requests) + 1
        while str(n) in self.by_id:
            n += 1
        return str(n)

    def _welcomed(self, welcome: dict[str, Any]) -> None:
        limits = welcome.get("limits") or {}
        max_pending = limits.get("max_pending")
        if isinstance(max_pending, int) and max_pending > 0:
            self.window = min(self.inflight, max_pending)
        token = welcome.get("token")
        if isinstance(token, str):
            # Reconnect with the freshest token; the password, when known,
            # covers its expiry.
            self.creds = Credentials(self.creds.username, self.creds.password, token)

    def _renew(self, frame: dict[str, Any]) -> None:
        """Keep the session signed in: ``token_expiring`` is answered with
        ``refresh``, and the ``token`` it brings is what the connection (and a
        reconnect) runs on. Neither frame is shown: a token is a secret."""
        if frame.get("type") == "token_expiring":
            if self.ws is not None:
                self._background(self.send({"type": "refresh"}))
            return
        token = frame.get("token")
        if isinstance(token, str):
            self.creds = Credentials(self.creds.username, self.creds.password, token)

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def logout(self) -> None:
        """Revoke this connection's token on the server and leave (the server
        closes with 1000); unfinished requests still run there."""
        self._closing = True
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(orjson.dumps({"type": "logout"}).decode())
                await self.ws.wait_closed()
        self.creds = Credentials(self.creds.username, None, None)

    async def _send_loop(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._hold_until - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            while self.pending and len(self.in_flight) < self.window:
                request = self.pending.popleft()
                if request.final is not None or request.id in self.in_flight:
                    continue
                self.in_flight.add(request.id)
                frame = {"type": "submit", "id": request.id, "op": request.op, "args": request.args}
                await ws.send(orjson.dumps(frame).decode())
            self._wake.clear()
            await self._wake.wait()

    async def _recv_loop(self, ws: ClientConnection) -> None:
        while True:
            if self.finish_when_idle and self.done():
                self._closing = True
                await ws.close()
                return
            raw = await ws.recv(decode=False)
            self._handle(orjson.loads(raw), raw)

    def _handle(self, frame: dict[str, Any], raw: bytes) -> None:
        kind = frame.get("type")
        if kind in ("token_expiring", "token"):
            self._renew(frame)
            return
        rid = frame.get("id")
        request = self.by_id.get(rid) if isinstance(rid, str) else None
        seq = frame.get("seq")
        if request is None:
            self.on_frame(frame, raw, None)
            return
        if kind == "accepted":
            if request.seq == seq or request.final is not None:
                return  # answer to a re-sent submit
            request.seq = seq
        elif kind == "result" or (kind == "error" and isinstance(seq, int)):
            if request.final is not None:
                return  # replayed by a resume
            if isinstance(seq, int):
                self.last_final_seq = max(self.last_final_seq, seq)
                request.seq = seq
            self._final(request, frame, raw)
            return
        elif kind == "error":
            code = frame.get("code")
            if code in NOT_SUBMIT_REPLIES or request.seq is not None or request.final is not None:
                self.on_frame(frame, raw, request)  # answers a cancel or status
                return
            self.in_flight.discard(request.id)
            request.tries += 1
            if code in RETRYABLE and request.tries < MAX_TRIES:
                retry_after = frame.get("retry_after")
                pause = float(retry_after) if isinstance(retry_after, int | float) else 0.5
                self._requeue([request], pause)
                return
            self._final(request, frame, raw)
            return
        self.on_frame(frame, raw, request)

    def _final(self, request: Request, frame: dict[str, Any], raw: bytes) -> None:
        request.final = frame
        request.raw = raw
        if frame.get("type") != "result":
            self.failed = True
        self.in_flight.discard(request.id)
        self._wake.set()
        self.on_frame(frame, raw, request)

    def _requeue(self, requests: list[Request], pause: float = 0.0) -> None:
        """Put requests back in front of the queue, in input order."""
        if pause:
            loop = asyncio.get_running_loop()
            self._hold_until = max(self._hold_until, loop.time() + pause)
        merged = {r.index: r for r in (*requests, *self.pending) if r.final is None}
        self.pending = deque(merged[i] for i in sorted(merged))
        self._wake.set()

    async def _reconnect(self, close_code: int | None) -> None:
        self.ws = None
        if close_code == CloseCode.TAKEN_OVER:
            raise ConnectionLost("the session was taken over by another connection (4409)")
        if close_code == CloseCode.TOO_BIG:
            raise ConnectionLost("a request is larger than the server accepts (1009)")
        # Everything sent but not accepted goes again, same ids, same order.
        unaccepted = [self.by_id[i] for i in self.in_flight if self.by_id[i].seq is None]
        self.in_flight.difference_update(r.id for r in unaccepted)
        self._requeue(unaccepted)
        delay = 0.1
        problem = f"close code {close_code}"
        for _ in range(self.retries):
            if self._closing:
                return
            try:
                ws, welcome, _ = await open_session(self.url, self.creds)
            except ConnectFailed as exc:
                problem = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except AuthFailed as exc:
                raise ConnectionLost(f"cannot authenticate again: {exc}") from exc
            try:
                await ws.send(orjson.dumps(
                    {"type": "resume", "session": self.session_id, "after": self.last_final_seq}
                ).decode())  # fmt: skip
                while True:
                    frame = await recv_json(ws, 10.0)
                    if frame.get("type") == "resumed":
                        break
                    if frame.get("type") == "error" and "id" not in frame:
                        await ws.close()
                        raise ConnectionLost(
                            f"cannot resume session: {frame.get('code')}: {frame.get('message')}"
                        )
            except (ConnectFailed, ConnectionClosed) as exc:
                problem = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing:  # closed while we were reconnecting
                await ws.close()
                return
            self._welcomed(welcome)
            self.ws = ws
            self.on_frame(frame, b"", None)
            return
        raise ConnectionLost(
            f"connection lost and not resumed after {self.retries} tries: {problem}"
        )


# --- output ---------------------------------------------------------------------


def _line(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def describe(frame: dict[str, Any]) -> str:
    """A frame in readable form, for a terminal."""

    def js(value: Any) -> str:
        return orjson.dumps(value).decode()

    kind = frame.get("type")
    where = f"#{frame['seq']} " if "seq" in frame else ""
    rid = f"[{frame['id']}] " if "id" in frame else ""
    if kind == "accepted":
        return f"accepted {where}{rid}({frame.get('ahead')} ahead)"
    if kind == "progress":
        return f"progress {where}{rid}{js(frame.get('data'))}"
    if kind == "result":
        return f"result   {where}{rid}{js(frame.get('value'))}"
    if kind == "error":
        return f"error    {where}{rid}{frame.get('code')}: {frame.get('message')}"
    if kind == "status":
        extra = {k: v for k, v in frame.items() if k not in ("type", "session")}
        return "status   " + " ".join(f"{k}={v}" for k, v in extra.items())
    if kind == "resumed":
        return f"resumed  session {frame.get('session')} (pending {frame.get('pending')})"
    return js(frame)


class FileOutput:
    """One JSON line per final frame, in input order (= seq order)."""

    def __init__(self, requests: list[Request], verbose: bool) -> None:
        self.requests = requests
        self.verbose = verbose
        self.next = 0

    def __call__(self, frame: dict[str, Any], raw: bytes, request: Request | None) -> None:
        if request is None or request.final is not frame:
            if self.verbose or (request is None and frame.get("type") == "error"):
                _line(sys.stderr, describe(frame))
            return
        requests = self.requests
        while self.next < len(requests) and requests[self.next].final is not None:
            done = requests[self.next]
            _line(sys.stdout, (done.raw or orjson.dumps(done.final)).decode())
            self.next += 1


class OneShotOutput:
    """The result's value as JSON on stdout; an error as ``code: message`` on stderr."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __call__(self, frame: dict[str, Any], raw: bytes, request: Request | None) -> None:
        if request is not None and request.final is frame:
            if frame.get("type") == "result":
                _line(sys.stdout, orjson.dumps(frame.get("value")).decode())
            else:
                _line(sys.stderr, f"{frame.get('code')}: {frame.get('message')}")
        elif self.verbose or (request is None and frame.get("type") == "error"):
            _line(sys.stderr, describe(frame))


class InteractiveOutput:
    """Every frame as it arrives: readable on a terminal, JSON lines otherwise.
    On a terminal the prompt and the half-typed line are redrawn below it."""

    PROMPT = "sq> "

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.reading = False

    def __call__(self, frame: dict[str, Any], raw: bytes, request: Request | None) -> None:
        if not self.tty:
            _line(sys.stdout, (raw or orjson.dumps(frame)).decode())
            return
        self.show(describe(frame))

    def show(self, text: str) -> None:
        if not self.tty:
            _line(sys.stderr, text)
            return
        if not self.reading:
            _line(sys.stdout, text)
            return
        buffer = ""
        with contextlib.suppress(ImportError):
            import readline

            buffer = readline.get_line_buffer()
        sys.stdout.write(f"\r\x1b[K{text}\n{self.PROMPT}{buffer}")
        sys.stdout.flush()


# --- modes ---------------------------------------------------------------------------


async def _run_batch(runner: Runner, requests: list[Request], timeout: float) -> int:
    runner.extend(requests)
    await runner.finish()
    async with asyncio.timeout(timeout or None):
        await runner.serve()
    return EXIT_FAILED if runner.failed else EXIT_OK


QUIT = (":quit", ":q", ":exit")


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None],
                 output: InteractiveOutput) -> None:  # fmt: skip
    """Read lines in a daemon thread (``input`` gives line editing on a
    terminal) and hand them to the event loop; ``None`` at end of input."""

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
            loop.call_soon_threadsafe(queue.put_nowait, item)

    tty = sys.stdin.isatty()
    while True:
        try:
            if tty:
                output.reading = True
                line = input(output.PROMPT)
                output.reading = False
            else:
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            output.reading = False
            put(None)
            return
        put(line)
        if line.strip() in QUIT:
            return


HELP = """op {json}            submit, e.g. echo {"x": 1}; or {"op":..,"args":..,"id":..}
:status [ID]         session status, or one request's state
:cancel ID           cancel a queued or running request
:logout              log out (revokes this token everywhere) and leave
:quit                leave now (unfinished requests still run on the server)
end of input         wait for unfinished requests, then leave"""


@contextlib.contextmanager
def _terminal_restored() -> Iterator[None]:
    """Put the terminal back as it was: the reader thread may still be inside
    ``input()`` (readline changes the terminal modes) when we leave."""
    saved = None
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (gives input() line editing and history)
        with contextlib.suppress(ImportError, OSError):
            import termios

            saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        yield
    finally:
        if saved is not None:
            import termios

            with contextlib.suppress(OSError):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


async def _interactive(runner: Runner, timeout: float) -> int:
    with _terminal_restored():
        return await _interact(runner, timeout)


async def _interact(runner: Runner, timeout: float) -> int:
    output = runner.on_frame
    assert isinstance(output, InteractiveOutput)
    welcome = runner.welcome
    output.show(f"connected as {welcome.get('user')}, session {welcome.get('session')}; "
                ":help for commands")  # fmt: skip
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_stdin_lines, args=(loop, queue, output), daemon=True).start()
    serving = asyncio.create_task(runner.serve())

    async def commands() -> None:
        while True:
            line = await queue.get()
            if line is None:
                await runner.finish()
                return
            text = line.strip()
            if not text:
                continue
            word, _, rest = text.partition(" ")
            rest = rest.strip()
            if word in QUIT:
                await runner.close()
                return
            if word == ":logout":
                await runner.logout()
                output.show("logged out")
                return
            if word in (":help", ":h", "help"):
                output.show(HELP)
            elif word == ":status":
                await runner.send({"type": "status", **({"id": rest} if rest else {})})
            elif word == ":cancel":
                if rest:
                    await runner.send({"type": "cancel", "id": rest})
                else:
                    output.show(":cancel needs an id")
            elif word.startswith(":"):
                output.show(f"unknown command {word}; :help lists them")
            else:
                try:
                    runner.add(*parse_request(text))
                except UsageError as exc:
                    output.show(f"not sent: {exc}")

    reader = asyncio.create_task(commands())
    try:
        async with asyncio.timeout(timeout or None):
            await serving
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    left = runner.unfinished()
    if left:
        output.show(f"{left} requests unfinished; they still run on the server "
                    f"(session {runner.session_id})")  # fmt: skip
    return EXIT_FAILED if runner.failed else EXIT_OK


def _credentials(args: argparse.Namespace, prompt_ok: bool) -> Credentials:
    token = args.token
    username = args.username
    password = args.password
    if token is None and username is None:
        token = os.environ.get("SESSIONQ_TOKEN") or None
        username = os.environ.get("SESSIONQ_USERNAME") or None
    if token:
        return Credentials(username, password, token)
    if not username:
        raise UsageError("give --username (with a password) or --token / SESSIONQ_TOKEN")
    if password is None:
        password = os.environ.get("SESSIONQ_PASSWORD")
    if password is None:
        if not prompt_ok:
            raise UsageError("no password: give --password or SESSIONQ_PASSWORD")
        password = getpass.getpass(f"password for {username}: ")
    return Credentials(username, password, None, register=args.register)


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass(slots=True)
class Plan:
    """What to do, settled before connecting: bad input never reaches the server."""

    url: str
    creds: Credentials
    mode: str  # "submit", "batch" or "interactive"
    requests: list[Request]


def plan(args: argparse.Namespace) -> Plan:
    """Read flags, input and credentials; raises UsageError."""
    try:
        url = resolve_url(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    requests: list[Request] = []
    if getattr(args, "action", None) == "submit":
        mode = "submit"
        op, op_args, _ = parse_request(f"{args.op} {args.args or ''}")
        requests = [Request(0, args.id or "1", op, op_args)]
    elif args.file is not None and args.file != "-":
        mode = "batch"
        try:
            with open(args.file, encoding="utf-8") as handle:
                requests = read_requests(handle, args.file)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    elif args.file == "-" or not (args.interactive or sys.stdin.isatty()):
        mode = "batch"
        requests = read_requests(sys.stdin, "stdin")
    else:
        mode = "interactive"
    return Plan(url, _credentials(args, prompt_ok=_has_terminal()), mode, requests)


async def main(args: argparse.Namespace, todo: Plan) -> int:
    output: FrameHandler
    if todo.mode == "interactive":
        output = InteractiveOutput()
    elif todo.mode == "submit":
        output = OneShotOutput(args.verbose)
    else:
        output = FileOutput(todo.requests, args.verbose)
    runner = Runner(todo.url, todo.creds, output, inflight=args.inflight, retries=args.retries)
    await runner.connect()
    try:
        if todo.mode == "interactive":
            return await _interactive(runner, args.timeout)
        return await _run_batch(runner, todo.requests, args.timeout)
    finally:
        await runner.close()


def _client_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    add_connection_flags(parser, suppress=suppress)
    parser.add_argument("--inflight", type=int, default=default(16), metavar="W",
                        help="most requests unfinished at once (capped by the server's "
                             "max_pending; default 16)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=default(8),
                        help="reconnect attempts after a lost connection (default 8)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=default(0.0), metavar="S",
                        help="give up after S seconds (exit 5; default: no limit)")  # fmt: skip
    parser.add_argument("--verbose", "-v", action="store_true", default=default(False),
                        help="also show accepted and progress frames on stderr")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "client",
        help="terminal client: interactive, one-shot submit, or JSON lines",
        description="\n\n".join(__doc__.split("\n\n")[1:3]),
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _client_flags(parser, suppress=False)
    parser.add_argument("--interactive", "-i", action="store_true",
                        help="read commands from stdin even when it is not a terminal")  # fmt: skip
    parser.add_argument("--file", "-f", metavar="F",
                        help="submit the JSON lines of F in order ('-' for stdin, which is "
                             "also the default when stdin is not a terminal)")  # fmt: skip
    actions = parser.add_subparsers(dest="action", metavar="{submit}")
    submit = actions.add_parser("submit", help="submit one request and print its value")
    submit.add_argument("op", help="operation name, e.g. echo")
    submit.add_argument("args", nargs="?", help="arguments as a JSON object (default {})")
    submit.add_argument("--id", help="request id (default 1)")
    _client_flags(submit, suppress=True)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        todo = plan(args)
        if todo.mode == "batch" and not todo.requests:
            return EXIT_OK
        return asyncio.run(main(args, todo))
    except UsageError as exc:
        print(f"sessionq client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuthFailed as exc:
        print(f"sessionq client: authentication failed: {exc}", file=sys.stderr)
        return EXIT_AUTH
    except ClientError as exc:
        print(f"sessionq client: {exc}", file=sys.stderr)
        return EXIT_AUTH
    except ConnectionLost as exc:
        print(f"sessionq client: {exc}", file=sys.stderr)
        return EXIT_LOST
    except TimeoutError:
        print("sessionq client: timed out", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
