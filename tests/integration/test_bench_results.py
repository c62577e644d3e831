"""The committed benchmark figures come from the code as it is: regenerate one and compare.

`make bench` writes every JSON/TXT/PNG in bench/results that the README quotes; this test
re-runs the smallest of them (seed-single, two policies, virtual clock) and checks that the
committed file is byte-identical, so the figures cannot drift from the code unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.app import main as tandem

pytestmark = pytest.mark.integration


def bench_main(args: list[str]) -> int:
    """`tandem bench ARGS`, in this process; returns the exit code."""
    return tandem(["bench", *args])


RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
COMMITTED = RESULTS / "seed-single-pair.json"
# The same command as the first line of the Makefile's `bench` target.
ARGS = ["--quiet", "--workload", "seed-single", "--policies", "seed-current,adaptive"]


def test_committed_seed_single_pair_is_what_the_code_gives(tmp_path: Path) -> None:
    fresh = tmp_path / "seed-single-pair.json"
    assert bench_main([*ARGS, "--json", str(fresh)]) == 0
    committed = json.loads(COMMITTED.read_text())
    regenerated = json.loads(fresh.read_text())
    # Field by field first, so a failure names what moved; then the exact bytes.
    for ours, theirs in zip(regenerated["results"], committed["results"], strict=True):
        assert ours["policy"] == theirs["policy"]
        assert ours["makespan_s"] == theirs["makespan_s"], "run `make bench` and commit"
    assert regenerated == committed, "bench/results is stale: run `make bench` and commit"
    assert fresh.read_text() == COMMITTED.read_text()
