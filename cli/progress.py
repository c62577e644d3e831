"""Live progress of running sessions: one line per session, redrawn in place on a terminal.

On a terminal, a rich `Live` table shows each session's stage, files done in the current
coder round, and elapsed seconds (real, and emulated under the virtual clock). Elsewhere (a
pipe, a log file, a test) the same events come out as plain lines: one per stage and one
every few files, so logs stay readable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from graph.sessions import SessionEvent
from serving.clock import now

# Plain output reports coder progress every this many files (and at the last one).
PLAIN_FILES_EVERY = 5


@dataclass
class _Row:
    stage: str = "waiting"
    done: int = 0
    total: int = 0
    wall_started: float = field(default_factory=time.monotonic)
    clock_started: float = 0.0
    wall_s: float | None = None
    clock_s: float | None = None
    clock_seen_s: float = 0.0
    note: str = ""


class SessionBoard:
    """Receives `SessionEvent`s and shows them live (terminal) or as plain lines.

    Use as a context manager around the run; pass `on_event` to `run_many`/`run_session`.
    """

    def __init__(self, console: Console, *, virtual: bool, quiet: bool = False) -> None:
        self.console = console
        self.virtual = virtual
        self.quiet = quiet
        self.rows: dict[str, _Row] = {}
        self._live: Live | None = None

    @property
    def live(self) -> bool:
        """True when progress is redrawn in place (an interactive terminal, not quiet)."""
        return self._live is not None

    def __enter__(self) -> SessionBoard:
        if not self.quiet and self.console.is_terminal:
            self._live = Live(
                console=self.console,
                get_renderable=self.table,
                refresh_per_second=4,
                transient=False,
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def on_event(self, event: SessionEvent) -> None:
        """Record one event (called on the event loop, so the run's clock is readable)."""
        clock = now()
        row = self.rows.get(event.session_id)
        was_done = row is not None and row.stage == "done"
        if row is None:
            row = self.rows[event.session_id] = _Row(clock_started=clock)
        row.clock_seen_s = clock - row.clock_started
        if event.kind == "files":
            row.stage, row.done, row.total = "code", event.done, event.total
        elif event.kind == "stage":
            if event.stage == "code" and row.stage != "code":
                row.done, row.total = 0, 0
            row.stage = event.stage
        else:
            row.stage = event.text
            row.wall_s = time.monotonic() - row.wall_started
            row.clock_s = clock - row.clock_started
        if event.text and event.kind == "stage":
            row.note = event.text
        if not self.quiet and self._live is None and not (event.kind == "ended" and was_done):
            self._plain(event, row)

    def _plain(self, event: SessionEvent, row: _Row) -> None:
        if event.kind == "files" and not (
            event.done == event.total or event.done % PLAIN_FILES_EVERY == 0
        ):
            return
        what = {
            "files": f"code: {event.done}/{event.total} files",
            "stage": f"{event.stage}" + (f" ({event.text})" if event.text else ""),
            "ended": f"ended: {event.text}",
        }[event.kind]
        self.console.print(
            f"[{event.session_id}] {what} · {self._elapsed(row)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def _elapsed(self, row: _Row) -> str:
        wall = row.wall_s if row.wall_s is not None else time.monotonic() - row.wall_started
        text = f"{wall:.1f} s"
        if self.virtual:
            emulated = row.clock_s if row.clock_s is not None else row.clock_seen_s
            text += f" (emulated {emulated:.1f} s)"
        return text

    def table(self) -> Table:
        """The board: one row per session."""
        table = Table(title=None, expand=False, box=None, pad_edge=False)
        table.add_column("session", no_wrap=True)
        table.add_column("stage", no_wrap=True)
        table.add_column("files", justify="right", no_wrap=True)
        table.add_column("elapsed s", justify="right", no_wrap=True)
        if self.virtual:
            table.add_column("emulated s", justify="right", no_wrap=True)
        table.add_column("last step", overflow="ellipsis", no_wrap=True)
        for sid, row in self.rows.items():
            wall = row.wall_s if row.wall_s is not None else time.monotonic() - row.wall_started
            cells = [
                sid,
                row.stage,
                f"{row.done}/{row.total}" if row.total else "",
                f"{wall:.1f}",
            ]
            if self.virtual:
                # Drawn from rich's refresh thread, where no loop runs: the clock as last seen.
                emulated = row.clock_s if row.clock_s is not None else row.clock_seen_s
                cells.append(f"{emulated:.1f}")
            cells.append(row.note)
            table.add_row(*cells)
        return table
