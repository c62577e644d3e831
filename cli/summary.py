"""The end-of-run summary as rich tables: sessions, endpoints, review calls, the router."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.errors import clean
from graph.sessions import SessionResult

_ROUTER_COLUMNS = (
    ("limit", "limit"),
    ("in_flight", "in flight"),
    ("queued", "queued"),
    ("admitted", "admitted"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
    ("peak_in_flight", "peak in flight"),
)


def sessions_table(results: Sequence[SessionResult], *, virtual: bool) -> Table:
    """Per session: status, files ok/failed, review rounds, time, rejected paths.

    Under the virtual clock the run's seconds are emulated GPU time, and the column says so.
    """
    table = Table(title="sessions", title_justify="left")
    table.add_column("session", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("files ok", justify="right")
    table.add_column("files failed", justify="right")
    table.add_column("review rounds", justify="right")
    table.add_column("emulated s" if virtual else "s", justify="right")
    if virtual:
        table.add_column("wall s", justify="right")
    table.add_column("rejected paths", justify="right")
    for r in results:
        cells = [r.session_id, r.status, str(r.files_ok), str(r.files_failed), str(r.rounds)]
        cells.append(f"{r.seconds:.1f}")
        if virtual:
            cells.append(f"{r.wall_s:.1f}")
        cells.append(str(len(r.rejected)))
        table.add_row(*cells)
    return table


def session_notes(results: Sequence[SessionResult]) -> list[str]:
    """Errors, warnings, rejected paths and who produced the files, one line each."""
    lines: list[str] = []
    for r in results:
        if r.error:
            lines.append(f"{r.session_id} error: {clean(r.error)}")
        lines.extend(f"{r.session_id} warning: {w}" for w in r.warnings)
        lines.extend(
            f"{r.session_id} rejected: {item.get('path')!r} ({item.get('reason')})"
            for item in r.rejected
        )
    lines.extend(f"files by: {line}" for line in sorted({r.produced_by for r in results} - {""}))
    return lines


def usage_totals(results: Sequence[SessionResult]) -> dict[str, dict[str, float]]:
    """Per endpoint role (and `review_role`): counts summed over sessions."""
    totals: dict[str, dict[str, float]] = {}
    for r in results:
        for role, counts in r.usage.items():
            slot = totals.setdefault(role, {})
            for key, value in counts.items():
                slot[key] = slot.get(key, 0) + value
    return totals


def endpoints_table(totals: dict[str, dict[str, float]]) -> Table:
    """Per endpoint role: LLM calls and tokens."""
    table = Table(title="endpoints", title_justify="left")
    table.add_column("endpoint", no_wrap=True)
    table.add_column("calls", justify="right")
    table.add_column("prompt tokens", justify="right")
    table.add_column("output tokens", justify="right")
    for role in sorted(r for r in totals if r != "review_role"):
        counts = totals[role]
        table.add_row(
            role,
            str(int(counts.get("calls", 0))),
            str(int(counts.get("prompt_tokens", 0))),
            str(int(counts.get("completion_tokens", 0))),
        )
    return table


def review_calls_table(totals: dict[str, dict[str, float]]) -> Table | None:
    """Review calls by the model that served them (None when there were none)."""
    by_role = totals.get("review_role") or {}
    if not by_role:
        return None
    table = Table(title="review calls by model", title_justify="left")
    table.add_column("served by", no_wrap=True)
    table.add_column("review calls", justify="right")
    for role, count in sorted(by_role.items()):
        table.add_row(role, str(int(count)))
    return table


def router_table(stats: dict[str, dict[str, Any]]) -> Table:
    """Per replica: admission limit and counts (`Router.stats()`); its URL as a caption."""
    table = Table(title="router", title_justify="left", caption_justify="left")
    table.add_column("replica (role@gpu)", no_wrap=True)
    for _, header in _ROUTER_COLUMNS:
        table.add_column(header, justify="right")
    for name, row in stats.items():
        table.add_row(name, *(str(row.get(key, "")) for key, _ in _ROUTER_COLUMNS))
    # URLs are long: under the table, where they do not squeeze the counts (redacted).
    table.caption = "\n".join(
        f"{name}: {clean(str(row.get('url', '')))}" for name, row in stats.items()
    )
    return table


def summary(
    results: Sequence[SessionResult],
    *,
    virtual: bool,
    router_stats: dict[str, dict[str, Any]] | None = None,
) -> RenderableType:
    """Everything printed at the end of `tandem run` / `tandem resume`."""
    parts: list[RenderableType] = [sessions_table(results, virtual=virtual)]
    notes = session_notes(results)
    if notes:
        parts.append(Text("\n".join(notes)))
    totals = usage_totals(results)
    parts.append(endpoints_table(totals))
    review = review_calls_table(totals)
    if review is not None:
        parts.append(review)
    if router_stats:
        parts.append(router_table(router_stats))
    return Group(*parts)


def summary_text(
    results: Sequence[SessionResult],
    *,
    virtual: bool,
    router_stats: dict[str, dict[str, Any]] | None = None,
    width: int = 160,
) -> str:
    """The summary as plain text (for logs and tests)."""
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(summary(results, virtual=virtual, router_stats=router_stats))
    return console.export_text(styles=False)
