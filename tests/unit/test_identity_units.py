"""Identity's pure parts: client addresses, the new frames and settings, and
what a revocation message closes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from websockets.datastructures import Headers

from protocol import Logout, ProtocolError, Refresh, encode_token, encode_token_expiring, parse
from server.addresses import client_address, forwarded_client, is_trusted
from server.auth import Identity
from server.revocation import LiveTokens, revocation_message
from server.settings import Settings, SettingsError


def ws_with(*forwarded: str) -> Any:
    headers = Headers()
    for value in forwarded:
        headers["X-Forwarded-For"] = value
    return SimpleNamespace(request=SimpleNamespace(headers=headers))


def test_only_a_trusted_peer_names_the_client_and_only_its_last_entry_counts() -> None:
    trusted = ("10.0.0.5", "192.168.0.0/16")
    assert client_address(ws_with("1.2.3.4, 5.6.7.8"), "10.0.0.5", trusted) == "5.6.7.8"
    assert client_address(ws_with("1.2.3.4", "5.6.7.8"), "192.168.3.4", trusted) == "5.6.7.8"
    assert client_address(ws_with("5.6.7.8"), "10.0.0.6", trusted) == "10.0.0.6"
    assert client_address(ws_with("5.6.7.8"), "10.0.0.6", ()) == "10.0.0.6"
    # A trusted peer without a usable header is keyed on itself.
    assert client_address(ws_with(), "10.0.0.5", trusted) == "10.0.0.5"
    assert client_address(ws_with("1.2.3.4, junk"), "10.0.0.5", trusted) == "10.0.0.5"
    assert forwarded_client(" 2001:db8::1 ") == "2001:db8::1"
    assert is_trusted("::ffff:10.0.0.5", trusted)
    assert not is_trusted("not an address", trusted)


def test_refresh_and_logout_frames() -> None:
    assert parse('{"type":"refresh"}') == Refresh()
    assert parse('{"type":"logout","extra":1}') == Logout()
    with pytest.raises(ProtocolError):
        parse('{"type":"refreshh"}')
    assert orjson.loads(encode_token("t", 5)) == {"type": "token", "token": "t", "expires_at": 5}
    assert list(orjson.loads(encode_token_expiring(7))) == ["type", "expires_at"]


def test_identity_settings_are_validated() -> None:
    settings = Settings.from_env(
        environ={
            "SESSIONQ_TRUSTED_PROXIES": "10.0.0.1, 172.30.0.0/24",
            "SESSIONQ_TOKEN_NOTICE": "5",
        }
    )
    assert settings.trusted_proxies == ("10.0.0.1", "172.30.0.0/24")
    assert settings.token_notice == 5
    assert (settings.jwt_issuer, settings.jwt_audience) == ("sessionq", "sessionq")
    for env, name in [
        ({"SESSIONQ_TRUSTED_PROXIES": "10.0.0.1,proxy.local"}, "SESSIONQ_TRUSTED_PROXIES"),
        ({"SESSIONQ_TOKEN_NOTICE": "-1"}, "SESSIONQ_TOKEN_NOTICE"),
        ({"SESSIONQ_JWT_ISSUER": " "}, "SESSIONQ_JWT_ISSUER"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(environ=env)


class FakeConnection:
    def __init__(self, user: str, jti: str, version: int) -> None:
        self.identity: Identity | None = Identity(user, "token", 0, jti, version)
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def _no_send(body: bytes) -> None:
    raise AssertionError("not sent in this test")


def test_a_revocation_closes_only_the_tokens_it_names() -> None:
    live = LiveTokens(_no_send)
    a1, a2, old, bob = (
        FakeConnection("Alice", "j1", 1),
        FakeConnection("alice", "j2", 1),
        FakeConnection("alice", "j0", 0),
        FakeConnection("bob", "j1", 0),
    )
    for conn in (a1, a2, old, bob):
        assert live.add(conn)
    live.on_message(orjson.loads(revocation_message("ALICE", jti="j1"))["revoke"])
    assert a1.closed == (4401, "token revoked") and a2.closed is None and bob.closed is None
    live.on_message({"user": "alice", "version": 1})
    assert old.closed is not None and a2.closed is None
    # A connection that registers just after a revocation that covers it is refused.
    assert not live.add(FakeConnection("alice", "j1", 5))
    assert not live.add(FakeConnection("alice", "j9", 0))
    assert live.add(FakeConnection("alice", "j9", 1))
    live.on_message({"user": 5})  # malformed: ignored
    live.on_message("nonsense")
