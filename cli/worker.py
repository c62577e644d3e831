"""`tandem worker` and `tandem submit`: sessions from a shared queue, run by any number of workers.

`tandem submit` puts sessions on the queue (`graph.queue`, in Redis). Each `tandem worker`
claims up to `--concurrency` of them at a time and runs them through one router, so with
TANDEM_ADMISSION_URL every worker shares each GPU's admission budget, and with
TANDEM_CHECKPOINT_URL (Postgres) any worker resumes any session. A worker that dies stops
its heartbeat; within `graph.queue.HEARTBEAT_TTL_S` its sessions go back to the queue and
the next claimer resumes them from their last checkpoint, so the files their coders had
finished are not coded again.

SIGTERM or Ctrl-C stops claiming, interrupts the sessions in hand (each writes its manifest
as interrupted, its work is checkpointed) and puts them back on the queue; the exit code is 0
after SIGTERM, 130 after Ctrl-C. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError
from cli.run import (
    FINISHED,
    build_runtime_or_explain,
    check_limit,
    check_max_tokens,
    check_workspace,
    checkpointer,
    output_console,
    parse_max_tokens,
    preflight_or_explain,
    read_request,
    stores_or_explain,
)
from graph.settings import Settings, load_settings, redact
from routing.orders import OrderName

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

    from graph.queue import Claim, SessionOutcome, SessionQueue
    from graph.sessions import SessionEvent
    from nodes.context import RunContext
    from routing.fanout import FanoutPolicy

# How often an idle worker looks at the queue: from the first to the second, doubling.
IDLE_POLL_S = (0.05, 0.5)
# After a claim, a worker holding n sessions waits n times this before the next one (when
# other workers are live), so a burst of submissions spreads over the workers instead of
# filling the first to wake.
CLAIM_SPACING_S = 0.05
# Longest wait before retrying a store that failed (and before re-queueing a session whose
# checkpoint could not be read, so a broken store does not spin through its claims).
RETRY_AFTER_S = 2.0
QUEUE_SCHEMES = ("redis://", "rediss://", "unix://")


def queue_url(given: str | None, settings: Settings) -> str:
    """The queue's Redis URL: `--queue`, else TANDEM_ADMISSION_URL (the same Redis).

    Raises:
        CliError: neither is set, or the URL is not a Redis one (its text is not shown).
    """
    if given is None and settings.admission_url is not None:
        given = settings.admission_url.get_secret_value()
    if not given:
        raise CliError(
            "give the session queue's Redis with --queue redis://HOST:6379/0 "
            "(or set TANDEM_ADMISSION_URL, which it then shares)"
        )
    if not given.startswith(QUEUE_SCHEMES):
        raise CliError("--queue must be a redis://, rediss:// or unix:// URL")
    return given


def _check_queue_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise typer.BadParameter(f"{value!r}: use 1 to 64 letters, digits, '-' or '_'")
    return value


@contextlib.asynccontextmanager
async def queue_or_explain(
    command: str, url: str, *, worker_id: str = "", name: str
) -> AsyncIterator[SessionQueue]:
    """The connected queue; an unreachable Redis is a usage error naming it (redacted)."""
    from graph.queue import QueueStoreUnavailable, SessionQueue

    queue = SessionQueue(url, worker_id=worker_id, name=name)
    try:
        await queue.connect()
    except QueueStoreUnavailable as exc:
        raise CliError(f"{command}: {exc}") from None
    try:
        yield queue
    finally:
        await queue.aclose()


@contextlib.contextmanager
def signals_set(stop: asyncio.Event, received: list[int]) -> Iterator[None]:
    """While inside, SIGTERM or the first Ctrl-C sets `stop` (the signal goes in `received`);
    a second Ctrl-C quits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            return
        if not stop.is_set():
            received.append(signum)
            print(
                f"\ntandem worker: {signal.Signals(signum).name}; interrupting sessions and "
                "putting them back on the queue",
                file=sys.stderr,
                flush=True,
            )
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


@dataclass
class WorkerTally:
    """What one worker did: sessions ended (by status) and given back unfinished."""

    ended: dict[str, int] = field(default_factory=dict)
    released: int = 0

    def add(self, status: str) -> None:
        """Count one ended session."""
        self.ended[status] = self.ended.get(status, 0) + 1

    @property
    def failed(self) -> int:
        """Sessions that ended neither ok nor partial."""
        return sum(n for status, n in self.ended.items() if status not in FINISHED)


@dataclass(frozen=True)
class _WorkerOptions:
    concurrency: int
    name: str
    until_empty: bool
    quiet: bool


