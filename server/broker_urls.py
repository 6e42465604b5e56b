"""The broker address: one AMQP URL or a comma-separated list of them.

``SESSIONQ_BROKER_URL`` may name every node of a RabbitMQ cluster, in the
order this process should try them (server/broker.py connects to the first
that answers). Pure functions, no network: settings validation and the broker
both use them, and neither ever prints a password (:func:`safe_url`).

A comma inside one URL (in a password, say) must be percent-encoded (``%2C``),
as any reserved character in a URL's user information must be.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

SCHEMES = ("amqp", "amqps")


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and errors.

    Everything between the user name and the last ``@`` is masked, so a
    password that was not percent-encoded (a ``/`` or ``@`` in it) is hidden
    too; a URL without ``user:password@`` comes back unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def safe_urls(urls: tuple[str, ...] | list[str]) -> str:
    """Every URL of a list without its password, comma-separated."""
    return ", ".join(safe_url(url) for url in urls)


def scrub(text: str, urls: tuple[str, ...] | list[str]) -> str:
    """``text`` (an error message, say) with any password of ``urls`` masked."""
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            text = text.replace(url, safe_url(url))
            for secret in {password, unquote(password)}:
                text = text.replace(secret, "***")
    return text


def split_broker_urls(raw: str) -> tuple[str, ...]:
    """The URLs of ``raw`` in order, each checked: raises ValueError naming
    the bad one (without its password) and why."""
    parts = [part.strip() for part in raw.split(",")]
    total = len(parts)
    urls: list[str] = []
    for index, url in enumerate(parts, 1):
        where = f"URL {index} of {total}" if total > 1 else "the URL"
        if not url:
            raise ValueError(f"{where} is empty (a stray comma?)")
        shown = safe_url(url)
        try:
            split = urlsplit(url)
            port = split.port  # raises ValueError when not a number in 0..65535
        except ValueError as exc:
            raise ValueError(f"{where} ({shown}) is not a valid URL: {exc}") from None
        if split.scheme not in SCHEMES or not url.startswith(f"{split.scheme}://"):
            raise ValueError(f"{where} ({shown}) must start with amqp:// or amqps://")
        if not split.hostname:
            raise ValueError(f"{where} ({shown}) has no host")
        if port == 0:
            raise ValueError(f"{where} ({shown}) has port 0")
        if url in urls:
            raise ValueError(f"{where} ({shown}) is listed twice")
        urls.append(url)
    return tuple(urls)
