"""``sessionq``: the one console script.

    sessionq serve [--host H] [--port P] [--workers N] ...   run the server
    sessionq user add NAME [--password-stdin]                 create a user
    sessionq user passwd NAME [--password-stdin]              new password; old tokens revoked
    sessionq user disable|enable|delete NAME                  lock out / let in / remove a user
    sessionq dead-letters [--limit N]                         list failed requests
    sessionq client ...                                        terminal client
    sessionq bench ...                                         load generator

Every ``serve`` flag is also a ``SESSIONQ_*`` environment variable; flags win.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from dataclasses import fields
from typing import Any

from loguru import logger

from server.settings import Settings, SettingsError, env_name

SERVE_FLAGS = [f.name for f in fields(Settings)]


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for name in SERVE_FLAGS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"(env {env_name(name)})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessionq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    _add_serve_flags(serve)

    user = sub.add_parser("user", help="manage users")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create a user (password from a prompt or stdin)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--store-url", default=None, help="(env SESSIONQ_STORE_URL)")
    _add_user_admin(user_sub)

    dead = sub.add_parser("dead-letters", help="list requests that ended with an error")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--store-url", default=None, help="(env SESSIONQ_STORE_URL)")

    try:
        from clients import cli as client_cli

        client_cli.add_parser(sub)
    except ImportError:  # pragma: no cover - clients not installed
        pass
    try:
        from clients import bench

        bench.add_parser(sub)
    except ImportError:  # pragma: no cover
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "user":
            if args.user_command != "add":
                return asyncio.run(user_admin(args))
            return asyncio.run(user_add(args))
        if args.command == "dead-letters":
            return asyncio.run(dead_letters(args))
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
    except SettingsError as exc:
        print(f"sessionq: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in SERVE_FLAGS}
    return Settings.from_env(**overrides)


def serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from server import logs

    logs.configure(settings.log_format, settings.log_level)
    if settings.workers == 1:
        return _run_worker(settings)
    # Decide the dev-mode JWT secret once, here, so that the workers cannot
    # race to create it.
    from server.app import sqlite_dir

    settings = settings.secret_for(sqlite_dir(settings.store_url))
    # N processes on one port: each binds its own SO_REUSEPORT listener and the
    # kernel spreads connections over them.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))  # resolves port 0 once for all workers
    port = sock.getsockname()[1]
    settings = settings.replace(port=port)
    from server import metrics

    # One /metrics for all workers: the workers write their metrics to files
    # in a directory made fresh for this run and named in the environment
    # they inherit; spawned workers import prometheus_client only after that.
    with metrics.shared_across_workers() as metrics_dir:
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_main, args=(settings,)) for _ in range(settings.workers)
        ]
        for proc in procs:
            proc.start()
        sock.close()

        def forward(signum: int, _frame: Any) -> None:
            for proc in procs:
                if proc.pid is not None and proc.exitcode is None:
                    os.kill(proc.pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return _wait_workers(procs, metrics_dir)


def _wait_workers(procs: list[Any], metrics_dir: str) -> int:
    """Wait for every worker, in the order they end; each one gone is marked
    dead at once, so its live gauges leave the sums the others serve."""
    from server import metrics

    running: dict[Any, Any] = {proc.sentinel: proc for proc in procs}
    codes = []
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            proc = running.pop(sentinel)
            proc.join()
            metrics.worker_exited(proc.pid, metrics_dir)
            codes.append(proc.exitcode or 0)
    return max(codes)


def _worker_main(settings: Settings) -> None:
    from server import logs

    _die_with_parent()
    logs.configure(settings.log_format, settings.log_level)
    raise SystemExit(_run_worker(settings))


def _die_with_parent() -> None:
    """A worker must not outlive its parent (e.g. SIGKILL of the parent): ask
    Linux to send it SIGTERM then, which shuts it down gracefully."""
    from server.lifetime import die_with_parent

    if not die_with_parent(signal.SIGTERM):
        if os.getppid() == 1:  # the parent died before prctl took effect
            raise SystemExit(0)
        logger.warning("cannot tie the worker's life to its parent")


def _run_worker(settings: Settings) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    from server.app import Server
    from server.store import StoreError

    server = Server(settings)
    try:
        await server.start()
        # Long-lived objects from start-up need no more collection passes, and
        # a higher first threshold makes the young-generation passes (several
        # percent of the request path) rarer.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
    except (OSError, StoreError, ValueError) as exc:
        logger.error("cannot start: {}", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"sessionq listening on ws://{settings.host}:{server.port}/ws", flush=True)
    await stop.wait()
    await server.stop()
    return 0


async def user_add(args: argparse.Namespace) -> int:
    from protocol import valid_username
    from server.auth import hash_password_sync
    from server.store import UserExists, open_store

    settings = Settings.from_env(store_url=args.store_url)
    if not valid_username(args.name):
        print("sessionq: username must be 1..64 characters of A-Z a-z 0-9 _ . -", file=sys.stderr)
        return 2
    password = _read_password(args)
    if password is None:
        return 2
    store = open_store(settings.store_url)
    await store.open()
    try:
        hashed = await asyncio.to_thread(hash_password_sync, password, settings.bcrypt_rounds)
        await store.create_user(args.name, hashed)
    except UserExists:
        print(f"sessionq: user {args.name!r} exists", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"created user {args.name}")
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    """The new password from stdin or a prompt (never an argument: argv is
    visible to every user of the machine); None, with the reason printed,
    if it cannot be used."""
    from protocol import weak_password

    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("sessionq: passwords differ", file=sys.stderr)
            return None
    if weak_password(args.name, password):
        print("sessionq: password must be at least 8 characters and differ from the username",
              file=sys.stderr)  # fmt: skip
        return None
    return password


# -- identity: passwd, disable, enable, delete ------------------------------------
USER_ADMIN = {
    "passwd": "set a new password (prompt or stdin); every earlier token is revoked",
    "disable": "lock a user out: login refused, tokens revoked, connections closed",
    "enable": "let a disabled user log in again (revoked tokens stay revoked)",
    "delete": "remove a user with its sessions' results and key-value data",
}


def _add_user_admin(user_sub: Any) -> None:
    for name, text in USER_ADMIN.items():
        cmd = user_sub.add_parser(name, help=text, description=text)
        cmd.add_argument("name")
        if name == "passwd":
            cmd.add_argument(
                "--password-stdin", action="store_true", help="read the password from stdin"
            )
        cmd.add_argument("--store-url", default=None, help="(env SESSIONQ_STORE_URL)")
        cmd.add_argument("--broker-url", default=None, help="(env SESSIONQ_BROKER_URL)")


async def user_admin(args: argparse.Namespace) -> int:
    """passwd, disable, enable, delete: change the store, then tell every
    server process to close the user's live connections (4401)."""
    from server.auth import hash_password_sync
    from server.revocation import announce_to_servers, revocation_message
    from server.store import open_store

    settings = Settings.from_env(store_url=args.store_url, broker_url=args.broker_url)
    command, name = args.user_command, args.name
    hashed = None
    if command == "passwd":
        password = _read_password(args)
        if password is None:
            return 2
        hashed = await asyncio.to_thread(hash_password_sync, password, settings.bcrypt_rounds)
    store = open_store(settings.store_url)
    await store.open()
    try:
        if command == "passwd":
            assert hashed is not None
            version = await store.set_password(name, hashed)
        elif command == "disable":
            version = await store.set_disabled(name, True)
        elif command == "enable":
            version = await store.set_disabled(name, False)
        else:
            version = await store.delete_user(name)
    finally:
        await store.close()
    if version is None:
        print(f"sessionq: no user {name!r}", file=sys.stderr)
        return 1
    done = {"passwd": "changed the password of", "disable": "disabled", "enable": "enabled",
            "delete": "deleted"}[command]  # fmt: skip
    print(f"{done} user {name}")
    if command == "enable":
        return 0
    try:
        await announce_to_servers(settings.broker_url, revocation_message(name, version=version))
    except Exception as exc:
        print(
            f"sessionq: its tokens are revoked, but the servers could not be told to close"
            f" its live connections now ({exc}); they close at their next token check or expiry",
            file=sys.stderr,
        )
        return 1
    return 0


async def dead_letters(args: argparse.Namespace) -> int:
    from protocol import decode_json
    from server.store import open_store

    settings = Settings.from_env(store_url=args.store_url)
    store = open_store(settings.store_url)
    await store.open()
    try:
        rows = await store.failed_requests(args.limit)
    finally:
        await store.close()
    for row in rows:
        final = decode_json(row.final) if row.final else {}
        print(f"{row.session_id} seq={row.seq} id={row.client_id} op={row.op} "
              f"attempts={row.attempts} code={final.get('code')} message={final.get('message')!r}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
