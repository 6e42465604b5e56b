"""The client address that login and registration limits key on
(PROTOCOL.md, "Client addresses").

The TCP peer, unless the peer is one of ``SESSIONQ_TRUSTED_PROXIES``
(addresses or CIDR ranges): then the address that proxy put *last* in
``X-Forwarded-For``. Only the last entry is the proxy's own observation;
everything before it came from the client and can be forged. A trusted peer
that sends no usable header (missing, or its last entry not an IP address)
is keyed on itself. ``X-Forwarded-For`` from any other peer is ignored, so a
client cannot pick the address it is limited under.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse SESSIONQ_TRUSTED_PROXIES once (Settings validated the entries)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def is_trusted(peer: str, entries: tuple[str, ...]) -> bool:
    if not entries:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted_networks(entries))


def forwarded_client(header: str | None) -> str | None:
    """The last address of an ``X-Forwarded-For`` value, if it is one."""
    if not header:
        return None
    last = header.rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None


def client_address(ws: Any, peer: str, trusted: tuple[str, ...]) -> str:
    """The client address of the connection ``ws`` whose TCP peer is ``peer``."""
    if not is_trusted(peer, trusted):
        return peer
    request = getattr(ws, "request", None)
    headers = request.headers.get_all("X-Forwarded-For") if request is not None else []
    # Several header lines are one list, in order (RFC 9110 5.3).
    forwarded = forwarded_client(", ".join(headers)) if headers else None
    return forwarded or peer
