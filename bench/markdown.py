"""Markdown tables of benchmark reports, for the README: `python -m bench.markdown R.json ...`.

The README's figures are printed from the committed JSON (which `make bench` regenerates), so
they are never typed by hand. Policies are grouped by review placement, as the text table is:
each group's ratio is against its first policy; `auto` rows show where reviews went.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_GROUPS = ("reasoning", "coder", "auto")


def _spread(result: dict[str, Any], field: str, seeds: int) -> str:
    value = result[field]
    if seeds <= 1:
        return f"{value:.1f}"
    s = result["spread"][field]
    return f"{s['mean']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def _pair(values: dict[str, float], fmt: str) -> str:
    return f"{format(values['reasoning'], fmt)} / {format(values['coder'], fmt)}"


def table(report: dict[str, Any]) -> str:
    """One markdown table of a report's results, grouped by review placement."""
    seeds = len(report.get("seeds") or [report.get("seed", 0)])
    lines = [
        f"workload `{report['workload']}` ({report['sessions']} x {report['tasks_per_session']}"
        f" files, {seeds} seed{'s' if seeds > 1 else ''}); one lower bound for all policies: "
        f"{report['lower_bound_s']:.1f} s",
        "",
        "| policy | review on | makespan s | vs group's first | efficiency | latency mean / p95 s "
        "| busy g0 / g1 | saturation g0 / g1 | preemptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = report["results"]
    for group in _GROUPS:
        members = [r for r in results if r["review_on"] == group]
        if not members:
            continue
        base = members[0]["makespan_s"]
        for r in members:
            where = group
            if group == "auto" and r.get("review_share"):
                share = r["review_share"]
                where = f"auto ({share['coder']:.0%} coder)"
            lines.append(
                f"| {r['policy']} | {where} | {_spread(r, 'makespan_s', seeds)} "
                f"| {base / r['makespan_s']:.2f}x | {r['efficiency']:.2f} "
                f"| {_spread(r, 'session_latency_mean_s', seeds)} / "
                f"{_spread(r, 'session_latency_p95_s', seeds)} "
                f"| {_pair(r['gpu_busy'], '.0%')} | {_pair(r['gpu_saturation'], '.0%')} "
                f"| {r['preemptions']:.4g} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print a table per report file."""
    paths = list(sys.argv[1:] if argv is None else argv)
    for path in paths:
        print(table(json.loads(Path(path).read_text())))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
