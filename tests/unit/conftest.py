"""The pure tier: protocol, session core, message format, settings.

Nothing here needs RabbitMQ, a store server or a network: these tests pass on
a machine with none of them (tests/unit/test_tiers.py runs this tier with the
broker unreachable to prove it). A test that needs a real broker, store or
socket belongs in the integration tier beside tests/conftest.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _broker_answers() -> None:
    """Overrides the root conftest's broker check: this tier needs no broker."""
