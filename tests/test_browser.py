"""The browser page, driven in a real headless Chromium (Debian's /usr/bin/chromium).

Playwright's async API runs in the test's own event loop next to the server, so
nothing blocks it. Every wait is on a DOM condition (``wait_for_function``); no
fixed sleeps. The screenshot lands under the test's ``tmp_path`` and is copied to
``test-output/browser.png`` in the repository (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from conftest import PASSWORD, ServerFactory, unique_name
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from server.app import Server

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
# Without the background-networking flags Chromium's own connections to the
# outside are refused by the closed network and show up as errors and delays.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000
FINAL_STATES = ("result", "error", "cancelled")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (scripts/ensure-chromium installs it)",
    ),
]

# Installed once the page has loaded: records, in the order the page shows them,
# every row that reaches a final state, and what the connection state was each
# time it changed (with how many rows were not final at that moment).
OBSERVE_JS = """(FINAL) => {
  window.__finals = [];
  window.__conn = [];
  const rows = document.getElementById('rows');
  const unfinished = () => [...rows.querySelectorAll('tr')]
    .filter((tr) => !FINAL.includes(tr.dataset.state)).length;
  new MutationObserver((records) => {
    for (const m of records) {
      const tr = m.target;
      if (tr.nodeName !== 'TR' || m.attributeName !== 'data-state') continue;
      const now = tr.dataset.state;
      if (FINAL.includes(now) && !FINAL.includes(m.oldValue || '')) {
        window.__finals.push({ id: tr.dataset.id, seq: Number(tr.dataset.seq), state: now });
      }
    }
  }).observe(rows, { subtree: true, attributes: true, attributeOldValue: true,
                     attributeFilter: ['data-state'] });
  const conn = document.getElementById('conn-state');
  new MutationObserver(() => {
    window.__conn.push({ state: conn.textContent, unfinished: unfinished() });
  }).observe(conn, { childList: true, characterData: true, subtree: true });
}"""

ROWS_JS = """() => [...document.querySelectorAll('#rows tr')].map((tr) => ({
  id: tr.dataset.id, seq: tr.dataset.seq === undefined ? null : Number(tr.dataset.seq),
  state: tr.dataset.state, op: tr.querySelector('td.op').textContent,
  final: tr.querySelector('td.final').textContent,
  message: tr.querySelector('td.message').textContent,
}))"""

ALL_FINAL_JS = """([n, finals]) => {
  const trs = [...document.querySelectorAll('#rows tr')];
  return trs.length === n && trs.every((tr) => finals.includes(tr.dataset.state));
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


class PageProblems:
    """Console errors, uncaught exceptions and failed requests of one page."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.items.append(f"pageerror: {exc}"))
        page.on(
            "requestfailed",
            lambda req: self.items.append(f"requestfailed: {req.url} {req.failure}"),
        )

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":  # also CSP violations and failed loads (404s)
            self.items.append(f"console {msg.type}: {msg.text} @ {msg.location}")


async def new_page(browser: Browser) -> tuple[Page, PageProblems]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    return page, PageProblems(page)


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).text_content() or "").strip()


async def wait_for(page: Page, js: str, arg: Any = None) -> None:
    await page.wait_for_function(js, arg=arg, timeout=WAIT_MS)


async def submit(page: Page, op: str, args: dict[str, Any], count: int = 1) -> None:
    await page.fill("#op", op)  # an `input` event: the page puts the op's example in #args
    await page.fill("#args", json.dumps(args))
    await page.fill("#count", str(count))
    await page.click("#submit")


async def rows(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.evaluate(ROWS_JS)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a failure message: one line each."""
    return "\n" + "\n".join(
        f"  {r['id']} seq={r['seq']} {r['op']} {r['state']} {r['final']} {r['message']}"
        for r in rows
    )


async def save_screenshot(page: Page, tmp_path: Path) -> Path:
    """A full-page PNG under the test's tmp_path, copied to test-output/browser.png."""
    out = tmp_path / "browser"
    out.mkdir(exist_ok=True)
    shot = out / "browser.png"
    await page.screenshot(path=str(shot), full_page=True)
    keep = REPO / "test-output"
    keep.mkdir(exist_ok=True)
    shutil.copyfile(shot, keep / "browser.png")
    return shot


async def test_page_runs_requests_and_resumes_after_drop(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    page, problems = await new_page(browser)
    try:
        await page.goto(f"http://127.0.0.1:{server.port}/")

        # Register through the form; the page authenticates on its socket.
        username = unique_name("browser")
        await page.fill("#username", username)
        await page.fill("#password", PASSWORD)
        await page.click("#register")
        await wait_for(
            page,
            """(user) => document.getElementById('conn-state').textContent === 'open'
                && document.getElementById('user').textContent === user
                && document.getElementById('session').textContent !== ''
                && document.getElementById('auth').hidden""",
            username,
        )
        session_id = await text(page, "#session")
        assert await text(page, "#auth-error") == ""
        await page.evaluate(OBSERVE_JS, list(FINAL_STATES))

        # One slow request, then a burst of echoes queued behind it.
        await submit(page, "sleep", {"seconds": 0.3})
        burst = {"hello": "browser", "n": [1, 2, 3]}
        await submit(page, "echo", burst, count=5)
        await wait_for(page, ALL_FINAL_JS, [6, FINAL_STATES])
        first = await rows(page)
        assert [r["state"] for r in first] == ["result"] * 6, table(first)
        assert [r["seq"] for r in first] == [1, 2, 3, 4, 5, 6]
        assert [r["op"] for r in first] == ["sleep"] + ["echo"] * 5
        assert json.loads(first[0]["final"]) == {"slept": 0.3}
        assert all(json.loads(r["final"]) == burst for r in first[1:]), table(first)
        assert [f["seq"] for f in await page.evaluate("window.__finals")] == [1, 2, 3, 4, 5, 6]
        assert await text(page, "#pending") == "0"

        # Queue work, drop the socket while it is still queued, let the page reconnect
        # and resume: results that finished while it was away must fill the gap.
        await submit(page, "sleep", {"seconds": 0.3}, count=5)
        await wait_for(
            page,
            """() => [...document.querySelectorAll('#rows tr')].slice(6)
                     .every((tr) => tr.dataset.seq !== undefined)""",
        )
        await page.click("#disconnect")
        await wait_for(page, "() => window.__conn.some((c) => c.state === 'reconnecting')")
        await wait_for(
            page,
            """() => document.getElementById('conn-state').textContent === 'open'
                && document.getElementById('status-reply').textContent.startsWith('resumed:')""",
        )
        await wait_for(page, ALL_FINAL_JS, [11, FINAL_STATES])
        await wait_for(page, "() => document.getElementById('pending').textContent === '0'")

        after = await rows(page)
        assert [r["state"] for r in after] == ["result"] * 11, table(after)
        assert [r["seq"] for r in after] == list(range(1, 12))
        assert all(json.loads(r["final"]) == {"slept": 0.3} for r in after[6:]), table(after)
        assert [r["id"] for r in after[:6]] == [r["id"] for r in first]
        assert all(r["id"].startswith("r-") for r in after), "a row for a frame the page never sent"
        assert await text(page, "#session") == session_id, "resume should keep the session"

        finals = await page.evaluate("window.__finals")
        assert [f["seq"] for f in finals] == list(range(1, 12)), "one final per row, in seq order"

        conn = await page.evaluate("window.__conn")
        unfinished_at_drop = next(c["unfinished"] for c in conn if c["state"] == "reconnecting")
        assert unfinished_at_drop >= 2, f"dropped too late to test resume: {conn}"
        resumed = await text(page, "#status-reply")  # "resumed: last_seq N · pending K"
        assert resumed.startswith("resumed: last_seq 11 · pending "), resumed
        pending_at_resume = int(resumed.rsplit(" ", 1)[1])
        assert pending_at_resume < unfinished_at_drop, (
            f"nothing finished while disconnected ({resumed!r}, {conn})"
        )
        log_text = await text(page, "#log")
        assert "duplicate final" not in log_text and "second final" not in log_text, log_text
        assert '"type":"resumed"' in log_text
    finally:
        # Also on failure: the page as it stood is the best clue.
        shot = await save_screenshot(page, tmp_path)
    assert shot.stat().st_size > 0
    assert not problems.items, problems.items


async def test_page_is_served_with_csp_and_loads_cleanly(
    server_factory: ServerFactory, browser: Browser
) -> None:
    server = await server_factory()
    page, problems = await new_page(browser)
    statuses: dict[str, int] = {}
    page.on("response", lambda resp: statuses.__setitem__(resp.url, resp.status))
    base = f"http://127.0.0.1:{server.port}"

    response = await page.goto(f"{base}/")
    assert response is not None
    assert response.status == 200
    headers = await response.all_headers()
    assert headers["content-type"].startswith("text/html")
    csp = headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp, headers
    assert headers.get("x-content-type-options") == "nosniff", headers

    # The script ran (it opens the socket) and the stylesheet applied.
    await wait_for(page, "() => document.getElementById('conn-state').textContent === 'open'")
    display = await page.evaluate("getComputedStyle(document.querySelector('main')).display")
    assert display == "grid"
    assert statuses.get(f"{base}/static/app.js") == 200, statuses
    assert statuses.get(f"{base}/static/style.css") == 200, statuses
    assert all(status < 400 for status in statuses.values()), statuses
    assert not problems.items, problems.items


# -- identity: the page stays signed in and logs out ------------------------------
async def test_page_refreshes_its_token_and_logs_out(
    server_factory: ServerFactory, browser: Browser
) -> None:
    short = await server_factory(token_ttl=3, token_notice=2)
    page, problems = await new_page(browser)
    await page.goto(f"http://127.0.0.1:{short.port}/")
    await page.fill("#username", unique_name("browser"))
    await page.fill("#password", PASSWORD)
    await page.click("#register")
    await wait_for(page, "() => document.getElementById('conn-state').textContent === 'open'"
                         " && document.getElementById('auth').hidden")  # fmt: skip
    await page.evaluate(OBSERVE_JS, list(FINAL_STATES))
    first_token = await page.evaluate("sessionStorage.getItem('sessionq.token')")
    first_expiry = float(await page.evaluate("sessionStorage.getItem('sessionq.expires_at')"))
    # token_expiring -> refresh -> token: the stored token moves on, and the tab
    # is still signed in after the first token's expiry.
    await wait_for(
        page,
        "(first) => sessionStorage.getItem('sessionq.token') !== first",
        first_token,
    )
    await wait_for(page, "(at) => Date.now() / 1000 > at + 0.5", first_expiry)
    await submit(page, "echo", {"still": "signed in"})
    await wait_for(page, ALL_FINAL_JS, [1, FINAL_STATES])
    assert [r["state"] for r in await rows(page)] == ["result"]
    conn = await page.evaluate("window.__conn")
    assert all(c["state"] == "open" for c in conn), f"the tab lost its connection: {conn}"
    assert first_token not in await text(page, "#log"), "the log shows a whole token"

    # Log out: the server revokes the token (another client cannot use it).
    current = await page.evaluate("sessionStorage.getItem('sessionq.token')")
    await page.click("#logout")
    await wait_for(page, "() => document.getElementById('conn-state').textContent === 'closed'"
                         " && !document.getElementById('auth').hidden")  # fmt: skip
    assert await page.evaluate("sessionStorage.getItem('sessionq.token')") is None
    ws = await websockets.connect(f"ws://127.0.0.1:{short.port}/ws")
    try:
        await ws.send(json.dumps({"type": "auth", "token": current}))
        reply = json.loads(await ws.recv())
    finally:
        await ws.close()
    assert reply["code"] == "invalid_token", reply
    assert not problems.items, problems.items