class SessionWorker:
    """Claims sessions from `queue` and runs them on `graph`, `concurrency` at a time.

    Args:
        queue: The session queue, connected, with this worker's id.
        graph: The compiled workflow, with the shared checkpointer.
        context: The default run context (a request's own context overrides it).
        fanout: The coder fan-out policy.
        workspace: Where sessions write their files and manifests.
        concurrency: Most sessions run at once.
        console: Where one line per session start and end goes (None: silent).
    """

    def __init__(
        self,
        queue: SessionQueue,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        *,
        context: RunContext,
        fanout: FanoutPolicy,
        workspace: Path,
        concurrency: int,
        console: Console | None = None,
    ) -> None:
        self.queue = queue
        self.graph = graph
        self.context = context
        self.fanout = fanout
        self.workspace = workspace
        self.concurrency = concurrency
        self.console = console
        self.tally = WorkerTally()
        self._running: dict[str, asyncio.Task[SessionOutcome | None]] = {}
        self._changed = asyncio.Event()
        self._journal: set[asyncio.Task[None]] = set()
        self._store_down = False
        self._peers = 1  # live workers at the last heartbeat, this one included

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    async def serve(self, stop: asyncio.Event, *, until_empty: bool = False) -> WorkerTally:
        """Claim and run sessions until `stop` is set (or, with `until_empty`, until every
        submitted session has ended); unfinished ones go back on the queue."""
        from graph.queue import STORE_ERRORS

        done = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(done))
        poll_s = IDLE_POLL_S[0]
        try:
            while not stop.is_set():
                if len(self._running) >= self.concurrency:
                    await self._wait(stop, None)
                    continue
                try:
                    claim = await self.queue.claim()
                except STORE_ERRORS as exc:
                    self._store_error(exc)
                    await self._wait(stop, poll_s)
                    poll_s = min(IDLE_POLL_S[1], poll_s * 2)
                    continue
                self._store_down = False
                if claim is not None:
                    poll_s = IDLE_POLL_S[0]
                    self._start(claim)
                    if self._peers > 1:
                        await self._wait(stop, CLAIM_SPACING_S * len(self._running))
                    continue
                if until_empty and not self._running and (await self.queue.tick()).drained:
                    break
                await self._wait(stop, poll_s)
                poll_s = min(IDLE_POLL_S[1], poll_s * 2)
        finally:
            await self._give_back()
            # Ended by an event, not by cancelling: a cancel that lands inside a Redis call
            # can be lost there, and the loop would renew the heartbeat forever.
            done.set()
            await beat
        return self.tally

    async def _wait(self, stop: asyncio.Event, timeout_s: float | None) -> None:
        """Until `stop`, a session ends, or `timeout_s` passes."""
        self._changed.clear()
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._changed.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _heartbeat(self, done: asyncio.Event) -> None:
        """Renew this worker's heartbeat (and re-queue dead workers' sessions) until `done`."""
        from graph.queue import STORE_ERRORS

        while not done.is_set():
            try:
                self._peers = (await self.queue.tick()).workers
            except STORE_ERRORS as exc:
                self._store_error(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.queue.heartbeat_ttl_s / 3)

    def _store_error(self, exc: BaseException) -> None:
        if not self._store_down:
            self._store_down = True
            self._say(f"worker {self.queue.worker_id}: session queue unreachable ({exc}); retrying")

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._run(claim), name=f"session {claim.session_id}")
        self._running[claim.session_id] = task

        def done(_: asyncio.Task[SessionOutcome | None]) -> None:
            self._running.pop(claim.session_id, None)
            self._changed.set()

        task.add_done_callback(done)

    async def _run(self, claim: Claim) -> SessionOutcome | None:
        """Run (or resume) one claimed session and record how it ended; None when it was
        interrupted or could not start, and went back on the queue."""
        try:
            outcome = await self._outcome(claim)
        except Exception as exc:  # the checkpoint store failed before the session ran
            self._say(
                f"could not run {claim.session_id} ({type(exc).__name__}: {exc}); "
                "it goes back on the queue"
            )
            await asyncio.sleep(RETRY_AFTER_S)
            await self._release([claim.session_id])
            return None
        if outcome is None:
            return None
        await self._record(outcome)
        self.tally.add(outcome.status)
        why = f" ({outcome.error})" if outcome.error else ""
        self._say(f"ended {claim.session_id}: {outcome.status}{why}")
        return outcome

    async def _outcome(self, claim: Claim) -> SessionOutcome | None:
        """How the claimed session ends: refused, already finished, or run to its end."""
        from langchain_core.runnables import RunnableConfig

        from graph.queue import MAX_ATTEMPTS, SessionOutcome
        from graph.sessions import run_session

        sid = claim.session_id
        outcome = SessionOutcome(
            session_id=sid, status="rejected", worker=self.queue.worker_id, attempts=claim.attempts
        )
        if claim.request is None:
            outcome.error = claim.problem
            return outcome
        if claim.attempts > MAX_ATTEMPTS:
            outcome.status = "error"
            outcome.error = f"claimed {claim.attempts} times without ending; not run again"
            return outcome
        config: RunnableConfig = {"configurable": {"thread_id": sid}}
        snapshot = await self.graph.aget_state(config)
        outcome.resumed = bool(snapshot.values)
        if outcome.resumed and not snapshot.next:
            outcome.status = str(snapshot.values.get("status") or "unknown")
            outcome.manifest_path = str(snapshot.values.get("manifest_path") or "")
            return outcome
        self._say(f"{'resume' if outcome.resumed else 'start'} {sid} (claim {claim.attempts})")
        result = await run_session(
            self.graph,
            None if outcome.resumed else claim.request.request,
            sid,
            context=claim.request.run_context(self.context),
            fanout=self.fanout,
            workspace=self.workspace,
            on_event=self._on_event,
            resume=outcome.resumed,
        )
        await self._flush_journal()
        if result.status == "interrupted":
            return None
        outcome.status, outcome.error = result.status, result.error
        outcome.files_ok, outcome.files_failed = result.files_ok, result.files_failed
        outcome.wall_s, outcome.manifest_path = result.wall_s, result.manifest_path
        return outcome

    async def _record(self, outcome: SessionOutcome) -> None:
        """Record the outcome, retrying while Redis is away (the claim holds the session)."""
        from graph.queue import STORE_ERRORS

        wait_s = IDLE_POLL_S[0]
        while True:
            try:
                await self.queue.complete(outcome)
                self._store_down = False
                return
            except STORE_ERRORS as exc:
                self._store_error(exc)
            await asyncio.sleep(wait_s)
            wait_s = min(RETRY_AFTER_S, wait_s * 2)

    async def _release(self, session_ids: list[str]) -> None:
        from graph.queue import STORE_ERRORS

        try:
            self.tally.released += await self.queue.release(session_ids)
        except STORE_ERRORS as exc:
            self._say(
                f"could not give {len(session_ids)} session(s) back ({exc}); they go "
                "back once this worker's heartbeat expires"
            )

    def _on_event(self, event: SessionEvent) -> None:
        """Journal each finished coder file in the queue (which worker coded it)."""
        if event.kind != "files" or not event.file:
            return
        task = asyncio.create_task(self._journal_one(event.session_id, event.round, event.file))
        self._journal.add(task)
        task.add_done_callback(self._journal.discard)

    async def _journal_one(self, session_id: str, round_: int, path: str) -> None:
        from graph.queue import STORE_ERRORS

        with contextlib.suppress(*STORE_ERRORS):
            await self.queue.record_coded(session_id, round_, path)

    async def _flush_journal(self) -> None:
        if self._journal:
            await asyncio.gather(*list(self._journal), return_exceptions=True)

    async def _give_back(self) -> None:
        """Interrupt the sessions in hand and put them back on the queue."""

        from graph.queue import SessionOutcome

        tasks = dict(self._running)
        for task in tasks.values():
            task.cancel()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        # Interrupted, or cancelled before it ran: back on the queue (a no-op for a session
        # whose outcome was recorded, which dropped the claim).
        unfinished = [
            sid
            for sid, out in zip(tasks, outcomes, strict=True)
            if not isinstance(out, SessionOutcome)
        ]
        await self._flush_journal()
        if unfinished:
            await self._release(unfinished)
        for sid in unfinished:
            self._say(f"gave back {sid}")


