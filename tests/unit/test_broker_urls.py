"""SESSIONQ_BROKER_URL as a list: parsing, validation, and no password shown.

Pure: no broker, no socket. The connect order is checked by giving the broker
a stand-in for ``aio_pika.connect`` that records what it was asked for; the
real failover between two RabbitMQ nodes is tests/test_broker_cluster.py.
The compose stack's cluster is checked as files: every replica names every
node, and the nodes' consumer_timeout fits the default settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from server import broker as broker_module
from server.broker import Broker, BrokerError
from server.broker_urls import safe_url, safe_urls, scrub, split_broker_urls
from server.settings import Settings, SettingsError

A = "amqp://guest:s3cret@node-a:5672/"
B = "amqp://guest:s3cret@node-b:5672/"
C = "amqps://app:other%2Cpw@node-c:5671/prod"


def test_one_url_is_a_list_of_one() -> None:
    assert split_broker_urls(A) == (A,)


def test_a_list_keeps_its_order_and_drops_blanks_around_commas() -> None:
    assert split_broker_urls(f" {B} ,{A},  {C}") == (B, A, C)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (f"{A},", "URL 2 of 2 is empty (a stray comma?)"),
        (f"{A},,{B}", "URL 2 of 3 is empty"),
        ("", "the URL is empty"),
        (f"{A},http://guest:s3cret@node-b/", "URL 2 of 2 (http://guest:***@node-b/) must start"),
        ("rabbitmq:5672", "must start with amqp:// or amqps://"),
        ("amqp:///vhost", "the URL (amqp:///vhost) has no host"),
        ("amqp://guest:s3cret@node-b:99999/", "(amqp://guest:***@node-b:99999/) is not a valid"),
        ("amqp://node-a:0/", "has port 0"),
        (f"{A},{B},{A}", "URL 3 of 3 (amqp://guest:***@node-a:5672/) is listed twice"),
    ],
)
def test_a_bad_list_names_the_bad_url_and_why(raw: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        split_broker_urls(raw)
    assert why in str(info.value)
    assert "s3cret" not in str(info.value)


def test_settings_reject_a_bad_list_naming_the_variable_not_the_password() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ={"SESSIONQ_BROKER_URL": f"{A},amqp://guest:s3cret@"})
    message = str(info.value)
    assert message.startswith("SESSIONQ_BROKER_URL: URL 2 of 2")
    assert "has no host" in message
    assert "s3cret" not in message


def test_settings_take_a_list() -> None:
    settings = Settings.from_env(environ={"SESSIONQ_BROKER_URL": f"{A},{B}"})
    assert settings.broker_url == f"{A},{B}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (A, "amqp://guest:***@node-a:5672/"),
        (C, "amqps://app:***@node-c:5671/prod"),
        ("amqp://node-a:5672/", "amqp://node-a:5672/"),
        ("amqp://guest@node-a/", "amqp://guest@node-a/"),
        ("amqp://u:p/w@d@node-a/", "amqp://u:***@node-a/"),  # unencoded / and @
        ("u:pw@node-a", "u:***@node-a"),
    ],
)
def test_safe_url_never_shows_a_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_safe_urls_and_scrub_mask_every_password_of_the_list() -> None:
    urls = split_broker_urls(f"{A},{C}")
    assert safe_urls(urls) == "amqp://guest:***@node-a:5672/, amqps://app:***@node-c:5671/prod"
    text = f"cannot connect to {C} (password other,pw / other%2Cpw)"
    assert scrub(text, urls) == (
        "cannot connect to amqps://app:***@node-c:5671/prod (password *** / ***)"
    )


def test_the_broker_shows_its_urls_without_passwords() -> None:
    broker = Broker(f"{A},{B}")
    assert broker.urls == (A, B)
    assert broker.safe_url == "amqp://guest:***@node-a:5672/, amqp://guest:***@node-b:5672/"


def test_the_broker_refuses_a_bad_list() -> None:
    with pytest.raises(ValueError, match="URL 2 of 2 is empty"):
        Broker(f"{A},")


class FakeConnection:
    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], list[str]]:
    """Which URLs answer (a set to fill in) and which were tried, in order."""
    up: set[str] = set()
    tried: list[str] = []

    async def connect(url: str, **kwargs: Any) -> FakeConnection:
        tried.append(url)
        if url not in up:
            raise ConnectionRefusedError(f"Connect call failed for {url}")
        return FakeConnection(url)

    monkeypatch.setattr(broker_module.aio_pika, "connect", connect)
    return up, tried


async def test_connect_tries_the_urls_in_order_and_keeps_the_first_that_answers(
    answering: tuple[set[str], list[str]],
) -> None:
    up, tried = answering
    up.update({B, C})
    broker = Broker(f"{A},{B},{C}")
    connection, url = await broker._open_first()
    assert url == B
    assert isinstance(connection, FakeConnection) and connection.url == B
    assert tried == [A, B]  # C is not tried once B answered


async def test_every_connect_starts_again_from_the_first_url(
    answering: tuple[set[str], list[str]],
) -> None:
    up, tried = answering
    up.add(B)
    broker = Broker(f"{A},{B}")
    assert (await broker._open_first())[1] == B
    up.add(A)  # the first node is back: the next (re)connect goes to it
    assert (await broker._open_first())[1] == A
    assert tried == [A, B, A]


async def test_when_no_url_answers_the_error_names_each_without_its_password(
    answering: tuple[set[str], list[str]],
) -> None:
    broker = Broker(f"{A},{C}")
    with pytest.raises(BrokerError) as info:
        await broker._open_first()
    message = str(info.value)
    assert message.startswith("amqp://guest:***@node-a:5672/: Connect call failed")
    assert "; amqps://app:***@node-c:5671/prod: Connect call failed" in message
    assert "s3cret" not in message and "other" not in message


# -- the compose stack --------------------------------------------------------
COMPOSE = Path(__file__).resolve().parents[2] / "compose"


def test_compose_gives_every_replica_every_rabbitmq_node() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    nodes = re.findall(r"^  (rabbitmq-\d+):$", text, re.M)
    assert nodes == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    (raw,) = re.findall(r"SESSIONQ_BROKER_URL: >-\n\s+(\S+)\n", text)
    urls = split_broker_urls(raw)
    assert [urlsplit(url).hostname for url in urls] == nodes
    discovery = (COMPOSE / "rabbitmq" / "cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$",
                        discovery, re.M)  # fmt: skip
    assert listed == nodes


def test_compose_consumer_timeout_outlasts_the_longest_unacked_delivery() -> None:
    """prefetch x batch_max x op_timeout of the default settings must fit
    under the broker's consumer_timeout, or the broker closes busy channels."""
    conf = (COMPOSE / "rabbitmq" / "sessionq.conf").read_text()
    (timeout_ms,) = re.findall(r"^consumer_timeout = (\d+)$", conf, re.M)
    d = Settings()
    worst_ms = d.prefetch * d.batch_max * d.op_timeout * 1000
    assert int(timeout_ms) >= worst_ms
    # The comment's arithmetic is the defaults' own.
    assert f"{d.prefetch} x {d.batch_max} x {d.op_timeout:g} s = {worst_ms // 1000:,.0f} s" in conf
