"""``sessionq client`` as a subprocess against a real server on port 0.

The server runs in the test's event loop, so the CLI runs as an asyncio
subprocess (a blocking ``subprocess.run`` would stop the server answering).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from conftest import PASSWORD, UNIT, ClientFactory, ServerFactory, unique_name

from server.app import Server


@dataclass
class Run:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.out.splitlines()]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONQ_")}
    env.update(extra)
    return env


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


async def start_client(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", "client", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env or cli_env(),
    )  # fmt: skip


async def client(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Run:
    proc = await start_client(*args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 3 * UNIT)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def login(server: Server, name: str | None = None) -> list[str]:
    """Flags that register a fresh user (or log in as ``name``)."""
    if name is None:
        return ["--url", url(server), "-u", unique_name("cli"), "--password", PASSWORD,
                "--register"]  # fmt: skip
    return ["--url", url(server), "-u", name, "--password", PASSWORD]


async def test_submit_prints_the_value(server: Server) -> None:
    run = await client(*login(server), "submit", "echo", '{"x": 1}')
    assert (run.code, run.out, run.err) == (0, '{"x":1}\n', "")


async def test_submit_refused_exits_1_with_the_code_on_stderr(server: Server) -> None:
    flags = login(server)
    too_long = await client(*flags, "submit", "sleep", '{"seconds": 100000}')
    assert too_long.code == 1 and too_long.out == ""
    assert too_long.err.startswith("bad_request: ")
    unknown = await client(*flags, "submit", "no.such.op")
    assert unknown.code == 1 and unknown.err.startswith("unknown_op: ")


async def test_bad_credentials_exit_3_without_echoing_the_password(
    server: Server, user_client: ClientFactory
) -> None:
    name = (await user_client()).welcome["user"]
    run = await client("--url", url(server), "-u", name, "--password", "not the password",
                       "submit", "echo")  # fmt: skip
    assert run.code == 3 and run.out == ""
    assert "invalid_credentials" in run.err and "not the password" not in run.err


async def test_token_from_the_environment(server: Server, user_client: ClientFactory) -> None:
    token = (await user_client()).welcome["token"]
    run = await client("--url", url(server), "submit", "echo", '{"t": true}',
                       env=cli_env(SESSIONQ_TOKEN=token))  # fmt: skip
    assert (run.code, run.out) == (0, '{"t":true}\n')
    assert token not in run.err


async def test_password_from_the_environment_and_url_default(
    server: Server, user_client: ClientFactory
) -> None:
    name = (await user_client()).welcome["user"]
    env = cli_env(SESSIONQ_PASSWORD=PASSWORD, SESSIONQ_URL=f"ws://127.0.0.1:{server.port}")
    run = await client("-u", name, "submit", "echo", env=env)
    assert (run.code, run.out) == (0, "{}\n")


async def test_register_falls_back_to_login(server: Server, user_client: ClientFactory) -> None:
    name = (await user_client()).welcome["user"]
    run = await client(*login(server, name), "--register", "submit", "echo", "[]")
    assert run.code == 2 and "args must be a JSON object" in run.err  # checked before connecting
    run = await client(*login(server, name), "--register", "submit", "echo", '{"ok": 1}')
    assert (run.code, run.out) == (0, '{"ok":1}\n')


async def test_connection_refused_exits_3() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = await client("--url", f"ws://127.0.0.1:{port}/ws", "-u", "x", "--password", PASSWORD,
                       "submit", "echo")  # fmt: skip
    assert run.code == 3 and "cannot connect" in run.err


async def test_file_prints_one_line_per_request_in_order(server: Server, tmp_path: Path) -> None:
    lines = [
        '{"op": "echo", "args": {"n": 1}}',
        "# a comment, then a blank line",
        "",
        '{"op": "count", "args": {"to": 3}, "id": "counter"}',
        'echo {"n": 2}',
        'sleep {"seconds": 0.01}',
        "count",  # no args: to is required -> bad_request, refused without a seq
        '{"op": "echo", "args": {"n": 3}}',
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run = await client(*login(server), "--file", str(path), "--inflight", "2")
    assert run.code == 1, run.err
    frames = run.lines()
    assert [f["id"] for f in frames] == ["1", "counter", "5", "6", "7", "8"]
    assert [f["type"] for f in frames] == ["result"] * 4 + ["error", "result"]
    assert [f.get("value") for f in frames] == [
        {"n": 1}, {"count": 3}, {"n": 2}, {"slept": 0.01}, None, {"n": 3},
    ]  # fmt: skip
    assert frames[4]["code"] == "bad_request" and "seq" not in frames[4]
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


async def test_stdin_is_read_when_piped(server: Server) -> None:
    body = "".join(f'echo {{"i": {i}}}\n' for i in range(40))
    run = await client(*login(server), "--inflight", "8", stdin=body)
    assert run.code == 0, run.err
    frames = run.lines()
    assert [f["value"] for f in frames] == [{"i": i} for i in range(40)]
    assert [f["seq"] for f in frames] == list(range(1, 41))


async def test_bad_input_exits_2_before_submitting(server: Server) -> None:
    run = await client(*login(server), stdin='echo {"a": 1}\necho {oops}\n')
    assert run.code == 2 and "stdin:2" in run.err and run.out == ""
    duplicate = '{"op":"echo","id":"a"}\n{"op":"echo","id":"a"}\n'
    run = await client(*login(server), stdin=duplicate)
    assert run.code == 2 and "unique" in run.err


async def test_interactive_commands_from_a_pipe(server: Server) -> None:
    # Control frames first: a reply that arrives after the last result may be
    # cut off when end of input closes the connection.
    commands = ':status\n:cancel nope\necho {"a": 1}\ncount {"to": 2}\n'
    run = await client(*login(server), "--interactive", stdin=commands)
    assert run.code == 0, run.err
    frames = run.lines()  # stdout is not a terminal: every frame as a JSON line
    kinds = [(f["type"], f.get("id")) for f in frames]
    assert kinds.index(("accepted", "1")) < kinds.index(("result", "1"))
    assert kinds.count(("progress", "2")) == 2 and ("result", "2") in kinds
    assert ("error", "nope") in kinds and any(k == "status" for k, _ in kinds)


async def test_file_mode_resumes_after_a_server_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Stop the server mid-run (1001) and start another on the same port and
    store: every request gets exactly one result, in order, none run twice."""
    first = await server_factory(shutdown_grace=0.5)
    port = first.port
    count = 60
    body = "".join(f'{{"op": "sleep", "args": {{"seconds": 0.02}}, "id": "r{i}"}}\n'
                   for i in range(count))  # fmt: skip
    proc = await start_client(*login(first), "--inflight", "8")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(body.encode())
    proc.stdin.close()
    got = [await asyncio.wait_for(proc.stdout.readline(), UNIT) for _ in range(5)]
    await first.stop()
    await server_factory(port=port, shutdown_grace=0.5)
    out, err = await asyncio.wait_for(proc.communicate(), 4 * UNIT)
    assert proc.returncode == 0, err.decode()
    frames = [orjson.loads(line) for line in [*got, *out.splitlines()]]
    assert [f["id"] for f in frames] == [f"r{i}" for i in range(count)]
    assert {f["type"] for f in frames} == {"result"}
    assert [f["seq"] for f in frames] == list(range(1, count + 1))


