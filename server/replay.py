"""The answer to ``resume``: ``resumed``, the stored finals, then live frames.

The replay hooks the session onto the resuming connection and sends what the
client lacks, from the store, in seq order, without sending any final twice:
see :func:`replay` for which final goes which way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import decode_json, encode_resumed
from server.errors import SessionExpired
from server.store import Store

if TYPE_CHECKING:
    from server.outbox import Outbox
    from server.ports import Carrier
    from server.session import Session

# Stored finals a resume reads per store query: a long replay is never held in
# memory whole (the outbox paces it to the client's reading speed).
REPLAY_PAGE = 256


async def replay(store: Store, session: Session, carrier: Carrier, after: int) -> None:
    """Answer ``resume``: ``resumed``, then every stored final with seq >
    ``after`` in order, then live frames (without duplicating a final).

    Raises SessionExpired, before anything is sent, when retention has
    removed some of those finals."""
    sid = session.session_id
    # Every accepted request has a row (stored before `accepted`) until
    # retention purges it: fewer rows than seqs means some results are gone.
    last = session.last_seq
    try:
        if after < last and await store.count_requests(sid, after, last) < last - after:
            raise SessionExpired(sid)
    except BaseException:  # expired, or the store failed: nothing was sent
        if session.outbox is None and session is not carrier.session:
            session.detach(None)  # taken for this resume, carried by no one: drain
        raise
    outbox = carrier.outbox
    outbox.hold()
    previous = carrier.session
    if previous is not None and previous is not session:
        previous.detach(outbox)
    carrier.session = session
    session.attach(outbox, carrier.close)
    # The client lacks every final above ``after``: an earlier replay's
    # record of what it sent must not hold back any of those now.
    session.replayed_finals = {seq for seq in session.replayed_finals if seq <= after}
    # Live frames are held from here on. Which finals the replay sends:
    # - unfinished requests (those cancelled while queued included: their
    #   final is stored early, sent when the queue reaches them) send
    #   theirs live, in seq order, into the held frames; so do requests
    #   accepted from here on (seq above ``last``);
    # - every other final was sent before the hold, so it is stored: the
    #   replay sends it. FIFO puts all of these before any unfinished one.
    # - Without a running consumer nothing comes live for now: the replay
    #   sends stored finals up to the first unfinished request with none;
    #   the recovery that starts a consumer again carries the rest, in
    #   order, skipping what the replay sent (replayed_finals).
    consumer = session.consumer
    running = consumer is not None and not consumer.ended
    live = set(session.unfinished)
    last = session.last_seq
    replayed: set[int] = set()
    whole = False
    try:
        await outbox.push_replayed(encode_resumed(sid, session.last_seq, len(session.unfinished)))
        await _replay_finals(store, sid, outbox, after, last, live, running, replayed)
        whole = True
    finally:
        # Finals the replay sent must not go out again live (a recovery
        # after the replay hands over stored finals of unfinished seqs).
        session.replayed_finals |= {seq for seq in replayed if seq in session.unfinished}

        def keep(frame: bytes) -> bool:
            data = decode_json(frame)
            seq = data.get("seq")
            if not isinstance(seq, int) or data.get("type") == "accepted":
                return True
            # A replay cut short (the store failed mid-way; the connection
            # then closes with 1011) sends no held final: a client that
            # resumes after the highest final it saw must not skip any.
            return whole and seq not in replayed

        outbox.release(keep)


async def _replay_finals(
    store: Store,
    sid: str,
    outbox: Outbox,
    after: int,
    last: int,
    live: set[int],
    running: bool,
    replayed: set[int],
) -> None:
    """Send the stored finals of seqs ``after + 1 .. last`` that do not come
    live (see replay()), reading them a page at a time; add each one sent
    to ``replayed``."""
    # Without a running consumer: up to the first unfinished seq with no
    # stored final. Finals come in seq order, so the first unfinished seq
    # passed without its final is that gap.
    waiting = sorted(live) if not running else []
    i = 0
    cursor = after
    while True:
        page = await store.finals_after(sid, cursor, REPLAY_PAGE)
        for seq, frame in page:
            if seq > last:
                return
            if not running:
                if i < len(waiting) and waiting[i] < seq:
                    return  # the gap: the recovery carries the rest
                if i < len(waiting) and waiting[i] == seq:
                    i += 1  # stored, not yet sent live: the replay sends it
            elif seq in live:
                continue
            if not await outbox.push_replayed(frame.encode()):
                return  # the client went away
            replayed.add(seq)
        if len(page) < REPLAY_PAGE:
            return
        cursor = page[-1][0]
