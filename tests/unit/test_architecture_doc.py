"""docs/architecture.md draws the session's lifecycle: it must be the code's.

The ``stateDiagram-v2`` block is parsed line by line and compared with
``SessionState`` and ``TRANSITIONS`` (server/session_state.py): the same
states, the same edges, each labelled with its event, plus the entry into
``open`` and the exit from ``closed``. Every other Mermaid block must at
least open with a diagram type Mermaid knows, so a typo does not leave a
reader with a block of source instead of a picture.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.session_state import TRANSITIONS, SessionState

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"

# The first word of a Mermaid block names its diagram type.
DIAGRAM_TYPES = {
    "flowchart", "graph", "sequenceDiagram", "stateDiagram-v2", "stateDiagram",
    "classDiagram", "erDiagram", "gantt", "pie", "journey", "gitGraph", "mindmap",
    "timeline", "quadrantChart", "requirementDiagram", "C4Context", "sankey-beta",
    "xychart-beta", "block-beta", "packet-beta", "architecture-beta", "kanban",
}  # fmt: skip

START = "[*]"
EDGE = re.compile(r"^(\[\*\]|[A-Za-z_][\w-]*)\s*-->\s*(\[\*\]|[A-Za-z_][\w-]*)\s*(?::\s*(.*?))?$")

Edges = dict[tuple[str, str], str | None]


def mermaid_blocks(text: str) -> list[str]:
    """The bodies of the ```mermaid fenced blocks, in order."""
    blocks = re.findall(r"^```mermaid[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)
    opened = len(re.findall(r"^```mermaid", text, re.M))
    assert len(blocks) == opened, "a ```mermaid block is not closed"
    return blocks


def content_lines(block: str) -> list[str]:
    """Non-blank lines without Mermaid comments (``%%``)."""
    lines = (line.strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("%%")]


def diagram_type(block: str) -> str:
    lines = content_lines(block)
    return lines[0].split()[0] if lines else ""


def state_edges(block: str) -> Edges:
    """Every ``a --> b : label`` line of a stateDiagram-v2 block; any other
    line fails, so the block cannot say more than the comparison checks."""
    lines = content_lines(block)
    assert lines[0] == "stateDiagram-v2", lines[0]
    edges: Edges = {}
    for line in lines[1:]:
        match = EDGE.match(line)
        assert match is not None, f"not an edge of the state diagram: {line!r}"
        source, target, label = match.groups()
        assert (source, target) not in edges, f"edge drawn twice: {line!r}"
        edges[source, target] = label
    return edges


@pytest.fixture(scope="module")
def blocks() -> list[str]:
    return mermaid_blocks(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def drawn(blocks: list[str]) -> Edges:
    state_blocks = [b for b in blocks if diagram_type(b) == "stateDiagram-v2"]
    assert len(state_blocks) == 1, "docs/architecture.md draws one session state diagram"
    return state_edges(state_blocks[0])


def test_every_mermaid_block_names_a_diagram_type(blocks: list[str]) -> None:
    assert len(blocks) >= 5  # system, request flow, states, failures, monitoring
    for block in blocks:
        assert diagram_type(block) in DIAGRAM_TYPES, content_lines(block)[:1]


def test_the_state_diagram_has_exactly_the_session_states(drawn: Edges) -> None:
    states = {name for edge in drawn for name in edge} - {START}
    assert states == {state.value for state in SessionState}


def test_the_state_diagram_edges_are_the_transition_table(drawn: Edges) -> None:
    expected: Edges = {(a.value, b.value): event for (a, b), event in TRANSITIONS.items()}
    expected[START, SessionState.OPEN.value] = None
    expected[SessionState.CLOSED.value, START] = None
    assert drawn == expected


def test_the_parser_sees_drift() -> None:
    """The comparison fails on a diagram that lost an edge, renamed an event
    or added a line that is not an edge (the parser reads what it claims to)."""
    lines = ["stateDiagram-v2", "[*] --> open"] + [
        f"{a.value} --> {b.value} : {event}" for (a, b), event in TRANSITIONS.items()
    ]
    full = state_edges("\n".join(lines))
    assert full[SessionState.OPEN.value, SessionState.DRAINING.value] == "connection gone"
    assert len(full) == len(TRANSITIONS) + 1
    assert len(state_edges("\n".join(lines[:-1]))) == len(TRANSITIONS)
    renamed = [line.replace("connection gone", "socket gone") for line in lines]
    assert state_edges("\n".join(renamed)) != full
    with pytest.raises(AssertionError, match="not an edge"):
        state_edges("\n".join([*lines, "state limbo"]))
    with pytest.raises(AssertionError, match="drawn twice"):
        state_edges("\n".join([*lines, lines[-1]]))


def test_a_block_left_open_is_reported() -> None:
    with pytest.raises(AssertionError, match="not closed"):
        mermaid_blocks("```mermaid\nflowchart LR\n    a --> b\n")
