"""The session core's rules, driven by hand: no broker, no store, no event loop."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from protocol import ErrorCode, Submit
from server.session_core import (
    BEGIN_CLOSE,
    START_PUMP,
    Command,
    Refuse,
    Send,
    SendAll,
    SessionCore,
)
from server.session_state import InvalidTransition, SessionState


def check_op(name: str, args: dict[str, Any]) -> tuple[ErrorCode, str] | None:
    if name not in ("echo", "sleep"):
        return ErrorCode.UNKNOWN_OP, f"unknown op {name!r}"
    if name == "sleep" and not isinstance(args.get("seconds"), int | float):
        return ErrorCode.BAD_REQUEST, "seconds must be a number"
    return None


def core(max_pending: int = 5, **kw: Any) -> SessionCore:
    return SessionCore("s1", max_pending, check_op, **kw)


def submit(c: SessionCore, rid: str, op: str = "echo", **kw: Any) -> tuple[Command, ...]:
    at = kw.get("now", 0.0)
    return c.submit(Submit(rid, op, {"seconds": 1}), now=lambda: at, broker_ready=True)


def frames(commands: tuple[Command, ...]) -> list[dict[str, Any]]:
    out = []
    for c in commands:
        if isinstance(c, Send):
            out.append(orjson.loads(c.frame))
        elif isinstance(c, SendAll):
            out.extend(orjson.loads(f) for f in c.frames)
        elif isinstance(c, Refuse):
            out.append({"type": "error", "code": c.code.value, "id": c.id})
    return out


def accept_all(c: SessionCore) -> list[dict[str, Any]]:
    """Play the pump: take every waiting batch, accept it, answer it."""
    sent: list[dict[str, Any]] = []
    while c.incoming:
        batch = c.take_batch()
        sent += frames(c.batch_accepted(batch, c.next_seq()))
        c.batch_done()
    c.pump_ended()
    return sent


# -- max_pending ------------------------------------------------------------------------
def test_a_batch_being_stored_and_published_counts_toward_max_pending() -> None:
    # The defect: the old rule counted unfinished + waiting-for-the-pump, so
    # a burst arriving while the pump stored a batch got past max_pending.
    c = core(max_pending=5)
    assert submit(c, "r1") == (START_PUMP,)
    accept_all(c)  # r1 runs
    for i in range(2, 6):
        submit(c, f"r{i}")
    batch = c.take_batch()  # r2..r5 being stored and published
    assert len(batch) == 4 and not c.incoming
    refused = frames(submit(c, "r6"))
    assert refused == [{"type": "error", "code": "queue_full", "id": "r6"}]
    accepted = frames(c.batch_accepted(batch, c.next_seq()))
    c.batch_done()
    assert [f["seq"] for f in accepted] == [2, 3, 4, 5]
    assert c.pending() == 5


def test_a_burst_gets_exactly_max_pending_accepted() -> None:
    c = core(max_pending=5)
    replies = []
    for i in range(10):
        replies += frames(submit(c, f"r{i}"))
        if i == 2:
            c.take_batch()  # the pump took the first three mid-burst
    assert [r["id"] for r in replies] == [f"r{i}" for i in range(5, 10)]
    assert all(r["code"] == "queue_full" for r in replies)


def test_a_client_keeping_max_pending_in_flight_is_never_refused() -> None:
    c = core(max_pending=3)
    for i in range(3):
        submit(c, f"r{i}")
    accept_all(c)
    for i in range(3, 50):
        oldest = min(c.unfinished)
        c.finished(oldest)  # stops counting before its final frame is sent
        replies = frames(submit(c, f"r{i}"))
        assert replies == [], replies
        accept_all(c)
    assert c.pending() == 3


# -- duplicate ids and accepted order ---------------------------------------------------
def test_accepted_frames_leave_in_submit_order_with_ahead() -> None:
    c = core(max_pending=10)
    for rid in ("a", "b", "c"):
        submit(c, rid)
    sent = accept_all(c)
    assert [(f["id"], f["seq"], f["ahead"]) for f in sent] == [
        ("a", 1, 0), ("b", 2, 1), ("c", 3, 2)
    ]  # fmt: skip


def test_a_duplicate_id_gets_the_same_accepted_and_runs_once() -> None:
    c = core()
    submit(c, "a")
    assert submit(c, "a") == ()  # still being accepted: it rides along
    sent = accept_all(c)
    assert [(f["id"], f["seq"]) for f in sent] == [("a", 1), ("a", 1)]
    again = frames(submit(c, "a"))
    assert again == [{"type": "accepted", "id": "a", "seq": 1, "ahead": 0}]
    assert c.pending() == 1


def test_ids_known_to_the_store_get_their_original_seq() -> None:
    c = core(last_seq=7)
    assert c.resumed_from_store
    submit(c, "old")
    submit(c, "new")
    batch = c.take_batch()
    keep, sends = c.drop_known(batch, {"old": 4})
    assert [p.frame.id for p in keep] == ["new"]
    assert frames(sends) == [{"type": "accepted", "id": "old", "seq": 4, "ahead": 0}]
    accepted = frames(c.batch_accepted(keep, c.next_seq()))
    assert accepted[0]["seq"] == 8


def test_refusals_before_acceptance() -> None:
    c = core()
    assert frames(submit(c, "x", op="nope"))[0]["code"] == "unknown_op"
    bad = c.submit(Submit("y", "sleep", {"seconds": "x"}), now=lambda: 0.0, broker_ready=True)
    assert frames(bad)[0]["code"] == "bad_request"
    down = c.submit(Submit("z", "echo", {}), now=lambda: 0.0, broker_ready=False)
    assert frames(down)[0]["code"] == "unavailable"
    assert c.pending() == 0


def test_the_per_session_rate_limit() -> None:
    c = core(max_pending=100, max_submits_per_second=2)
    codes = [frames(submit(c, f"r{i}", now=10.0)) for i in range(3)]
    assert codes[0] == [] and codes[1] == []
    assert codes[2][0]["code"] == "rate_limited"
    assert frames(submit(c, "later", now=11.5)) == []


# -- cancel and status ------------------------------------------------------------------
def test_cancel_rules() -> None:
    c = core()
    submit(c, "a")
    submit(c, "b")
    waiting = c.cancel("a")  # not accepted yet: cancelled once it has a seq
    assert waiting.seq is None and waiting.reply is None and not waiting.lookup
    batch = c.take_batch()
    c.batch_accepted(batch, 1)
    assert c.batch_done() == ["a"]
    assert c.cancel("b").seq == 2
    c.cancels[2] = object()  # a cancel of b is under way
    busy = c.cancel("b").reply
    assert busy is not None and frames((busy,))[0]["code"] == "not_found"
    assert c.cancel("unknown").lookup
    unknown = c.cancel_target("unknown", None).reply
    assert isinstance(unknown, Send)  # an answer, not a refused submit (no refusal counted)
    assert frames((unknown,)) == [
        {"type": "error", "id": "unknown", "code": "not_found",
         "message": "no unfinished request 'unknown'"}
    ]  # fmt: skip


def test_status_answers() -> None:
    c = core()
    for rid in ("a", "b"):
        submit(c, rid)
    accept_all(c)
    submit(c, "c")
    st = orjson.loads(c.status(None, running_seq=1) or b"")
    assert (st["pending"], st["last_seq"], st["last_done"]) == (2, 2, 0)
    assert orjson.loads(c.status("a", running_seq=1) or b"")["state"] == "running"
    b = orjson.loads(c.status("b", running_seq=1) or b"")
    assert (b["state"], b["ahead"]) == ("queued", 1)
    waiting = orjson.loads(c.status("c", running_seq=1) or b"")
    assert (waiting["state"], waiting["ahead"]) == ("queued", 2)
    assert c.status("elsewhere", running_seq=1) is None  # the store must say
    c.finished(1)
    assert orjson.loads(c.status("a", running_seq=2) or b"")["state"] == "done"


# -- lifecycle --------------------------------------------------------------------------
def test_a_session_closes_once_drained_and_not_before() -> None:
    c = core()
    submit(c, "a")
    assert c.detach() == ()  # a submit is on its way in
    assert c.state is SessionState.DRAINING
    batch = c.take_batch()
    c.batch_accepted(batch, 1)
    c.batch_done()
    assert c.pump_ended() == ()  # accepted, not finished
    assert c.finished(1) == (BEGIN_CLOSE,)
    assert c.state is SessionState.CLOSING


def test_a_resume_while_closing_carries_the_session_on() -> None:
    c = core()
    assert c.detach() == (BEGIN_CLOSE,)
    c.attach()
    assert c.state is SessionState.CLOSING and not c.should_finish_close()
    c.close_called_off()
    assert c.state is SessionState.RECOVERING
    assert c.recovered() == ()
    assert c.state is SessionState.OPEN


def test_recovery_ends_open_draining_or_closing() -> None:
    c = core()
    submit(c, "a")
    accept_all(c)
    c.recovering()
    c.detach()
    assert c.state is SessionState.RECOVERING  # the recovery decides
    assert c.recovered() == ()
    assert c.state is SessionState.DRAINING  # work left: it drains
    c.recovering()
    c.finished(1)
    assert c.recovered() == (BEGIN_CLOSE,)
    assert c.state is SessionState.CLOSING


def test_a_failed_recovery_of_an_idle_detached_session_closes_it() -> None:
    c = core(attached=False)
    assert c.state is SessionState.DRAINING
    c.recovering()
    assert c.recovery_failed() == (BEGIN_CLOSE,)
    busy = core()
    submit(busy, "a")
    accept_all(busy)
    busy.recovering()
    assert busy.recovery_failed() == ()  # the repair loop tries again
    assert busy.state is SessionState.RECOVERING


def test_closed_is_final() -> None:
    c = core()
    c.closed_now()
    with pytest.raises(InvalidTransition):
        c.to(SessionState.OPEN)
    assert c.detach() == ()
    assert frames(submit(c, "a"))[0]["code"] == "unavailable"


def test_repair_backs_off_until_a_result_is_stored() -> None:
    c = core()
    delays = [c.next_repair_delay() for _ in range(8)]
    assert delays[0] == 0 and delays[1] > 0
    assert delays == sorted(delays) and delays[-1] == 5.0
    c.finished(99)
    assert c.next_repair_delay() == 0


def test_a_final_replayed_by_a_resume_is_not_sent_again() -> None:
    c = core()
    c.replayed_finals = {3}
    assert not c.should_send_final(3)
    assert c.should_send_final(3)  # once only
    assert c.should_send_final(4)


def test_the_core_does_no_io() -> None:
    code = (
        "import sys, server.session_core\n"
        "io = {'asyncio', 'aiormq', 'aio_pika', 'websockets', 'aiosqlite', 'pymongo',"
        " 'asyncpg', 'socket'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in io))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_submits_wait_for_a_live_queue() -> None:
    # While its queue is being reopened or closed, a session takes no submit.
    for move in ("recovering", "closing"):
        c = core()
        if move == "recovering":
            c.recovering()
        else:
            c.detach()
            c.attach()  # a resume while it closes
        assert frames(submit(c, "a"))[0]["code"] == "unavailable", move
        assert c.pending() == 0


def test_a_close_waits_for_submits_on_their_way_in() -> None:
    c = core()
    c.detach()
    assert c.state is SessionState.CLOSING
    c.attached = False
    c.pumping = True  # a resume's last submit is being stored as its client left
    assert not c.should_finish_close()
    c.pumping = False
    assert c.should_finish_close()