async def test_lost_server_exits_4(server_factory: ServerFactory) -> None:
    server = await server_factory(shutdown_grace=0.2)
    proc = await start_client(*login(server), "--retries", "1", "-v", "submit", "sleep",
                              '{"seconds": 30}')  # fmt: skip
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), UNIT)
    assert line.startswith(b"accepted")
    await server.stop()
    _, err = await asyncio.wait_for(proc.communicate(), 3 * UNIT)
    assert proc.returncode == 4, err.decode()
    assert b"not resumed" in err


# -- identity: the client stays signed in, logs out, keeps tokens out of URLs --------
async def test_a_token_only_client_refreshes_before_expiry(
    server_factory: ServerFactory, user_client: ClientFactory
) -> None:
    short = await server_factory(token_ttl=3, token_notice=2)
    token = (await user_client(target=short)).welcome["token"]
    # The request outlives the token: without refresh the server closes the
    # connection at expiry and the expired token cannot sign in again.
    run = await client("--url", url(short), "submit", "sleep", '{"seconds": 4.5}',
                       env=cli_env(SESSIONQ_TOKEN=token))  # fmt: skip
    assert (run.code, run.out) == (0, '{"slept":4.5}\n'), run.err
    assert "eyJ" not in run.out + run.err  # no token, old or new, is shown


async def test_interactive_logout_revokes_the_token(
    server: Server, connect: ClientFactory, user_client: ClientFactory
) -> None:
    token = (await user_client()).welcome["token"]
    run = await client("--url", url(server), "--interactive", stdin=":logout\n",
                       env=cli_env(SESSIONQ_TOKEN=token))  # fmt: skip
    assert run.code == 0, run.err
    probe = await connect()
    await probe.send({"type": "auth", "token": token})
    assert (await probe.recv())["code"] == "invalid_token"


async def test_a_token_in_the_url_is_refused(server: Server) -> None:
    run = await client("--url", url(server) + "?token=abc", "-u", "x", "--password", PASSWORD,
                       "submit", "echo")  # fmt: skip
    assert run.code == 2 and "not in the URL" in run.err
