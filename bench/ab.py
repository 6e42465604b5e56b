"""Before and after, on one machine in one sitting: ``python -m bench.ab``.

A change to the request path must keep the benchmark's rows within
run-to-run noise (docs/performance.md). This tool measures that the one
honest way on a shared machine: it alternates the two builds round by round
(``before, after, before, after, ...``), so that a drift of the machine
(another job, the CPU's clock) lands on both, and it drives both with this
tree's harness (``bench/``, ``clients/``); only the server differs, started
from each build's own virtualenv. Each round is one ``python -m bench.run
--only ROWS`` per build (its median of three runs), the order swapped every
other round (before-after, after-before, ...) so that a steady drift does not
land on one side; the summary gives each round's medians, the mean over the
rounds and the spread of each build's own rounds, which is the noise a
difference has to beat.

The benchmark starts a server through the ``sessionq`` script beside the
Python that runs it, so each build's own code is measured. Before the first
round this tool checks that: both builds must have that script, and their
``server`` packages must come from different trees (else it would compare a
build with itself and print a ratio of about 1.0).

    # a checkout of the code before the change, with its own virtualenv:
    git worktree add ../before <commit> && (cd ../before && scripts/sessionq setup)
    .venv/bin/python -m bench.ab --before ../before/.venv/bin/python --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROWS = "sessionq:100x1,sessionq:100x16"


BUILDS = ("before", "after")


def order(round_number: int) -> tuple[str, str]:
    """The builds' order in round ``round_number`` (from 1): swapped every other round."""
    return BUILDS if round_number % 2 else (BUILDS[1], BUILDS[0])


def origin(python: str) -> Path:
    """The tree whose ``server`` package ``python``'s ``sessionq`` script runs
    (asked from a neutral directory, as a console script sees it)."""
    if not (Path(python).parent / "sessionq").exists():
        raise SystemExit(f"{python}: no sessionq script beside it: set that build up first")
    found = subprocess.run(
        [python, "-P", "-c", "import server; print(server.__file__)"],
        cwd=tempfile.gettempdir(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if found.returncode != 0:
        raise SystemExit(f"{python}: cannot import server: {found.stderr.strip()[-300:]}")
    return Path(found.stdout.strip()).resolve().parent.parent


def medians(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Row key -> (req/s, server CPU µs/req), each the median of the row's runs."""
    out = {}
    for row in report["rows"]:
        runs = row["runs"]
        if row.get("error") or not runs:
            continue
        out[row["key"]] = (
            statistics.median(r["rate"] for r in runs),
            statistics.median(r["cpu_us_per_msg"]["server"] for r in runs),
        )
    return out


def summary(rounds: list[dict[str, dict[str, tuple[float, float]]]]) -> str:
    """A markdown table: per row and build, each round's req/s median, the mean,
    the spread of the rounds (sd / mean) and after against before."""
    lines = [
        "| row | build | req/s by round | mean req/s | spread | server µs/req (mean) | after / before |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    keys = sorted({k for r in rounds for build in r.values() for k in build})
    for key in keys:
        means = {}
        for build in ("before", "after"):
            rates = [r[build][key][0] for r in rounds if key in r.get(build, {})]
            cpus = [r[build][key][1] for r in rounds if key in r.get(build, {})]
            if not rates:
                continue
            mean = statistics.fmean(rates)
            means[build] = mean
            spread = statistics.stdev(rates) / mean if len(rates) > 1 else 0.0
            ratio = f"{means['after'] / means['before']:.3f}" if len(means) == 2 else ""
            lines.append(
                f"| `{key}` | {build} | {', '.join(f'{x:,.0f}' for x in rates)} | {mean:,.0f}"
                f" | {spread:.1%} | {statistics.fmean(cpus):.0f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the Python of the build before the change")
    p.add_argument("--after", default=sys.executable, help="the build after (default: this one)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--only", default=ROWS, help=f"rows of bench.run (default {ROWS})")
    p.add_argument("--json", type=Path, help="also write every round's medians here")
    args = p.parse_args(argv)
    pythons = {"before": args.before, "after": args.after}
    trees = {build: origin(python) for build, python in pythons.items()}
    if trees["before"] == trees["after"]:
        print(
            f"both builds run the server of {trees['before']}: nothing to compare", file=sys.stderr
        )
        return 2
    rounds: list[dict[str, dict[str, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(1, args.rounds + 1):
            this: dict[str, dict[str, tuple[float, float]]] = {}
            for build in order(n):
                out = Path(tmp) / f"{build}-{n}.json"
                command = [pythons[build], "-m", "bench.run", "--only", args.only, "--no-write"]
                subprocess.run(
                    [*command, "--json", str(out)], check=True, stdout=subprocess.DEVNULL
                )
                this[build] = medians(json.loads(out.read_text()))
                print(f"round {n} {build}: {this[build]}", file=sys.stderr, flush=True)
            rounds.append(this)
            if args.json:  # every finished round, in case a later one fails
                args.json.write_text(json.dumps(rounds, indent=1))
    print(f"before: {trees['before']}; after: {trees['after']}\n")
    print(summary(rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