def worker(
    queue: Annotated[
        str | None,
        typer.Option(
            help="Redis URL of the session queue (default: TANDEM_ADMISSION_URL).",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=4096, help="Most sessions this worker runs at once.")
    ] = 4,
    name: Annotated[
        str,
        typer.Option(callback=_check_queue_name, help="The queue's name (several share a Redis)."),
    ] = "default",
    limit: Annotated[
        str | None,
        typer.Option(
            callback=check_limit,
            help="Admission limit per GPU: adaptive | unlimited | fixed-N (default: TANDEM_LIMIT).",
            show_default=False,
        ),
    ] = None,
    order: Annotated[
        OrderName | None,
        typer.Option(
            help="Admission order across sessions (default: TANDEM_ORDER).", show_default=False
        ),
    ] = None,
    until_empty: Annotated[
        bool,
        typer.Option(
            "--until-empty",
            help="Exit once the queue is empty and no worker runs a session.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print the summary only.")] = False,
) -> None:
    """Pull sessions from the queue and run them, until SIGTERM or Ctrl-C.

    Settings come from TANDEM_* like `tandem run`: share TANDEM_ADMISSION_URL (one budget
    per GPU) and TANDEM_CHECKPOINT_URL (Postgres: any worker resumes any session) and a
    TANDEM_WORKSPACE every worker can write. A dead worker's sessions are resumed by the
    others. Exit 0 when stopped by SIGTERM or drained, 1 when a session it ran failed, 130
    on Ctrl-C.
    """
    from serving.clock import run as run_on_clock

    settings = load_settings()
    url = queue_url(queue, settings)
    check_workspace(settings.workspace)
    options = _WorkerOptions(concurrency, name, until_empty, quiet)
    code = run_on_clock(_work(settings, url, options, limit, order), virtual=False)
    raise typer.Exit(code)


async def _work(
    settings: Settings, url: str, options: _WorkerOptions, limit: str | None, order: str | None
) -> int:
    from graph.graph import build_graph
    from graph.queue import new_worker_id
    from nodes.context import ServerOptions
    from routing.fanout import FanoutPolicy

    console = output_console()
    worker_id = new_worker_id()
    runtime = build_runtime_or_explain(settings, limit=limit, order=order)
    stop = asyncio.Event()
    received: list[int] = []
    try:
        await preflight_or_explain(runtime)
        context = settings.run_context()
        fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
        async with (
            stores_or_explain("worker"),
            queue_or_explain("worker", url, worker_id=worker_id, name=options.name) as queue,
            checkpointer(settings, True) as saver,
            runtime.router,
        ):
            graph = build_graph(
                runtime.models,
                defaults=context,
                options=ServerOptions(workspace=settings.workspace),
                checkpointer=saver,
                fanout=fanout,
            )
            console.print(
                f"tandem worker {worker_id}: queue {redact(url)} ({options.name}), "
                f"{options.concurrency} at a time, limit={limit or settings.limit}, "
                f"checkpoints={redact(str(settings.checkpoint_store()))}",
                highlight=False,
                soft_wrap=True,
            )
            runner = SessionWorker(
                queue,
                graph,
                context=context,
                fanout=fanout,
                workspace=settings.workspace,
                concurrency=options.concurrency,
                console=None if options.quiet else console,
            )
            with signals_set(stop, received):
                tally = await runner.serve(stop, until_empty=options.until_empty)
    finally:
        await runtime.aclose()
    ended = ", ".join(f"{n} {status}" for status, n in sorted(tally.ended.items())) or "none"
    console.print(
        f"tandem worker {worker_id}: sessions ended: {ended}; given back: {tally.released}",
        highlight=False,
        soft_wrap=True,
    )
    if received and received[0] == signal.SIGINT:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if tally.failed else EXIT_OK


def submit(
    request: Annotated[
        str | None, typer.Argument(help="What to build, in words.", show_default=False)
    ] = None,
    request_file: Annotated[
        Path | None,
        typer.Option(help="Read the request from this UTF-8 text file.", show_default=False),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Use the built-in demo request (a small package).")
    ] = False,
    sessions: Annotated[int, typer.Option(min=1, max=100_000, help="Sessions to queue.")] = 1,
    queue: Annotated[
        str | None,
        typer.Option(
            help="Redis URL of the session queue (default: TANDEM_ADMISSION_URL).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str, typer.Option(callback=_check_queue_name, help="The queue's name.")
    ] = "default",
    max_tokens: Annotated[
        str | None,
        typer.Option(
            callback=check_max_tokens,
            help="Output token caps per stage, e.g. plan=512,code=768,review=384.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Queue sessions for `tandem worker`; prints one session id a line.

    The request has the same limits as `tandem run`.
    """
    from graph.queue import SessionRequest
    from graph.sessions import new_session_id

    settings = load_settings()
    url = queue_url(queue, settings)
    text = read_request(request, request_file, demo)
    context: dict[str, Any] = {"max_tokens": parse_max_tokens(max_tokens)} if max_tokens else {}
    requests = [
        SessionRequest(session_id=new_session_id(), request=text, context=context)
        for _ in range(sessions)
    ]

    async def put() -> list[str]:
        async with queue_or_explain("submit", url, name=name) as q:
            return await q.submit(requests)

    refused = asyncio.run(put())
    if refused:
        raise CliError(f"submit: already queued: {', '.join(refused)}")
    for r in requests:
        typer.echo(r.session_id)
